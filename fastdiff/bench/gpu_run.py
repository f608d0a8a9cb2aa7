"""The first GPU run in one command: environment, correctness, kernels, end to end, thresholds.

Every stage runs in its own process under its own time limit, later stages whatever an earlier one
did, and everything goes to one folder (at most 8 files: one JSON per stage, the run, summary.md, log).

    PYTHONPATH=. python3 -m fastdiff.bench.gpu_run "$OUT"      # the GPU machine: about 8 minutes
    python -m fastdiff.bench.gpu_run out/gpu --dry-run           # any machine, seconds: the plan and the imports
    python -m fastdiff.bench.gpu_run out/gpu --tiny              # a CPU: every stage, tiny config, < 2 minutes

The stages (:data:`STAGES`) reuse what exists: ``fastdiff.bench.environment``/``telemetry``/``roofline``,
``pytest -m gpu``, ``benchmarks/test_bench_ops.py`` and ``fastdiff.bench.harness.run_bench``. The plan
of each stage lives here; what a stage measures lives in :mod:`fastdiff.bench.gpu_stages`.
``benchmarks/gpu/README.md`` says how to call it through the device tool and what to do with the files.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastdiff.bench import environment, gpu_checks, gpu_stages
from fastdiff.files import atomic_write

#: The issue's 8 minutes: the device tool runs one command for at most 10, and starting the machine
#: and copying the tree come out of the same session budget.
TOTAL_BUDGET_S = 480
#: One device-tool command's limit, less a margin: what a run with other --budget values may add up to.
COMMAND_LIMIT_S = 570
#: Process starts, the thresholds' and summary's own work, the file writes between stages.
OVERHEAD_S = 15
#: What the device tool brings back from $OUT.
MAX_FILES = 8
FILE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
#: pytest-timeout's limit per correctness test: one hung test must not eat the stage.
PER_TEST_TIMEOUT_S = 60


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int  # the stage's process is killed (with its children) after this many seconds
    answers: str
    needs_gpu: str | None = None  # why a CPU run skips it, where it does


STAGES = (
    Stage("environment", 20, "GPU, driver, torch/triton/CUDA versions, SM count, clocks (NVML); copy bandwidth "
                             "and fp32/bf16 matmul+conv roofs measured on the card"),
    Stage("correctness", 130, "pytest -m gpu: the kernels on the hardware against their references, CUDA-graph "
                              "capture and replay, NaN semantics, autograd, fastdiff verify (60 s per test)",
          needs_gpu="the gpu-marked tests need a CUDA GPU (pytest skips all of them here)"),
    Stage("kernels", 90, "benchmarks/test_bench_ops.py: GroupNorm+SiLU (both layouts, one program vs split "
                          "groups), attention (kernel vs SDPA-flash, D 64/128/256/512), step, q-sample: GB/s or "
                          "TFLOP/s and % of the card's measured and datasheet peaks"),
    Stage("e2e", 210, "the CIFAR-10 UNet in bf16 (E2E_PARTS): eager fp32 reference, torch.compile, fastdiff "
                      "Sampler with and without CUDA graphs; images/s, ms/step, % roof, PSNR vs the fp32 "
                      "reference, warm-up apart"),
    Stage("thresholds", 10, "the attention route (kernel vs SDPA-flash per head dim) and the GroupNorm split "
                            "threshold (programs per SM) as measured, beside the policy the code applies now"),
)


def stem(date: str, device_slug: str) -> str:
    """The results' common file-name start: ``<date>_<gpu>_gpu-run`` (benchmarks/results convention)."""
    return f"{date}_{device_slug}_gpu-run"


def output_files(name_stem: str) -> list[str]:
    """Every file a run writes to its folder: one JSON per stage and for the run, the summary, the log."""
    return [f"{name_stem}_{stage.name}.json" for stage in STAGES] + [f"{name_stem}_run.json", "summary.md", "log.txt"]


def plan_problems(stages=STAGES, total_budget_s: int = TOTAL_BUDGET_S) -> list[str]:
    """What is wrong with the plan: a stage without a time limit, a total over the budget, too many files."""
    problems = [f"stage {s.name}: no time limit ({s.budget_s!r})" for s in stages
                if not isinstance(s.budget_s, int) or s.budget_s <= 0]
    total = sum(s.budget_s for s in stages if isinstance(s.budget_s, int)) + OVERHEAD_S
    if total > total_budget_s:
        problems.append(f"stage budgets + {OVERHEAD_S} s overhead = {total} s, over the {total_budget_s} s budget")
    files = output_files(stem("2026-01-01", "h200"))
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} output files, the device tool returns {MAX_FILES}")
    problems += [f"output file name {f!r}: the device tool returns only [A-Za-z0-9._-] names"
                 for f in files if not FILE_NAME.match(f)]
    return problems


# ---- running the stages ------------------------------------------------------------------

