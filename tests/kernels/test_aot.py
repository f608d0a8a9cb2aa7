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
import torch
import triton
import triton.language as tl
from fastdiff.kernels.aot import (
    SHARED_LIMIT,
    AotSpec,
    CompileResult,
    compile_spec,
    global_load_bytes,
    launch_spec,
    parse_ptxas_log,
)
from fastdiff.kernels.report import Report, Row, format_markdown
from triton.runtime.jit import MockTensor

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


@triton.jit
def _toy_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n), mask=offsets < n)


def _copy_spec(name: str, n: int) -> AotSpec:
    """The copy as the JIT compiles it for length n: n % 16 == 0 lets it prove 16-byte loads."""
    f32 = MockTensor(torch.float32)
    return launch_spec(name, _toy_copy, dict(x_ptr=f32, y_ptr=f32, n=n, BLOCK=128), 1, 1, vector_load_bytes=16)


def aot_specs():
    """Toy configs for the report's self-checks (imported as tests.kernels.test_aot)."""
    return [
        AotSpec("small_tile", _toy_dot, _TOY_SIGNATURE, {"BM": 64, "BK": 32}),  # 16 KiB
        AotSpec("huge_tile", _toy_dot, _TOY_SIGNATURE, {"BM": 128, "BK": 256}),  # 256 KiB > both limits
        AotSpec("bad_signature", _toy_dot, {"a_ptr": "*fp32", "BM": "constexpr", "BK": "constexpr"},
                {"BM": 64, "BK": 32}),
        _copy_spec("copy_n1024", 1024),
        _copy_spec("copy_n1000", 1000),  # masked at a length the JIT cannot prove aligned: scalar loads
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
    assert report["failed"] == 3 * len(ARCHS)  # huge_tile, bad_signature and copy_n1000, on each target


def test_report_checks_vector_loads_under_the_jit_specialisation(toy_report):
    # One kernel, two lengths: the specialisation the runtime gives n decides the load width.
    _, report = toy_report
    results = {(r["name"], r["arch"]): r for r in report["results"]}
    for arch in ARCHS:
        aligned, ragged = results["copy_n1024", arch], results["copy_n1000", arch]
        assert aligned["ok"] and aligned["vectorised"] and aligned["load_bytes"] == {"16": 1}
        assert ragged["error"] is None and ragged["fits"] and ragged["vectorised"] is False and not ragged["ok"]
        assert set(ragged["load_bytes"]) == {"4"}


def test_group_norm_tile_loads_are_vectorised_in_both_layouts(full_report):
    _, report = full_report
    checked = [r for r in report["results"] if r["kernel"] == "group_norm" and r["vectorised"] is not None]
    assert checked and all(r["vectorised"] for r in checked)
    for layout in ("nchw", "cl"):
        for kernel in ("group_norm_silu_", "group_norm_partial_stats_", "group_norm_silu_apply_",
                       "group_norm_silu_backward_"):
            widths = {max(map(int, r["load_bytes"])) for r in checked if r["name"].startswith(f"{kernel}{layout}_bf16")}
            # 16-byte vectors where the group's channels allow them (C/G = 8 in channels_last); the
            # split path runs at batch 1 of the Ho shapes with C/G = 4 and 12 there: 8 bytes.
            assert widths, (kernel, layout)
            assert 16 in widths or (layout, kernel) in {("cl", "group_norm_partial_stats_"),
                                                        ("cl", "group_norm_silu_apply_")}, (kernel, layout, widths)


def test_launch_spec_specialises_as_the_jit_does():
    spec = _copy_spec("copy", 1)
    assert spec.signature["n"] == "constexpr" and spec.constexprs == {"n": 1, "BLOCK": 128}
    assert spec.attrs == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
    assert _copy_spec("copy", 32).attrs[(2,)] == [["tt.divisibility", 16]]
    assert not _copy_spec("copy", 33).attrs[(2,)] and _copy_spec("copy", 33).signature["n"] == "i32"
    assert _copy_spec("copy", 2**33).signature["n"] == "i64"
    with pytest.raises(ValueError, match="BLOCK"):
        launch_spec("copy", _toy_copy, dict(x_ptr=None, y_ptr=None, n=4), 4, 1)


def test_global_load_bytes():
    ptx = ("\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
           "\t@%p1 ld.global.v2.b32 { %r5, %r6 }, [ %rd2 + 0 ];\n"
           "\tld.global.L1::evict_last.b16 { %rs1 }, [ %rd3 + 0 ];\n"
           "\tld.global.b32 { %r7 }, [ %rd4 + 0 ];\n\tld.global.b32 { %r8 }, [ %rd4 + 4 ];\n"
           "\tld.shared.v4.b32 { %r9, %r10, %r11, %r12 }, [ %r13 ];\n")
    assert global_load_bytes(ptx) == {16: 1, 8: 1, 4: 2, 2: 1}


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
    small, huge, bad, aligned, ragged = aot_specs()
    rows = [Row("toy", small, CompileResult("small_tile", 80, 16_384, 80, 0, True, None, {16: 2})),
            Row("toy", huge, CompileResult("huge_tile", 80, 262_144, 255, 0, False, None)),
            Row("toy", bad, CompileResult("bad_signature", 80, None, None, None, False, "E: at 3:4:\nsrc\n\ncause")),
            Row("toy", aligned, CompileResult("copy_n1024", 80, 0, 16, 0, True, None, {16: 1}, True)),
            Row("toy", ragged, CompileResult("copy_n1000", 80, 0, 16, 0, True, None, {4: 4}, False))]
    text = format_markdown(Report(rows, {"broken": "ImportError: nope"}, [80], 1.0))
    lines = text.splitlines()
    assert "| small_tile | BM=64, BK=32; w4 s3 | sm_80 | 16,384 (10%) | 80 | 0 | 16x2 | ok |" in lines
    assert "| copy_n1024 | BLOCK=128; w1 s1; %16: x_ptr y_ptr n | sm_80 | 0 (0%) | 16 | 0 | 16x1 | ok, vectorised |" \
        not in lines  # pointers are not listed among the integers
    assert "| copy_n1024 | BLOCK=128; w1 s1; %16: n | sm_80 | 0 (0%) | 16 | 0 | 16x1 | ok, vectorised |" in lines
    assert any(line.startswith("| huge_tile") and "over the shared-memory limit" in line for line in lines)
    assert any(line.startswith("| bad_signature") and line.endswith("FAILED: E: at 3:4: ... cause |") for line in lines)
    assert "| copy_n1000 | BLOCK=128; w1 s1; %16: - | sm_80 | 0 (0%) | 16 | 0 | 4x4 | FAILED: tile loads not vectorised |" \
        in lines
    assert "FAILED to list configs: ImportError: nope" in lines
    assert lines[-1].startswith("5 configs x 1 targets: 2 ok, 4 failed")
