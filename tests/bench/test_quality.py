"""The speed-at-equal-quality benchmark (fastdiff bench --quality) on a tiny sweep of the built-in model."""
import json

import pytest

from fastdiff.bench import ode_error, quality
from fastdiff.schedulers import step_table

SWEEP = [("ddpm", 4), ("dpm++2m", 3), ("dpm++3m-sde", 3), ("ddim", 2), ("euler-a", 2)]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    quality.draw_sets(out, num_samples=12, chunk=6, sweep=SWEEP, progress=False)
    return out


def test_report_files_and_figures(drawn):
    report = quality.write_report(drawn, SWEEP)
    for name in ("quality.json", "quality.md", "quality.png"):
        assert (drawn / name).stat().st_size > 0
    assert sorted(p.name for p in (drawn / "grids").iterdir()) == sorted(f"{s}-{k}.png" for s, k in SWEEP)
    assert json.loads((drawn / "quality.json").read_text()) == json.loads(json.dumps(report))
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {f"{s}-{k}" for s, k in SWEEP} and report["missing"] == []
    anchor = report["anchor"]
    assert anchor["name"] == "ddpm-4" and anchor["band"][0] <= anchor["fd_heldout"] <= anchor["band"][1]
    assert rows["ddpm-4"]["within_anchor_band"] and rows["ddpm-4"]["fd_to_anchor"] == 0
    assert rows["ddpm-4"]["speedup_vs_anchor"] == 1.0
    assert [r["model_calls"] for r in report["rows"]] == [4, 3, 3, 2, 2]
    assert any(r["pareto"] for r in report["rows"])
    head = report["headline"]
    if head is not None:
        assert head["sampler"].startswith("dpm++") and rows[head["sampler"]]["within_anchor_band"]
    markdown = (drawn / "quality.md").read_text()
    assert "| dpm++2m-3 | 3 |" in markdown and "DDPM-4 FD" in markdown


def test_cached_sets_are_not_drawn_again(drawn):
    before = {p.name: p.stat().st_mtime_ns for p in (drawn / "sets").iterdir()}
    quality.draw_sets(drawn, num_samples=12, chunk=6, sweep=SWEEP, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (drawn / "sets").iterdir()} == before


def test_a_set_is_extended_by_chunks_and_redrawn_when_its_table_changed(drawn, tmp_path):
    import torch

    sweep = [("dpm++2m", 3)]
    quality.draw_sets(tmp_path, num_samples=6, chunk=6, sweep=sweep, progress=False)
    path = tmp_path / "sets" / "dpm++2m-3.pt"
    quality.draw_sets(tmp_path, num_samples=12, chunk=6, sweep=sweep, progress=False)
    extended = torch.load(path)
    whole = torch.load(drawn / "sets" / "dpm++2m-3.pt")
    assert torch.equal(extended["images"], whole["images"])  # chunk 1 seeded as in one 12-image draw
    assert extended["seconds"] > 0 and extended["coefs_sha256"] == whole["coefs_sha256"]
    extended["timesteps"] = [999, 500, 1]  # drawn by another schedule: not used
    torch.save(extended, path)
    quality.draw_sets(tmp_path, num_samples=12, chunk=6, sweep=sweep, progress=False)
    assert torch.load(path)["timesteps"] == whole["timesteps"]


def test_scoring_the_first_n_of_each_set(drawn):
    report = quality.analyse(drawn, SWEEP, num_samples=10)
    assert report["num_samples"] == 10 and all(r["num_samples"] == 10 for r in report["rows"])
    assert set(report["images_drawn_per_set"].values()) == {12}


def test_missing_anchor_is_an_error(drawn):
    with pytest.raises(ValueError, match="ddpm-7 set is not drawn yet"):
        quality.analyse(drawn, [("ddpm", 7), *SWEEP[1:]])


def test_pareto_front():
    rows = [
        {"name": "slow-good", "images_per_s": 1.0, "fd_heldout": 1.0},
        {"name": "fast-bad", "images_per_s": 10.0, "fd_heldout": 5.0},
        {"name": "dominated", "images_per_s": 0.5, "fd_heldout": 2.0},
        {"name": "middle", "images_per_s": 5.0, "fd_heldout": 2.0},
    ]
    assert quality.pareto_front(rows) == ["slow-good", "fast-bad", "middle"]