@dataclass
class StageRecord:
    name: str
    budget_s: int
    status: str  # ok | failed | timeout | skipped
    seconds: float
    reason: str = ""
    exit_code: int | None = None


#: The microbenchmarks in the order they matter: the route/split comparisons (the thresholds) and the
#: Triton kernels first; the torch.compile'd references (a compile each) in a second pytest run, so a
#: kill at the stage's limit loses only those (pytest-benchmark writes its JSON at the end of a run).
KERNEL_TESTS = ("test_attention_routes", "test_group_norm_split", "test_sampler_step", "test_q_sample",
                "test_group_norm_silu", "test_attention")


def _stage_commands(stage: Stage, out: Path, work: Path, name_stem: str, tiny: bool,
                    parts: tuple[str, ...] = ()) -> list[list[str]] | str:
    """The stage's command lines, run one after another within its budget, or why it cannot run here."""
    python = [sys.executable]
    if stage.name == "correctness":
        command = [*python, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-rfE",
                   "--continue-on-collection-errors", f"--junitxml={work / 'correctness.xml'}"]
        return [command + ([f"--timeout={PER_TEST_TIMEOUT_S}"] if gpu_checks.importable("pytest_timeout") else [])]
    if stage.name == "kernels":
        if not gpu_checks.importable("pytest_benchmark"):
            return "pytest-benchmark is not installed"
        pytest = [*python, "-m", "pytest", *(f"benchmarks/test_bench_ops.py::{name}" for name in KERNEL_TESTS), "-v",
                  "-p", "no:cacheprovider", "--benchmark-columns=median,iqr"]
        first = pytest + ["-k", "not compiled", f"--benchmark-json={work / 'ops.json'}"]
        # on a CPU the compiled references take minutes to compile: the tiny check leaves them out
        return [first] if tiny else [first, pytest + ["-k", "compiled", f"--benchmark-json={work / 'ops_compiled.json'}"]]
    # the e2e parts stop starting 10 s before the kill, so the stage ends on its own where it can
    return [[*python, "-m", "fastdiff.bench.gpu_stages", stage.name, str(out), str(work), name_stem,
             f"--budget={stage.budget_s - 10}", *(["--tiny"] if tiny else []),
             *([f"--parts={','.join(parts)}"] if parts else [])]]


