"""What the stages of :mod:`fastdiff.bench.gpu_run` measure, and the summary that reads them back.

``python -m fastdiff.bench.gpu_stages STAGE OUT WORK STEM [--tiny] [--budget S]`` runs one stage in a
process of its own (gpu_run does, under the stage's time limit); the pytest stages run pytest itself
and :func:`condense` turns its raw files into the stage's JSON. Every figure written here was
measured in that run; nothing is filled in for what did not run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastdiff.bench import environment, report, roofline
from fastdiff.bench.harness import BenchSettings, run_bench
from fastdiff.bench.telemetry import Telemetry
from fastdiff.files import atomic_write
from fastdiff.ops.attention import flash_takes


def _write_json(path: Path, data: dict) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, default=str)))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- environment -------------------------------------------------------------------------

def _nvidia_smi() -> str | None:
    query = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu"
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment_stage(tiny: bool) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env, slug = environment.collect(device), environment.device_slug(device)
    env.update(telemetry=Telemetry(device).static(), nvidia_smi=_nvidia_smi(), cuda_runtime=torch.version.cuda,
               slug=slug, datasheet=roofline.DATASHEET.get(slug))
    if env["git"]["commit"] is None and os.environ.get("FASTDIFF_COMMIT"):  # the device tool's copy has no .git
        env["git"] = {"commit": os.environ["FASTDIFF_COMMIT"], "dirty": None, "source": "FASTDIFF_COMMIT"}
    env["probes"] = {"copy": roofline.measure_bandwidth(device, quick=tiny),
                     "roof": {name: roofline.measure_roof(device, getattr(torch, name), quick=tiny)
                              for name in ("float32", "bfloat16")}}
    return env


# ---- correctness: pytest -m gpu ------------------------------------------------------------

_VERBOSE_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


def _junit_tests(xml_path: Path) -> list[dict]:
    tests = []
    for case in ElementTree.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = {"failure": "failed"}.get(child.tag, child.tag), child.get("message", "")
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0)), "message": message[:500]})
    return tests


def _logged_tests(log_text: str) -> list[dict]:
    """Outcomes from pytest -v lines: all there is when the stage was killed before the XML."""
    return [{"test": m.group(1), "outcome": m.group(2).lower(), "seconds": None, "message": ""}
            for m in map(_VERBOSE_LINE.match, log_text.splitlines()) if m]


def _stage_log(out: Path, stage: str) -> str:
    text = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    return text.rpartition(f"===== stage {stage}:")[2]


def correctness_json(out: Path, work: Path, record: dict) -> dict:
    xml_path = work / "correctness.xml"
    tests = _junit_tests(xml_path) if xml_path.exists() else _logged_tests(_stage_log(out, "correctness"))
    counts = {}
    for test in tests:
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    return {"stage": record, "source": "junit" if xml_path.exists() else "pytest -v log", "counts": counts,
            "tests": tests}


# ---- kernels: benchmarks/test_bench_ops.py -------------------------------------------------

def kernel_rows(ops: dict, env: dict | None) -> list[dict]:
    """One row per pytest-benchmark entry: what was timed, GB/s or TFLOP/s, and the % of the card's
    measured copy bandwidth / matmul+conv roof and of its datasheet peaks."""
    probes = (env or {}).get("probes", {})
    sheet = (env or {}).get("datasheet") or {}
    rows = []
    for bench in ops.get("benchmarks", []):
        info = bench.get("extra_info", {})
        row = {"name": bench["name"], "group": bench.get("group"), "timed": info.get("timed"),
               "dtype": info.get("dtype"), "shape": info.get("shape"), "median_ms": info.get("median_ms"),
               "route": info.get("route")}
        if "GB/s" in info:
            row["GB/s"] = info["GB/s"]
            copy = probes.get("copy", {}).get("bytes_per_s")
            row["pct_measured_peak"] = 100 * info["GB/s"] * 1e9 / copy if copy else None
            row["pct_datasheet_peak"] = 100 * info["GB/s"] * 1e9 / sheet["bytes_per_s"] if sheet else None
        if "TFLOP/s" in info:
            row["TFLOP/s"] = info["TFLOP/s"]
            roof = probes.get("roof", {}).get(info.get("dtype") or "", {}).get("roof_tflops")
            peak = sheet.get(info.get("dtype") or "")
            row["pct_measured_peak"] = 100 * info["TFLOP/s"] / roof if roof else None
            row["pct_datasheet_peak"] = 100 * info["TFLOP/s"] * 1e12 / peak if peak else None
        rows.append(row)
    return rows


def kernels_json(out: Path, work: Path, name_stem: str, record: dict) -> dict:
    """The kernel rows of both pytest runs (Triton kernels, then the compiled references), where they finished."""
    runs = {name: _read_json(work / f"{name}.json") for name in ("ops", "ops_compiled")}
    env = _read_json(out / f"{name_stem}_environment.json")
    rows = [row for ops in runs.values() if ops for row in kernel_rows(ops, env)]
    missing = [f"{name}.json" for name, ops in runs.items() if ops is None]
    return {"stage": record, "rows": rows,
            "note": f"no pytest-benchmark JSON for {missing}: that run did not finish or was not run" if missing
            else None, "machine_info": (runs["ops"] or {}).get("machine_info")}


def condense(stage: str, out: Path, work: Path, name_stem: str, record: dict) -> Path:
    """The stage JSON of a pytest stage, from what pytest left in ``work`` (or the log)."""
    data = correctness_json(out, work, record) if stage == "correctness" else kernels_json(out, work, name_stem,
                                                                                            record)
    return _write_json(out / f"{name_stem}_{stage}.json", data)


# ---- end to end ----------------------------------------------------------------------------

@dataclass(frozen=True)
class E2EPart:
    name: str
    sampler: str
    steps: int
    batch: int
    paths: tuple[str, ...]
    autotune: bool
    estimate_s: int  # a guess until a GPU has run it: a part starts only with this much of the budget left
    repeats: int = 3


#: In order of what matters most; each part is written as it finishes, so a stage killed at its limit
#: keeps the parts before, and a follow-up call runs the rest (``--only e2e --parts ...``). autotune
#: False: inductor's default mode and the Sampler's quick compile; the max-autotune compiles come last.
#: CUDA graphs on/off is compared at batch 1, where launch overhead matters most. DDPM runs 100 steps
#: and the summary scales its ms/step to 1000 (every DDPM step costs the same: one UNet call + the step).
#: estimate_s: a guess (three cold compiles of the CIFAR-10 UNet at ~40 s each) until a GPU has run it.
E2E_PARTS = (
    E2EPart("ddim50-b64", "ddim", 50, 64, ("reference", "compile", "fastdiff"), False, 150),
    E2EPart("ddim50-b1", "ddim", 50, 1, ("reference", "compile", "fastdiff", "fastdiff-nographs"), False, 160),
    E2EPart("ddim50-b256", "ddim", 50, 256, ("reference", "compile", "fastdiff"), False, 160),
    E2EPart("ddpm100-b64", "ddpm", 100, 64, ("reference", "fastdiff"), False, 60),
    E2EPart("ddim50-b64-autotune", "ddim", 50, 64, ("reference", "compile", "fastdiff"), True, 300),
)
#: The CPU check: the same code at a size a 2-core CPU does in seconds (the Sampler once: its
#: compile or OpenVINO conversion is most of the time).
TINY_PARTS = (
    E2EPart("ddim2-b2", "ddim", 2, 2, ("reference", "fastdiff"), False, 0, repeats=2),
    E2EPart("ddpm2-b2", "ddpm", 2, 2, ("reference",), False, 0, repeats=2),
)


def e2e_stage(out: Path, name_stem: str, tiny: bool, budget_s: float, parts: tuple[str, ...] = ()) -> dict:
    """Run the parts (``parts``: those named) in order, each a ``run_bench`` call, rewriting the stage
    JSON after each one."""
    deadline = time.monotonic() + budget_s
    data = {"schema": "fastdiff-gpu-run-e2e/1", "parts": {}}
    path = out / f"{name_stem}_e2e.json"
    for part in TINY_PARTS if tiny else [p for p in E2E_PARTS if not parts or p.name in parts]:
        left = deadline - time.monotonic()
        entry = {"part": asdict(part)}
        if left < part.estimate_s:
            entry.update(status="not reached", reason=f"{left:.0f} s of the stage's budget left, estimate "
                                                      f"{part.estimate_s} s")
        else:
            settings = BenchSettings(config="tiny" if tiny else "cifar10", batches=(part.batch,), steps=part.steps,
                                     sampler=part.sampler, dtype="bfloat16", paths=part.paths,
                                     repeats=part.repeats, autotune=part.autotune)
            begin = time.monotonic()
            try:
                entry.update(status="ok", result=run_bench(settings, progress=False))
            except Exception as e:  # one part failing must not stop the others
                entry.update(status="failed", reason=f"{type(e).__name__}: {e}")
            entry["seconds"] = round(time.monotonic() - begin, 1)
            print(f"[e2e] {part.name}: {entry['status']} in {entry['seconds']} s", flush=True)
        data["parts"][part.name] = entry
        _write_json(path, data)
    return data


# ---- thresholds ------------------------------------------------------------------------------

def _median_ms(bench: dict) -> float:
    info = bench.get("extra_info", {})
    return info["median_ms"] if "median_ms" in info else 1000 * bench["stats"]["median"]


def attention_routes(ops: dict, capability: tuple[int, int] | None) -> list[dict]:
    """Per (head dim, dtype): the Triton kernel against SDPA-flash, and what the op routes there now."""
    pairs: dict[tuple, dict] = {}
    for bench in ops.get("benchmarks", []):
        if not bench["name"].startswith("test_attention_routes"):
            continue
        info = bench["extra_info"]
        key = (info["shape"][-1], info["dtype"], tuple(info["shape"]))
        pairs.setdefault(key, {})[info["timed"]] = _median_ms(bench)
    rows = []
    for (head_dim, dtype, shape), times in sorted(pairs.items()):
        policy = "sdpa-flash" if capability and flash_takes(getattr(torch, dtype), head_dim, True, capability) \
            else "fastdiff-kernel"
        faster = min(times, key=times.get)
        rows.append({"head_dim": head_dim, "dtype": dtype, "shape": list(shape), "ms": times, "faster": faster,
                     "routed_now": policy, "agrees": faster == policy or len(times) < 2})
    return rows


def group_norm_split(ops: dict, sm_count: int | None) -> list[dict]:
    """Per (batch, shape, layout): one program per group against split groups, and the policy's choice."""
    pairs: dict[tuple, dict] = {}
    for bench in ops.get("benchmarks", []):
        if not bench["name"].startswith("test_group_norm_split"):
            continue
        info = bench["extra_info"]
        key = (tuple(info["shape"]), info.get("layout", "channels_last"))
        entry = pairs.setdefault(key, {"ms": {}, "policy_slices": info.get("policy_slices_on_this_gpu")})
        entry["ms"][info["timed"]] = _median_ms(bench)
    rows = []
    for (shape, layout), entry in sorted(pairs.items()):
        times, programs = entry["ms"], shape[0] * 32
        faster = min(times, key=times.get)
        policy = "split groups" if (entry["policy_slices"] or 1) > 1 else "one program per group"
        rows.append({"shape": list(shape), "layout": layout, "ms": times, "faster": faster, "policy": policy,
                     "programs_per_sm": programs / sm_count if sm_count else None,
                     "agrees": faster == policy or len(times) < 2})
    return rows


