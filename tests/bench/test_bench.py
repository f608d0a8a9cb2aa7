"""`fastdiff bench`: the --quick smoke run (structure, every path sampled; never a speed),
bad input refused before any work, failing paths reported, and the pieces the figures rest on
(weight conversion, noise replay, FLOP counting, statistics, memory meter, writers)."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from fastdiff.bench import harness, paths, report
from fastdiff.bench.diffusers_peer import ConversionError, conversion_error, to_unet2d
from fastdiff.bench.roofline import attention_flops, count_forward_flops
from fastdiff.cli import main
from fastdiff.models.unet import UNet, UNetConfig
from fastdiff.sampling import draw_noise
from fastdiff.schedulers import linear_schedule, step_table

ALL_PATHS = ("reference", "compile", "fastdiff", "diffusers")


def _run_cli(tmp_path, *args):
    return main(["bench", "--quick", "--no-progress", "--out", str(tmp_path), *args])


def _only_json(folder):
    files = list(folder.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One real `fastdiff bench --quick` with every path (compiles included: the slow test here)."""
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--quick", "--no-progress", "--out", str(out)])
    return code, out


def test_quick_run_writes_complete_json_and_plot(quick_run, capsys):
    code, out = quick_run
    assert code == 0
    result = _only_json(out)
    assert list(out.glob("*.png")), "no plot written"
    assert result["schema"] == harness.SCHEMA
    env = result["environment"]
    for key in ("python", "packages", "device_name", "cpu_model", "git", "command_line", "timestamp_utc"):
        assert key in env, key
    assert env["packages"]["torch"] is not None and env["device"] in ("cpu", "cuda")
    assert set(result["phase_seconds"]) == {"roof_and_flops", "build_paths", "measure"}
    assert result["roofline"]["float32"]["roof_tflops"] > 0
    assert result["flops"]["per_image_sample"] == result["flops"]["per_forward_per_image"]["total"] * 2
    assert set(result["paths"]) == set(ALL_PATHS)


def test_quick_run_every_path_produced_samples_on_the_same_noise(quick_run):
    result = _only_json(quick_run[1])
    for name in ALL_PATHS:
        assert result["paths"][name]["status"] == "ok", (name, result["paths"][name])
    rows = {row["path"]: row for row in result["results"]}
    assert set(rows) == set(ALL_PATHS)
    for name, row in rows.items():
        assert row["samples_shape"] == [2, 3, 16, 16] and row["samples_finite"], name
        assert len(row["times_s"]) == result["settings"]["repeats"] and row["warmup_s"] > 0
        assert row["ms_per_step"]["p10"] <= row["ms_per_step"]["median"] <= row["ms_per_step"]["p90"]
        # Same weights, same noise, fp32: every path reproduces the reference's images.
        assert row["fidelity_vs_reference"]["max_abs"] < 1e-3, name
    assert math.isinf(rows["reference"]["fidelity_vs_reference"]["psnr_db"])
    assert rows["reference"]["speedup_vs_reference"] == pytest.approx(1.0)
    assert result["paths"]["diffusers"]["info"]["conversion_max_abs_eps_diff"] < 1e-4