def _run_stage(stage: Stage, commands: list[list[str]], log: Path) -> tuple[str, int | None, str]:
    """Run ``commands`` in turn from the repository root, output appended to ``log``; at the stage's
    budget kill the running one's whole process group (inductor's compile workers go with it)."""
    deadline = time.monotonic() + stage.budget_s
    worst = ("ok", 0, "")
    for command in commands:
        with open(log, "a") as sink:
            sink.write(f"\n===== stage {stage.name}: {' '.join(command)}\n")
            sink.flush()
            process = subprocess.Popen(command, cwd=gpu_checks.ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                       start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                code = process.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return "timeout", None, f"killed at its {stage.budget_s} s limit; what it wrote before stays"
        if code == 1 and command[2] == "pytest":  # the tests ran, some failed
            worst = ("failed", code, "some tests failed (see the stage's JSON and the log)")
        elif code != 0 and not (code == 5 and command[2] == "pytest"):  # 5: pytest selected no test
            worst = ("failed", code, f"exit code {code} (see the log)")
    return worst


def selected_stages(only: tuple[str, ...] = (), budgets: dict[str, int] | None = None) -> list[Stage]:
    """The stages to run, in plan order (``only``: a subset), with ``budgets`` replacing their limits."""
    budgets = budgets or {}
    return [dataclasses.replace(s, budget_s=budgets.get(s.name, s.budget_s)) for s in STAGES
            if not only or s.name in only]


def run(out: Path, tiny: bool, only: tuple[str, ...] = (), budgets: dict[str, int] | None = None,
        parts: tuple[str, ...] = ()) -> int:
    """Run the stages (``only``: a subset, in plan order; ``budgets``: other limits; ``parts``: the e2e
    parts to run) into ``out``; returns 0 when every stage that ran passed."""
    started, load_start = time.perf_counter(), list(os.getloadavg())
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    name_stem = stem(datetime.date.today().isoformat(), environment.device_slug(device))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fastdiff-gpu-run-") as work:  # pytest's raw files, condensed into out
        records = _run_stages(out, Path(work), name_stem, tiny, on_gpu, selected_stages(only, budgets), parts)
    run_info = {"schema": "fastdiff-gpu-run/1", "tiny": tiny, "device": device, "stem": name_stem,
                "total_budget_s": TOTAL_BUDGET_S, "wall_s": round(time.perf_counter() - started, 1),
                "stages": [asdict(r) for r in records], "plan": [asdict(s) for s in STAGES],
                "loadavg_start": load_start, "loadavg_end": list(os.getloadavg())}
    atomic_write(out / f"{name_stem}_run.json", lambda tmp: tmp.write_text(json.dumps(run_info, indent=1)))
    summary = gpu_stages.summary(out, name_stem, run_info)
    atomic_write(out / "summary.md", lambda tmp: tmp.write_text(summary))
    print(summary)
    extra = sorted(p.name for p in out.iterdir() if p.name not in output_files(name_stem))
    if extra:
        print(f"[gpu_run] note: {out} also holds {extra}: the device tool returns {MAX_FILES} files in all")
    return 0 if all(r.status in ("ok", "skipped") for r in records) else 1


def _run_stages(out: Path, work: Path, name_stem: str, tiny: bool, on_gpu: bool, stages: list[Stage],
                parts: tuple[str, ...]) -> list[StageRecord]:
    records = []
    for stage in stages:
        print(f"[gpu_run] {stage.name}: up to {stage.budget_s} s - {stage.answers}", flush=True)
        begin = time.perf_counter()
        commands = _stage_commands(stage, out, work, name_stem, tiny, parts)
        if stage.needs_gpu and not on_gpu:
            status, code, reason = "skipped", None, f"no CUDA GPU: {stage.needs_gpu}"
        elif isinstance(commands, str):
            status, code, reason = "skipped", None, commands
        else:
            status, code, reason = _run_stage(stage, commands, out / "log.txt")
        record = StageRecord(stage.name, stage.budget_s, status, round(time.perf_counter() - begin, 1), reason, code)
        if stage.name in ("correctness", "kernels"):  # pytest wrote raw files: condense them into the stage JSON
            gpu_stages.condense(stage.name, out, work, name_stem, record=asdict(record))
        records.append(record)
        print(f"[gpu_run] {stage.name}: {status} in {record.seconds:.0f} s {reason}".rstrip(), flush=True)
    return records


def dry_run(out: Path | None = None) -> int:
    """Check the plan and this tree against the GPU image without running any stage; 0 when all pass."""
    checks = [("plan", plan_problems())] + gpu_checks.image_checks()
    for stage in STAGES:
        print(f"  {stage.name:<12} {stage.budget_s:>4} s  {stage.answers}")
    total = sum(s.budget_s for s in STAGES) + OVERHEAD_S
    print(f"  {'total':<12} {total:>4} s  (stages + {OVERHEAD_S} s overhead; budget {TOTAL_BUDGET_S} s)")
    for name, problems in checks:
        print(f"{'FAIL' if problems else 'ok':<4} {name}" + "".join(f"\n       - {p}" for p in problems))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "dry_run.json", lambda tmp: tmp.write_text(json.dumps(dict(checks), indent=1)))
    return 1 if any(problems for _, problems in checks) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.bench.gpu_run", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for the results ($OUT on the device machine)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="check the plan and the imports, run no stage")
    mode.add_argument("--tiny", action="store_true", help="every stage at a tiny size (the CPU check)")
    parser.add_argument("--only", default="", help="comma-separated stages to run (default: all, in order)")
    parser.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS",
                        help="another time limit for a stage (a follow-up call: benchmarks/gpu/README.md)")
    parser.add_argument("--parts", default="", help="comma-separated e2e parts to run (default: all, in order): "
                                                    + ", ".join(p.name for p in gpu_stages.E2E_PARTS))
    args = parser.parse_args(argv)
    try:
        only, budgets, parts = _checked_selection(args)
    except ValueError as e:
        print(f"gpu_run: {e}", file=sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"gpu_run: out: {args.out} exists and is not a folder", file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run(args.out)
    return run(args.out, args.tiny, only, budgets, parts)


def _checked_selection(args) -> tuple[tuple[str, ...], dict[str, int], tuple[str, ...]]:
    """--only, --budget and --parts, checked: a bad value is a ValueError naming the option."""
    names = [s.name for s in STAGES]
    only = tuple(s for s in args.only.split(",") if s)
    if set(only) - set(names):
        raise ValueError(f"--only: unknown stage(s) {sorted(set(only) - set(names))}; stages: {', '.join(names)}")
    budgets = {}
    for item in args.budget:
        stage, _, seconds = item.partition("=")
        if stage not in names or not seconds.isdigit() or int(seconds) < 1:
            raise ValueError(f"--budget {item!r}: expected STAGE=SECONDS with a stage of {', '.join(names)}")
        budgets[stage] = int(seconds)
    total = sum(s.budget_s for s in selected_stages(only, budgets)) + OVERHEAD_S
    if total > COMMAND_LIMIT_S:
        raise ValueError(f"--budget: the stages add up to {total} s with overhead, over the {COMMAND_LIMIT_S} s "
                         "one device-tool command may take")
    parts = tuple(p for p in args.parts.split(",") if p)
    known = [p.name for p in gpu_stages.E2E_PARTS]
    if set(parts) - set(known):
        raise ValueError(f"--parts: unknown part(s) {sorted(set(parts) - set(known))}; parts: {', '.join(known)}")
    return only, budgets, parts


if __name__ == "__main__":
    sys.exit(main())