def thresholds_stage(work: Path) -> dict:
    ops = _read_json(work / "ops.json")
    if ops is None:
        return {"status": "no data", "reason": "the kernels stage left no pytest-benchmark JSON"}
    on_gpu = torch.cuda.is_available()
    capability = torch.cuda.get_device_capability() if on_gpu else None
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count if on_gpu else None
    attention, split = attention_routes(ops, capability), group_norm_split(ops, sm_count)
    split_wins = [r["programs_per_sm"] for r in split if r["faster"] == "split groups" and r["programs_per_sm"]]
    one_wins = [r["programs_per_sm"] for r in split if r["faster"] != "split groups" and r["programs_per_sm"]]
    sdpa_dims = {r["dtype"]: [] for r in attention}
    for r in attention:
        if r["faster"] == "sdpa-flash":
            sdpa_dims[r["dtype"]].append(r["head_dim"])
    return {
        "status": "ok" if attention or split else "no data",
        "reason": None if attention or split else "no route/split benchmarks ran (they need a GPU)",
        "attention": attention, "group_norm_split": split,
        "measured": {
            "sdpa_flash_faster_at_head_dims": sdpa_dims,
            "split_won_up_to_programs_per_sm": max(split_wins, default=None),
            "one_program_won_from_programs_per_sm": min(one_wins, default=None),
        },
    }