def test_headline_speedup_is_measured_on_the_scored_images(drawn):
    result = quality.measure_speedup(drawn, "dpm++2m", 3, num_samples=4, repeats=2, sweep=SWEEP,
                                     sampler_options={"compile": False})
    assert result["anchor"]["name"] == "ddpm-4" and result["accelerated"]["name"] == "dpm++2m-3"
    assert result["anchor"]["max_abs_vs_set"] < 1e-4 and result["accelerated"]["max_abs_vs_set"] < 1e-4
    assert len(result["accelerated"]["seconds_all"]) == 2 and result["speedup"] > 0
    assert quality.read_speedup(drawn, "dpm++2m-3") == json.loads(json.dumps(result))
    assert quality.read_speedup(drawn, "dpm++2m-3", num_samples=5) is None  # measured on 4 images
    assert quality.read_speedup(drawn, "dpm++3m-3") is None
    text = quality.render_speedup(result)
    assert "dpm++2m-3" in text and "faster at DDPM-4's quality" in text
    with pytest.raises(ValueError, match="first chunk"):
        quality.measure_speedup(drawn, "dpm++2m", 3, num_samples=7, sweep=SWEEP)


def test_tuned_rows_are_drawn_from_the_shipped_schedule_and_reported(tmp_path, monkeypatch):
    from fastdiff.schedulers.tuned import TunedSchedule

    shipped = {("dpm++2m", 3): TunedSchedule("dpm++2m", (999, 400, 60), 1000, "0" * 64)}
    monkeypatch.setattr(quality, "read_tuned_schedule", lambda info, sampler, calls: shipped.get((sampler, calls)))
    sweep = [("ddpm", 3), ("dpm++2m", 3, "default"), ("dpm++2m", 3, "tuned"), ("dpm++3m", 3, "tuned")]
    monkeypatch.setattr(quality, "TUNED_BAR", ("dpm++2m", 3, "default"))
    quality.draw_sets(tmp_path, num_samples=8, chunk=8, sweep=sweep, progress=False)
    model, schedule, shape = quality._built_in_model()
    x_T = ode_error.draw_x_T(shape, 4, seed=7)  # a 20-step 3M run stands in for the exact solution
    fine = ode_error.deterministic_images(model, step_table(schedule, "dpmsolver++", steps=20, order=3), x_T)
    ode = ode_error.ODEReference(x_T, fine.double(), 1, 0.0, "test", 7)
    report = quality.write_report(tmp_path, sweep, ode=ode, base="tuned")
    rows = {r["name"]: r for r in report["rows"]}
    assert report["missing"] == [] and report["no_tuned_schedule"] == ["dpm++3m-3-tuned"]  # none ships: not drawn
    assert rows["dpm++2m-3-tuned"]["timesteps"] == [999, 400, 60] and rows["dpm++2m-3-tuned"]["schedule"] == "tuned"
    assert rows["dpm++2m-3"]["timesteps"] == [999, 666, 333]
    assert all(0 <= r["precision"] <= 1 and r["precision_band"][0] <= r["precision_band"][1] for r in rows.values())
    assert report["fewest_calls_at_bar"]["bar"] == "dpm++2m-3"
    for row in rows.values():
        assert row["fd_to_anchor_band"][0] <= row["fd_to_anchor"] <= row["fd_to_anchor_band"][1]
    fewest = report["fewest_calls_at_bar"]
    if fewest["row"] == "dpm++2m-3":  # the bar against itself
        assert fewest["difference_band"] == [0.0, 0.0]
    elif fewest["row"] is not None:
        assert fewest["difference_band"][0] <= rows[fewest["row"]]["fd_to_anchor"] - rows["dpm++2m-3"]["fd_to_anchor"]
    assert rows["ddpm-3"]["ode_error"] is None and rows["dpm++2m-3"]["ode_error"] > 0  # noisy rows have none
    accurate = min((rows["dpm++2m-3"], rows["dpm++2m-3-tuned"]), key=lambda r: r["ode_error"])
    assert report["most_accurate"]["name"] == accurate["name"]
    markdown = (tmp_path / "tuned.md").read_text()
    assert "No tuned schedule ships for: dpm++3m-3-tuned." in markdown
    assert markdown.count("| dpm++2m-3") == 2 and f"The most accurate deterministic row, {accurate['name']}" in markdown