@pytest.mark.parametrize("args, message", [
    (("--paths", "reference,warp"), "unknown ['warp']"),
    (("--batch", "0"), "batch must be >= 1"),
    (("--repeats", "0"), "--repeats: must be >= 1"),
    (("--paths", "reference,reference"), "listed twice"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    assert _run_cli(out, *args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_absent_device_is_refused(tmp_path, capsys):
    assert _run_cli(tmp_path / "never", "--device", "cuda") == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_missing_diffusers_is_reported_skipped_and_json_still_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)  # import diffusers -> ImportError
    assert _run_cli(tmp_path, "--paths", "reference,diffusers") == 0
    result = _only_json(tmp_path)
    assert result["paths"]["reference"]["status"] == "ok"
    assert result["paths"]["diffusers"] == {"status": "skipped", "reason": result["paths"]["diffusers"]["reason"]}
    assert "diffusers is not installed" in result["paths"]["diffusers"]["reason"]
    assert [row["path"] for row in result["results"]] == ["reference"]
    assert "diffusers: skipped: diffusers is not installed" in capsys.readouterr().out


def _fake_builder(calls: list, fail: set = frozenset()):
    def build(name, ctx):
        def run(noise, class_labels):
            calls.append(name)
            if name in fail:
                raise RuntimeError(f"{name} broke")
            return paths.to_unit(noise.x_T)

        return paths.BenchPath(name, f"fake {name}", torch.float32, run)

    return build


def test_paths_are_interleaved_and_rotated_across_rounds(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(harness, "build_path", _fake_builder(calls))
    settings = harness.BenchSettings(quick=True, paths=("reference", "compile", "fastdiff"), repeats=3, batches=(1,))
    result = harness.run_bench(settings, progress=False)
    warmups, rounds = calls[:3], calls[3:]
    assert warmups == ["reference", "compile", "fastdiff"]
    assert rounds == ["reference", "compile", "fastdiff", "compile", "fastdiff", "reference",
                      "fastdiff", "reference", "compile"]
    assert all(len(row["times_s"]) == 3 for row in result["results"])


def test_a_path_failing_mid_run_is_skipped_and_the_others_finish(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(harness, "build_path", _fake_builder(calls, fail={"compile"}))
    settings = harness.BenchSettings(quick=True, paths=("reference", "compile"), repeats=2, batches=(1, 2))
    result = harness.run_bench(settings, progress=False)
    assert result["paths"]["compile"]["status"] == "skipped"
    assert "failed at batch 1 (warm-up): RuntimeError: compile broke" in result["paths"]["compile"]["reason"]
    assert calls.count("compile") == 1  # never retried
    assert [(r["path"], r["batch"]) for r in result["results"]] == [("reference", 1), ("reference", 2)]


# ---- the pieces -----------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    UNetConfig.tiny(),
    UNetConfig(image_size=8, in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(4,), num_heads=2, num_groups=8, num_classes=10),  # 2 heads, class labels
], ids=["tiny", "two-heads-class-conditioned"])
def test_converted_unet2d_matches_the_fastdiff_unet(config):
    torch.manual_seed(0)
    model = UNet(config).eval()
    assert conversion_error(model, to_unet2d(model)) < 1e-4


def test_unconvertible_unet_is_refused_with_the_reason():
    config = dataclasses.replace(UNetConfig.tiny(), ch_mult=(2, 2))
    with pytest.raises(ConversionError, match="ch_mult"):
        to_unet2d(UNet(config))


def test_diffusers_ddpm_pipeline_replays_the_shared_noise():
    """DDPM draws noise at every step: equal samples prove the replay feeds x_T, z[0], z[1], ..."""
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny()).eval()
    schedule = linear_schedule()
    table = step_table(schedule, "ddpm", steps=3)
    ctx = paths.BenchContext(model, schedule, table, torch.device("cpu"), torch.float32)
    noise = draw_noise(table, (2, 3, 16, 16), seed=1)
    ours = paths.build_path("reference", ctx).run(noise, None)
    theirs = paths.build_path("diffusers", ctx).run(noise, None)
    assert (ours - theirs).abs().max() < 1e-4
    other = paths.build_path("diffusers", ctx).run(draw_noise(table, (2, 3, 16, 16), seed=2), None)
    assert (ours - other).abs().max() > 0.1  # the noise matters, so the match above is not vacuous


def test_flop_count_adds_attention_by_hand():
    model = UNet(UNetConfig.tiny()).eval()  # attention at 8x8 (C=64): down, mid, two up blocks
    flops = count_forward_flops(model, (torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.int64)))
    assert flops["attention_by_hand"] == 4 * attention_flops(64, 64, 1) == 4 * 4 * 64**2 * 64
    assert flops["total"] == flops["flop_counter_total"] - flops["flop_counter_sdpa"] + flops["attention_by_hand"]
    assert flops["flop_counter_total"] > 0


def test_spread_and_fidelity():
    assert harness.spread([4.0, 1.0, 3.0, 2.0, 5.0]) == {"median": 3.0, "p10": 1.4, "p90": 4.6, "n": 5}
    a = torch.zeros(1, 1, 2, 2)
    b = a.clone()
    b[0, 0, 0, 0] = 0.2
    fid = harness.fidelity(b, a)
    assert fid["max_abs"] == pytest.approx(0.2)
    assert fid["psnr_db"] == pytest.approx(-10 * math.log10(0.04 / 4))


def test_cpu_memory_meter_sees_a_call_peak():
    meter = harness.MemoryMeter(torch.device("cpu"))
    base = meter.start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del block
    assert meter.peak() - base >= 48 * 2**20 or meter.kind == "cpu_peak_rss_lifetime"


def test_cpu_telemetry_samples_during_a_call():
    import time

    from fastdiff.bench.telemetry import Telemetry, summarize

    telemetry = Telemetry("cpu")
    assert telemetry.kind == "cpu" and telemetry.static()["source"] == "psutil"
    with telemetry.record() as recording:
        time.sleep(0.2)
    summary = summarize(recording.samples)
    assert summary["samples"] >= 2 and 0 <= summary["cpu_util_pct"]["mean"] <= 100


def test_settings_resolve_defaults_per_device():
    resolved = harness.BenchSettings(device="cpu").resolved()
    assert resolved.batches == harness.DEFAULTS["cpu"].batches and resolved.steps == harness.DEFAULTS["cpu"].steps
    with pytest.raises(ValueError, match="sampler"):
        harness.BenchSettings(device="cpu", sampler="heun").resolved()
    with pytest.raises(TypeError, match="batch"):
        harness.BenchSettings(device="cpu", batches=(1.5,)).resolved()
    with pytest.raises(ValueError, match="threads"):
        harness.BenchSettings(device="cpu", threads=0).resolved()


def test_busy_machine_is_flagged_in_the_report():
    result = {"environment": {"device": "cpu", "logical_cpus": 2, "torch_threads": 2},
              "load": {"loadavg_before": [0.2, 0, 0], "loadavg_after": [0.4, 0, 0]}}
    assert report.busy_warning(result) is None
    result["load"]["loadavg_after"][0] = 3.5
    assert "load average up to 3.5 on 2 logical CPUs" in report.busy_warning(result)


def test_readme_section_is_rebuilt_from_the_results_folder(quick_run, tmp_path):
    result = _only_json(quick_run[1])
    results = tmp_path / "results"
    results.mkdir()
    (results / "2026-01-01_cpu-test.json").write_text(json.dumps(result))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold\n{report.README_END}\noutro\n")
    report.update_readme(readme, results)
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro") and text.endswith("outro\n")
    assert "2026-01-01_cpu-test.json" in text and "reference (eager fp32)" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        report.update_readme(readme, results)


def test_fastdiff_label_names_the_attention_routes():
    described = {"compiled": True, "kernels": "triton", "cuda_graphs": True, "dtype": "bfloat16",
                 "attention": ["sdpa-flash (D=256, bfloat16)", "fastdiff-kernel (D=512, bfloat16)",
                               "sdpa-flash (D=64, bfloat16)"]}
    label = paths.fastdiff_label(described)
    assert label == ("fastdiff Sampler (compiled, ops: triton, CUDA graphs, attention: fastdiff-kernel+sdpa-flash, "
                     "bfloat16)")
    assert "attention" not in paths.fastdiff_label({**described, "attention": []})