# ---- the summary -----------------------------------------------------------------------------

def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _environment_lines(env: dict | None) -> list[str]:
    if not env:
        return ["_environment: not measured (the stage did not finish)_"]
    probes, tel = env.get("probes", {}), env.get("telemetry", {})
    gpu = env.get("gpu", {})
    roofs = ", ".join(f"{k} {v['roof_tflops']:.3g}" for k, v in probes.get("roof", {}).items())
    return [f"- device: {env['device_name']} ({env['device']}), {gpu.get('multiprocessors', '-')} SMs, "
            f"capability {gpu.get('capability', '-')}; driver {tel.get('driver', '-')}; max SM clock "
            f"{tel.get('max_sm_clock_mhz', '-')} MHz",
            f"- torch {env['packages'].get('torch')} (CUDA {env.get('cuda_runtime')}), triton "
            f"{env['packages'].get('triton')}, numpy {env['packages'].get('numpy')}, python {env['python']}; "
            f"commit {env['git'].get('commit')}{' (dirty)' if env['git'].get('dirty') else ''}",
            f"- measured: copy {probes.get('copy', {}).get('bytes_per_s', 0) / 1e9:.0f} GB/s; roof (TFLOP/s, best "
            f"of matmul/conv) {roofs}"]


def _correctness_lines(data: dict | None) -> list[str]:
    if not data:
        return ["_not run_"]
    if data["stage"]["status"] == "skipped":
        return [f"_skipped: {data['stage']['reason']}_"]
    counts = ", ".join(f"{n} {k}" for k, n in sorted(data["counts"].items())) or "no test reported"
    lines = [f"{counts} (from the {data['source']})"]
    lines += [f"- {t['outcome'].upper()} `{t['test']}`: {t['message'][:200]}" for t in data["tests"]
              if t["outcome"] in ("failed", "error")]
    return lines


