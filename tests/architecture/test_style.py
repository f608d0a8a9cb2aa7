"""The linter (ruff: pyflakes, syntax errors, import order; configured in pyproject.toml) passes
on the whole tree: an unused or missing name or a stray import fails here, not in review."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = ["fastdiff", "kernels", "tests", "benchmarks"]

pytest.importorskip("ruff", reason="ruff is in the [test] extra")


def test_ruff_check():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", *SOURCES], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
