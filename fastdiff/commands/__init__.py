"""``fastdiff`` subcommands: one module each, defining ``configure(parser)`` and ``run(args) -> int``.

:mod:`fastdiff.cli` imports a command's module only when that command runs.
"""
from __future__ import annotations

import re


class UsageError(Exception):
    """A bad command-line value found after parsing; the CLI reports it argparse-style, exit code 2."""


def resolve_device(name: str | None) -> str:
    """``None`` -> "cuda" when a GPU is visible else "cpu"; "cuda" without a GPU is a UsageError."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here (torch {torch.__version__})")
    return name