def _kernel_lines(data: dict | None) -> list[str]:
    if not data or not data["rows"]:
        return [f"_no rows: {(data or {}).get('note') or 'not run'}_"]
    lines = ["| benchmark | timed | dtype | shape | median ms | GB/s | TFLOP/s | % measured peak | % datasheet |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| `{r['name']}` | {r['timed']} | {r['dtype']} | {r['shape']} | {_fmt(r['median_ms'], 3)} "
                     f"| {_fmt(r.get('GB/s'), 0)} | {_fmt(r.get('TFLOP/s'), 2)} | {_fmt(r.get('pct_measured_peak'))} "
                     f"| {_fmt(r.get('pct_datasheet_peak'))} |")
    return lines


def _e2e_lines(data: dict | None) -> list[str]:
    if not data:
        return ["_not run_"]
    lines = []
    for name, entry in data["parts"].items():
        lines.append(f"#### {name}: {entry['status']}" + (f" ({entry['reason']})" if entry.get("reason") else ""))
        result = entry.get("result")
        if result:
            lines += ["", "```", report.headline(result), "```", "", report.markdown_table(result)]
            if result["sampling"]["method"] == "ddpm":
                lines += ["", "1000-step DDPM equivalent (ms/step x 1000, every step one UNet call + the step):"]
                lines += [f"- {result['paths'][row['path']]['label']}, batch {row['batch']}: "
                          f"{row['ms_per_step']['median']:.1f} s per 1000 steps, "
                          f"{row['batch'] / row['ms_per_step']['median']:.3f} images/s" for row in result["results"]]
        lines.append("")
    return lines


