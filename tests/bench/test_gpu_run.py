"""The first-GPU-run kit (`python -m fastdiff.bench.gpu_run`, benchmarks/gpu/): the dry run passes on
this tree and checks it as the GPU image sees it; the plan's limits are enforced; a stage killed at its
limit leaves the later ones running; the e2e parts stop at the budget; the thresholds and the kernel
rows are read correctly from pytest-benchmark's JSON. No stage is timed here: this checks structure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_diffusers_unet

from fastdiff.bench import gpu_checks, gpu_run, gpu_stages, paths, report
from fastdiff.bench.gpu_run import Stage

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_passes_and_checks_the_tree_as_the_gpu_image_sees_it(tmp_path, capsys):
    assert gpu_run.main([str(tmp_path), "--dry-run"]) == 0, capsys.readouterr().out
    checks = json.loads((tmp_path / "dry_run.json").read_text())
    assert all(problems == [] for problems in checks.values()), checks
    names = " ".join(checks)
    for checked in ("plan", "PYTHONPATH=.", "pytest -m gpu collects", "Python 3.12", "64 MiB"):
        assert checked in names


def test_plan_refuses_a_stage_without_a_limit_and_a_total_over_budget():
    stages = (Stage("environment", 0, "x"), Stage("e2e", 470, "y"))
    problems = gpu_run.plan_problems(stages)
    assert any("environment: no time limit" in p for p in problems)
    assert any("over the 480 s budget" in p for p in problems)
    assert gpu_run.plan_problems() == []
    files = gpu_run.output_files(gpu_run.stem("2026-12-04", "h200"))
    assert len(files) <= gpu_run.MAX_FILES and "2026-12-04_h200_gpu-run_e2e.json" in files


def test_checks_name_a_requirement_the_image_lacks_and_a_removed_module(tmp_path):
    assert gpu_checks.version_problems({"torch": "2.12", "triton": "3.6"}) == [
        "pyproject asks torch>=2.12, the GPU image has 2.11"]
    assert gpu_checks.version_problems(gpu_checks.requirement_floors()) == []
    (tmp_path / "old.py").write_text("import imp\nfrom distutils.version import LooseVersion\nimport os\n")
    assert gpu_checks.removed_stdlib_imports(tmp_path, folders=(".",)) == [
        "old.py:1: imports imp (removed in Python 3.12)", "old.py:2: imports distutils.version (removed in Python 3.12)"]


def test_python_312_check_finds_what_the_image_would_refuse(tmp_path):
    if gpu_checks._python312() is None:
        pytest.skip("no Python 3.12 interpreter here")
    (tmp_path / "ok.py").write_text("x = 1\n")
    (tmp_path / "escape.py").write_text('pattern = "\\d+"\n')  # "\d": a SyntaxWarning from 3.12 on
    how, problems = gpu_checks.python312_syntax(tmp_path, folders=(".",))
    assert how.startswith("with ") and len(problems) == 1 and "escape.py" in problems[0] and "invalid escape sequence" in problems[0]


def test_a_stage_killed_at_its_limit_leaves_the_later_stages_running(tmp_path, monkeypatch):
    stages = (Stage("environment", 1, "sleeps past its limit"), Stage("thresholds", 30, "writes its JSON"))
    monkeypatch.setattr(gpu_run, "STAGES", stages)

    def commands(stage, out, work, name_stem, tiny, parts):
        if stage.name == "environment":
            return [[sys.executable, "-c", "import time; time.sleep(60)"]]
        code = f"import pathlib; pathlib.Path({str(out)!r}, {name_stem + '_thresholds.json'!r}).write_text('{{}}')"
        return [[sys.executable, "-c", code]]

    monkeypatch.setattr(gpu_run, "_stage_commands", commands)
    assert gpu_run.run(tmp_path, tiny=True) == 1
    run_info = json.loads(next(tmp_path.glob("*_run.json")).read_text())
    assert [(s["name"], s["status"]) for s in run_info["stages"]] == [("environment", "timeout"),
                                                                        ("thresholds", "ok")]
    assert run_info["stages"][0]["seconds"] < 30
    summary = (tmp_path / "summary.md").read_text()
    assert "| environment | 1 |" in summary and "timeout" in summary
    assert len(list(tmp_path.iterdir())) <= gpu_run.MAX_FILES


def test_e2e_parts_past_the_budget_are_reported_not_reached(tmp_path, monkeypatch):
    part = gpu_stages.E2EPart("ddim50-b64", "ddim", 50, 64, ("reference",), False, estimate_s=60)
    monkeypatch.setattr(gpu_stages, "E2E_PARTS", (part,))
    monkeypatch.setattr(gpu_stages, "run_bench", lambda *a, **k: pytest.fail("a part past the budget ran"))
    data = gpu_stages.e2e_stage(tmp_path, "stem", tiny=False, budget_s=5)
    assert data["parts"]["ddim50-b64"]["status"] == "not reached"
    assert json.loads((tmp_path / "stem_e2e.json").read_text())["parts"]["ddim50-b64"]["status"] == "not reached"


def _bench(name, median_ms, **info):
    return {"name": name, "extra_info": {"median_ms": median_ms, **info}, "stats": {"median": median_ms / 1000}}


def test_thresholds_compare_the_measured_winner_with_the_routing_policy():
    ops = {"benchmarks": [
        _bench("test_attention_routes[a]", 1.0, timed="fastdiff-kernel", dtype="bfloat16", shape=[64, 1, 256, 256]),
        _bench("test_attention_routes[b]", 2.0, timed="sdpa-flash", dtype="bfloat16", shape=[64, 1, 256, 256]),
        _bench("test_attention_routes[c]", 3.0, timed="fastdiff-kernel", dtype="bfloat16", shape=[64, 1, 256, 512]),
        _bench("test_group_norm_split[d]", 0.5, timed="one program per group", layout="contiguous",
               shape=[1, 128, 32, 32], policy_slices_on_this_gpu=4),
        _bench("test_group_norm_split[e]", 0.2, timed="split groups", layout="contiguous", shape=[1, 128, 32, 32],
               policy_slices_on_this_gpu=4),
    ]}
    routes = gpu_stages.attention_routes(ops, capability=(9, 0))
    assert [(r["head_dim"], r["faster"], r["routed_now"], r["agrees"]) for r in routes] == [
        (256, "fastdiff-kernel", "sdpa-flash", False), (512, "fastdiff-kernel", "fastdiff-kernel", True)]
    split = gpu_stages.group_norm_split(ops, sm_count=132)
    assert [(r["faster"], r["policy"], r["agrees"]) for r in split] == [("split groups", "split groups", True)]
    assert split[0]["programs_per_sm"] == pytest.approx(32 / 132)


def test_kernel_rows_give_the_percent_of_measured_and_datasheet_peaks():
    env = {"probes": {"copy": {"bytes_per_s": 4e12}, "roof": {"bfloat16": {"roof_tflops": 800.0}}},
           "datasheet": gpu_stages.roofline.DATASHEET["h200"]}
    ops = {"benchmarks": [_bench("norm", 1.0, dtype="bfloat16", **{"GB/s": 2000.0}),
                          _bench("attn", 1.0, dtype="bfloat16", **{"TFLOP/s": 400.0})]}
    norm, attn = gpu_stages.kernel_rows(ops, env)
    assert norm["pct_measured_peak"] == pytest.approx(50.0)
    assert norm["pct_datasheet_peak"] == pytest.approx(100 * 2000 / 4800)
    assert attn["pct_measured_peak"] == pytest.approx(50.0)
    assert attn["pct_datasheet_peak"] == pytest.approx(100 * 400 / 989)


def test_tiny_diffusers_unet_skips_where_diffusers_is_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError, as on the GPU image
    with pytest.raises(pytest.skip.Exception):
        tiny_diffusers_unet()


def test_sampler_paths_pass_autotune_and_the_graphs_setting(monkeypatch):
    import fastdiff.sampling.sampler as sampler_module

    made = []

    class FakeSampler:
        def __init__(self, model, table, **kwargs):
            made.append(kwargs)

        def describe(self):
            return {}

    monkeypatch.setattr(sampler_module, "Sampler", FakeSampler)
    ctx = paths.BenchContext(torch.nn.Identity(), None, None, torch.device("cpu"), torch.float32, autotune=False)
    built = [paths.build_path(name, ctx) for name in ("fastdiff", "fastdiff-nographs")]
    assert [p.name for p in built] == ["fastdiff", "fastdiff-nographs"]
    assert [(k["autotune"], k["cuda_graphs"]) for k in made] == [(False, "auto"), (False, False)]


def test_results_folder_tables_the_gpu_run_e2e_parts_and_passes_over_its_other_files(tmp_path):
    bench_result = json.loads((REPO / "benchmarks/results/2026-11-21_cpu-epyc.json").read_text())
    (tmp_path / "2026-12-04_h200_gpu-run_environment.json").write_text(json.dumps({"device": "cuda"}))
    assert report.readme_section(tmp_path).startswith("_No results yet")
    e2e = {"schema": "fastdiff-gpu-run-e2e/1", "parts": {"ddim50-b64": {"status": "ok", "result": bench_result},
                                                         "ddim50-b1": {"status": "not reached"}}}
    (tmp_path / "2026-12-04_h200_gpu-run_e2e.json").write_text(json.dumps(e2e))
    section = report.readme_section(tmp_path)
    assert section.count("### ") == 1 and "### `2026-12-04_h200_gpu-run_e2e.json: ddim50-b64`" in section


@pytest.mark.parametrize("args, message", [
    (["--only", "nope"], "--only: unknown stage(s) ['nope']"),
    (["--budget", "e2e=abc"], "--budget 'e2e=abc': expected STAGE=SECONDS"),
    (["--only", "e2e", "--budget", "e2e=600"], "over the 570 s one device-tool command may take"),
    (["--parts", "ddim50-b7"], "--parts: unknown part(s) ['ddim50-b7']"),
])
def test_bad_options_are_refused_in_one_line_naming_the_option(tmp_path, capsys, args, message):
    assert gpu_run.main([str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_environment_stage_measures_the_probes_and_takes_the_commit_from_the_caller(monkeypatch):
    monkeypatch.setattr(gpu_stages.environment, "git_commit", lambda: {"commit": None, "dirty": None})
    monkeypatch.setenv("FASTDIFF_COMMIT", "abc123")  # the device tool's copy of the tree has no .git
    env = gpu_stages.environment_stage(tiny=True)
    assert env["git"] == {"commit": "abc123", "dirty": None, "source": "FASTDIFF_COMMIT"}
    assert env["probes"]["copy"]["bytes_per_s"] > 0
    assert set(env["probes"]["roof"]) == {"float32", "bfloat16"}


def test_run_sh_runs_the_module_from_any_folder(tmp_path):
    done = subprocess.run(["bash", str(REPO / "benchmarks/gpu/run.sh"), str(tmp_path / "out"), "--only", "nope"],
                          cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable, "FASTDIFF_WHEELS": str(tmp_path / "none")},
                          timeout=120)
    assert done.returncode == 2 and "gpu_run: --only: unknown stage(s) ['nope']" in done.stderr, done.stderr
