"""Ahead-of-time compile report: every kernel config compiles for sm_80 and sm_90 and fits in
shared memory. Compiling needs TRITON_INTERPRET unset (conftest sets it for this process), so
the report runs in a subprocess. This module also holds toy kernels (``aot_specs`` below) that
prove the report can fail."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl

from fastdiff.kernels.aot import SHARED_LIMIT, AotSpec, CompileResult, compile_spec, parse_ptxas_log
from fastdiff.kernels.report import Report, Row, format_markdown

REPO = Path(__file__).resolve().parents[2]
KERNEL_MODULES = ("group_norm", "attention", "sampler_step", "q_sample")
ARCHS = (80, 90)


@triton.jit
def _toy_dot(a_ptr, c_ptr, BM: tl.constexpr, BK: tl.constexpr):
    # Both fp32 operands of tl.dot are staged in shared memory: 2 * BM * BK * 4 bytes.
    rows = tl.arange(0, BM)
    cols = tl.arange(0, BK)
    a = tl.load(a_ptr + rows[:, None] * BK + cols[None, :])
    b = tl.load(a_ptr + cols[:, None] * BM + rows[None, :])
    tl.store(c_ptr + rows[:, None] * BM + rows[None, :], tl.dot(a, b))


_TOY_SIGNATURE = {"a_ptr": "*fp32", "c_ptr": "*fp32", "BM": "constexpr", "BK": "constexpr"}


def aot_specs():
    """Toy configs for the report's self-checks (imported as tests.kernels.test_aot)."""
    return [
        AotSpec("small_tile", _toy_dot, _TOY_SIGNATURE, {"BM": 64, "BK": 32}),  # 16 KiB
        AotSpec("huge_tile", _toy_dot, _TOY_SIGNATURE, {"BM": 128, "BK": 256}),  # 256 KiB > both limits
        AotSpec("bad_signature", _toy_dot, {"a_ptr": "*fp32", "BM": "constexpr", "BK": "constexpr"},
                {"BM": 64, "BK": 32}),
    ]


def run_report(*args: str) -> tuple[int, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "fastdiff.kernels.report", "--json", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    try:
        return proc.returncode, json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"report printed no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="module")
def full_report():
    return run_report()


@pytest.fixture(scope="module")
def toy_report():
    return run_report("--kernel", "tests.kernels.test_aot")


def test_every_kernel_config_compiles_and_fits(full_report):
    returncode, report = full_report
    assert report["module_errors"] == {}
    bad = [r for r in report["results"] if not r["ok"]]
    assert not bad, json.dumps(bad, indent=1)
    assert returncode == 0
    for r in report["results"]:
        assert 0 <= r["shared_bytes"] <= SHARED_LIMIT[r["arch"]]
        assert 0 < r["registers"] <= 255


@pytest.mark.parametrize("kernel", KERNEL_MODULES)
def test_kernel_module_contributes_configs_for_every_target(full_report, kernel):
    _, report = full_report
    targets = {r["arch"] for r in report["results"] if r["kernel"] == kernel}
    assert targets == set(ARCHS), f"fastdiff.kernels.{kernel} lists no aot_specs() config"


def test_report_flags_config_over_the_shared_limit(toy_report):
    returncode, report = toy_report
    results = {(r["name"], r["arch"]): r for r in report["results"]}
    assert returncode != 0
    for arch in ARCHS:
        small, huge = results["small_tile", arch], results["huge_tile", arch]
        assert small["ok"] and small["error"] is None and small["shared_bytes"] >= 2 * 64 * 32 * 4
        assert small["registers"] > 0 and small["spill_bytes"] == 0
        assert huge["error"] is None and not huge["fits"] and not huge["ok"]
        assert huge["shared_bytes"] > SHARED_LIMIT[arch]
    assert report["failed"] == 2 * len(ARCHS)  # huge_tile and bad_signature, on each target


def test_report_names_the_signature_mismatch(toy_report):
    _, report = toy_report
    errors = [r["error"] for r in report["results"] if r["name"] == "bad_signature"]
    assert len(errors) == len(ARCHS)
    assert all("signature" in e and "c_ptr" in e for e in errors)


def test_compile_refuses_the_interpreter():
    # This process runs with TRITON_INTERPRET=1: the kernel is an InterpretedFunction.
    result = compile_spec(aot_specs()[0], 80)
    assert not result.ok and "TRITON_INTERPRET" in result.error


def test_compile_rejects_unknown_arch():
    with pytest.raises(ValueError, match="arch"):
        compile_spec(aot_specs()[0], 75)


def test_parse_ptxas_log():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_80'\n"
           "ptxas info    : Function properties for k\n"
           "    56 bytes stack frame, 68 bytes spill stores, 96 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 384 bytes cmem[0]\n")
    assert parse_ptxas_log(log) == (255, 68 + 96)
    with pytest.raises(RuntimeError, match="register"):
        parse_ptxas_log("ptxas info    : 0 bytes gmem\n")


def test_markdown_table_marks_each_failure():
    small, huge, bad = aot_specs()
    rows = [Row("toy", small, CompileResult("small_tile", 80, 16_384, 80, 0, True, None)),
            Row("toy", huge, CompileResult("huge_tile", 80, 262_144, 255, 0, False, None)),
            Row("toy", bad, CompileResult("bad_signature", 80, None, None, None, False, "E: at 3:4:\nsrc\n\ncause"))]
    text = format_markdown(Report(rows, {"broken": "ImportError: nope"}, [80], 1.0))
    lines = text.splitlines()
    assert "| small_tile | BM=64, BK=32; w4 s3 | sm_80 | 16,384 (10%) | 80 | 0 | ok |" in lines
    assert any(line.startswith("| huge_tile") and "over the shared-memory limit" in line for line in lines)
    assert any(line.startswith("| bad_signature") and line.endswith("FAILED: E: at 3:4: ... cause |") for line in lines)
    assert "FAILED to list configs: ImportError: nope" in lines
    assert lines[-1].startswith("3 configs x 1 targets: 1 ok, 3 failed")