def _threshold_lines(data: dict | None) -> list[str]:
    if not data or data.get("status") != "ok":
        return [f"_{(data or {}).get('reason') or 'not run'}_"]
    lines = ["| head dim | dtype | kernel ms | SDPA-flash ms | faster | routed now | agrees |", "|---:|---|---:|---:|---|---|---|"]
    for r in data["attention"]:
        lines.append(f"| {r['head_dim']} | {r['dtype']} | {_fmt(r['ms'].get('fastdiff-kernel'), 3)} "
                     f"| {_fmt(r['ms'].get('sdpa-flash'), 3)} | {r['faster']} | {r['routed_now']} | {r['agrees']} |")
    lines += ["", "| shape | layout | programs/SM | one program ms | split ms | faster | policy | agrees |",
              "|---|---|---:|---:|---:|---|---|---|"]
    for r in data["group_norm_split"]:
        lines.append(f"| {r['shape']} | {r['layout']} | {_fmt(r['programs_per_sm'], 2)} "
                     f"| {_fmt(r['ms'].get('one program per group'), 3)} | {_fmt(r['ms'].get('split groups'), 3)} "
                     f"| {r['faster']} | {r['policy']} | {r['agrees']} |")
    return lines + ["", f"measured: `{json.dumps(data['measured'])}`"]


def summary(out: Path, name_stem: str, run_info: dict) -> str:
    """summary.md: the stages with their budgets, then each stage's findings, from the files in ``out``."""
    read = {stage: _read_json(out / f"{name_stem}_{stage}.json")
            for stage in ("environment", "correctness", "kernels", "e2e", "thresholds")}
    env = read["environment"]
    lines = [f"# fastdiff GPU run: {name_stem}" + (" (tiny CPU check)" if run_info["tiny"] else ""), "",
             *_environment_lines(env), "",
             f"Wall {run_info['wall_s']:.0f} s of a {run_info['total_budget_s']} s budget; load average (1 min) "
             f"{run_info['loadavg_start'][0]:.2f} at the start, {run_info['loadavg_end'][0]:.2f} at the end.", "",
             "| stage | budget s | took s | status | reason |", "|---|---:|---:|---|---|"]
    lines += [f"| {r['name']} | {r['budget_s']} | {r['seconds']:.0f} | {r['status']} | {r['reason']} |"
              for r in run_info["stages"]]
    sections = (("Correctness (`pytest -m gpu`)", _correctness_lines(read["correctness"])),
                ("Kernel microbenchmarks", _kernel_lines(read["kernels"])),
                ("End to end (paste into the README's \"GPU results\")", _e2e_lines(read["e2e"])),
                ("Route and split thresholds", _threshold_lines(read["thresholds"])))
    for title, body in sections:
        lines += ["", f"## {title}", "", *body]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.bench.gpu_stages")
    parser.add_argument("stage", choices=("environment", "e2e", "thresholds"))
    parser.add_argument("out", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("stem")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--budget", type=float, default=float("inf"), help="e2e: seconds the stage may take")
    parser.add_argument("--parts", default="", help="e2e: comma-separated parts to run (default: all)")
    args = parser.parse_args(argv)
    path = args.out / f"{args.stem}_{args.stage}.json"
    if args.stage == "environment":
        _write_json(path, environment_stage(args.tiny))
    elif args.stage == "e2e":
        e2e_stage(args.out, args.stem, args.tiny, args.budget, tuple(p for p in args.parts.split(",") if p))
    else:
        data = thresholds_stage(args.work)
        _write_json(path, data)
        print(json.dumps(data.get("measured", data.get("reason"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
