"""Speed at equal quality: samplers x steps on the shipped digits model, FD against images/s.

``fastdiff bench --quality`` draws one set of N samples per (sampler, steps) of :data:`SWEEP`,
all from the same seeds (the same x_T: common random numbers, so differences between samplers
are not drowned by sampling noise), times each set end to end, and scores it by the Fréchet
distance to the held-out real digits in :mod:`fastdiff.bench.fidelity`'s feature space.

DDPM-1000's noise band (the anchor, the sweep's first entry): its FD comes with a bootstrap band (``BOOTSTRAPS`` resamples of its N
samples, the basic bootstrap interval at ``fidelity.NOISE_QUANTILE``); a sampler "reaches
DDPM-1000's quality" when its FD is at most the band's upper edge. The FD between each set and
the DDPM-1000 set is reported beside it.

Each set is cached as it finishes (``sets/<name>.pt``: images, seconds, load average), so a run
can be resumed and the sweep's slow part done once; the report files are written from the
cache: ``quality.json``, ``quality.md``, ``quality.png`` (FD against images/s, Pareto front)
and ``grids/<name>.png``.

The headline (:func:`measure_speedup`, ``speedup.json``): the fewest-call DPM-Solver++ set
inside the band, run by fastdiff's accelerated :class:`~fastdiff.Sampler`, against the
reference DDPM-1000 sampler, both timed in one process on the same first images of the sweep.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from fastdiff.bench.fidelity import (
    NOISE_QUANTILE,
    DigitsFeatures,
    draw_in_chunks,
    frechet_distance,
    precision_recall,
)
from fastdiff.bench.ode_error import (
    EVALUATION_SEED,
    EVALUATION_SIZE,
    ODEReference,
    deterministic_images,
    reference_solution,
    rms,
)
from fastdiff.files import atomic_write
from fastdiff.images import save_grid_png
from fastdiff.models.folders import load_model, read_tuned_schedule
from fastdiff.presets import sampler_kwargs
from fastdiff.sampling import ExternalNoise, draw_noise, sample_reference
from fastdiff.sampling.sampler import Sampler
from fastdiff.schedulers import make_schedule, step_table
from fastdiff.training.data import load_digits_dataset

#: (--sampler name, steps) in the order they are drawn; the first is the anchor every other is
#: compared with (DDPM-1000, the reference sampler).
SWEEP = (
    [("ddpm", 1000)]
    + [(name, steps) for name in ("dpm++2m", "dpm++3m") for steps in (5, 8, 10, 15, 20, 25)]
    + [("ddim", steps) for steps in (10, 20, 50, 100)]
    + [("dpm++2m-sde", 20), ("dpm++2m-sde", 50)]
    + [(name, steps) for name in ("euler", "euler-a") for steps in (10, 20, 50)]
    + [("unipc", steps) for steps in (5, 8, 10, 15, 20, 25)]
)
#: Default against tuned timesteps (``fastdiff bench --quality --tuned``): DDPM-1000 (the anchor),
#: then DPM-Solver++ 2M/3M and UniPC at these calls with the default spacing and with the
#: built-in model's tuned schedule (``schedules/<sampler>-<K>.json``) where it ships one.
TUNED_CALLS = (4, 5, 6, 8, 10)
TUNED_SAMPLERS = ("dpm++2m", "dpm++3m", "unipc")
#: Last, a near-exact ODE solution (ode_error ~10x under the others'): the FD to the DDPM-1000
#: set that deterministic samplers converge to, at this N.
TUNED_SWEEP = [("ddpm", 1000)] + [
    (name, calls, kind) for name in TUNED_SAMPLERS for calls in TUNED_CALLS for kind in ("default", "tuned")
] + [("dpm++3m", 50, "default")]
#: The bar of the tuned comparison's FD to DDPM-1000: this default set's, measured in the same run.
TUNED_BAR = ("dpm++3m", 8, "default")
BOOTSTRAPS = 200
GRID_IMAGES = 64


def set_name(sampler: str, steps: int, timesteps: str = "default") -> str:
    return f"{sampler}-{steps}" + ("" if timesteps == "default" else f"-{timesteps}")


def sweep_table(schedule, sampler: str, steps: int, timesteps: str = "default"):
    """The StepTable of a sweep entry; ``timesteps`` "tuned": the built-in model's tuned schedule
    (None when it ships none for this sampler and steps)."""
    if timesteps == "default":
        return step_table(schedule, steps=steps, **sampler_kwargs(sampler))
    tuned = read_tuned_schedule(load_model()[1], sampler, steps)
    return None if tuned is None else step_table(schedule, timesteps=list(tuned.timesteps), **sampler_kwargs(sampler))


def _built_in_model():
    """(the built-in digits model, its NoiseSchedule, its (C, H, W) image shape)."""

    model, info = load_model()
    shape = (info.config.in_channels, info.config.image_size, info.config.image_size)
    return model, make_schedule(info.schedule, info.num_timesteps), shape


def draw_sets(out: Path, num_samples: int, chunk: int, seed: int = 0, sweep=SWEEP, progress: bool = True) -> None:
    """Draw (or find cached) every set of ``sweep`` with the eager reference sampler.

    A set is saved after each chunk, so a killed run resumes at its last chunk; a cached set is
    used only when it was drawn by the same table (timesteps and rows), chunk and seed, and a
    smaller one is extended by the chunks it lacks (its time and CPU time add up)."""

    model, schedule, shape = _built_in_model()
    (out / "sets").mkdir(parents=True, exist_ok=True)
    for entry in sweep:
        table = sweep_table(schedule, *entry)
        if table is None:
            continue
        path = out / "sets" / f"{set_name(*entry)}.pt"
        record = _matching_record(path, table, chunk, seed)
        if record is not None and record["images"].shape[0] >= num_samples:
            continue
        if record is not None and record["images"].shape[0] % chunk:
            record = None  # a partial last chunk: the next chunk's seed would not follow it

        def draw(batch: int, chunk_seed: int) -> torch.Tensor:
            return sample_reference(model, table, (batch, *shape), seed=chunk_seed)

        if record is None:
            record = {"sampler": entry[0], "steps": entry[1], "timesteps": table.timesteps.tolist(),
                      "coefs_sha256": _coefs_digest(table), "model_calls": table.num_steps,
                      "images": torch.zeros((0, *shape)), "seconds": 0.0, "cpu_seconds": 0.0, "chunk": chunk,
                      "seed": seed, "torch_threads": torch.get_num_threads(), "load_before": os.getloadavg(),
                      "path": "fastdiff.sampling.reference.sample_reference (eager PyTorch, float32, CPU)"}
        while record["images"].shape[0] < num_samples:
            done = record["images"].shape[0]
            start, cpu_start = time.perf_counter(), time.process_time()
            images = draw_in_chunks(draw, min(chunk, num_samples - done), chunk, seed + done // chunk)
            record["seconds"] += time.perf_counter() - start
            record["cpu_seconds"] += time.process_time() - cpu_start
            record["images"] = torch.cat([record["images"], images])
            record["load_after"] = os.getloadavg()
            atomic_write(path, lambda tmp: torch.save(record, tmp))
        if progress:
            print(f"{set_name(*entry)}: {num_samples} images in {record['seconds']:.1f} s "
                  f"(load {record['load_before'][0]:.1f} -> {record['load_after'][0]:.1f})", flush=True)


def _coefs_digest(table) -> str:
    return hashlib.sha256(table.coefs.contiguous().numpy().tobytes()).hexdigest()


def _matching_record(path: Path, table, chunk: int, seed: int) -> dict | None:
    """The cached set at ``path`` when it was drawn by ``table`` with this chunk and seed, else None."""
    if not path.exists():
        return None
    record = torch.load(path)
    same = (record.get("timesteps") == table.timesteps.tolist() and record.get("coefs_sha256") == _coefs_digest(table)
            and record.get("chunk") == chunk and record.get("seed") == seed)
    return record if same else None


def _first_noise(table, shape, num_samples: int, chunk: int, seed: int):
    """The noise of the first ``num_samples`` images of a set drawn by :func:`draw_sets` (chunk 0)."""
    if num_samples > chunk:
        raise ValueError(f"num_samples ({num_samples}) must fit in the sets' first chunk ({chunk})")
    noise = draw_noise(table, (chunk, *shape), seed)
    return ExternalNoise(noise.x_T[:num_samples], noise.z[:, :num_samples])


def measure_speedup(out: Path, sampler: str, steps: int, num_samples: int = 100, repeats: int = 5,
                    sweep=SWEEP, sampler_options: dict | None = None) -> dict:
    """Time, in one process, the reference DDPM-1000 sampler (the anchor: eager fp32) and
    fastdiff's accelerated Sampler running ``sampler``-``steps`` on the first ``num_samples``
    images of the cached sets, and check each against its set (the scored images). The Sampler's
    compile is timed apart; its sampling time is the median of ``repeats`` runs.
    ``sampler_options``: extra :class:`~fastdiff.Sampler` arguments (default: none, its defaults)."""

    model, schedule, shape = _built_in_model()
    sets = {}
    for name in (set_name(*sweep[0]), set_name(sampler, steps)):
        path = out / "sets" / f"{name}.pt"
        if not path.exists():
            raise ValueError(f"the {name} set is not drawn yet: draw the sweep first")
        sets[name] = torch.load(path)
    anchor_name, fast_name = set_name(*sweep[0]), set_name(sampler, steps)
    anchor_set = sets[anchor_name]
    chunk, seed = anchor_set["chunk"], anchor_set["seed"]
    load_before = os.getloadavg()

    anchor_table = step_table(schedule, steps=sweep[0][1], **sampler_kwargs(sweep[0][0]))
    noise = _first_noise(anchor_table, shape, num_samples, chunk, seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    reference_images = sample_reference(model, anchor_table, noise=noise)
    anchor_seconds, anchor_cpu = time.perf_counter() - start, time.process_time() - cpu_start

    table = step_table(schedule, steps=steps, **sampler_kwargs(sampler))
    noise = _first_noise(table, shape, num_samples, chunk, seed)
    fast = Sampler(model, table, **(sampler_options or {}))
    warmup_seconds = fast.warmup(num_samples, external_noise=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        images = fast.sample(noise=noise)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    described = fast.describe()

    def max_abs(images, record):
        return float((images.float() - record["images"][:num_samples]).abs().max())

    result = {
        "num_samples": num_samples, "torch_threads": torch.get_num_threads(),
        "load_before": load_before[0], "load_after": os.getloadavg()[0],
        "anchor": {"name": anchor_name, "path": anchor_set["path"], "seconds": anchor_seconds, "cpu_seconds": anchor_cpu,
                   "images_per_s": num_samples / anchor_seconds, "max_abs_vs_set": max_abs(reference_images, anchor_set)},
        "accelerated": {"name": fast_name, "path": described["path"], "engine": described["engine"],
                        "warmup_seconds": warmup_seconds, "seconds": seconds, "seconds_all": times,
                        "images_per_s": num_samples / seconds, "max_abs_vs_set": max_abs(images, sets[fast_name])},
        "speedup": anchor_seconds / seconds,
    }
    text = json.dumps(result, indent=2) + "\n"
    atomic_write(out / "speedup.json", lambda tmp: tmp.write_text(text))
    return result


def read_speedup(out: Path, name: str, num_samples: int | None = None) -> dict | None:
    """``speedup.json`` if it measured the set ``name`` (on ``num_samples`` images, when given)."""
    path = out / "speedup.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if result["accelerated"]["name"] != name or num_samples not in (None, result["num_samples"]):
        return None
    return result


def ensure_speedup(out: Path, num_samples: int = 100, sweep=SWEEP, scored: int | None = None) -> dict | None:
    """The headline's speedup: measured unless ``speedup.json`` already holds it (None when no
    DPM-Solver++ set is inside the band)."""
    report = analyse(out, sweep, scored)
    head = report["headline"]
    if head is None:
        return None
    return read_speedup(out, head["sampler"], num_samples) or measure_speedup(
        out, head["solver"], head["steps"], num_samples, sweep=sweep
    )


def bootstrap_band(features: np.ndarray, target: np.ndarray, fd: float, seed: int = 0,
                   paired: bool = False) -> tuple[float, float]:
    """Basic bootstrap interval of FD(features, target) at the fidelity noise quantile.
    ``paired``: ``target`` is a sample set drawn from the same x_T (the DDPM-1000 set), resampled
    with the same rows; otherwise it is held fixed (the real digits)."""
    rng = np.random.default_rng(seed)
    n = features.shape[0]
    draws = []
    for _ in range(BOOTSTRAPS):
        rows = rng.integers(0, n, n)
        draws.append(frechet_distance(features[rows], target[rows] if paired else target))
    median = float(np.median(draws))
    low, high = np.quantile(draws, [1 - NOISE_QUANTILE, NOISE_QUANTILE])
    return float(max(fd - (high - median), 0.0)), float(fd + (median - low))


def pareto_front(rows: list[dict]) -> list[str]:
    """Names of the rows no other row beats on both images/s (higher) and FD (lower)."""
    front = []
    for row in rows:
        dominated = any(
            o["images_per_s"] >= row["images_per_s"] and o["fd_heldout"] <= row["fd_heldout"]
            and (o["images_per_s"] > row["images_per_s"] or o["fd_heldout"] < row["fd_heldout"])
            for o in rows
        )
        if not dominated:
            front.append(row["name"])
    return front


def bootstrap_interval(statistic, n: int, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (BOOTSTRAPS resamples of n rows, NOISE_QUANTILE) of ``statistic(rows)``."""
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(rng.integers(0, n, n)) for _ in range(BOOTSTRAPS)])
    low, high = np.quantile(draws, [1 - NOISE_QUANTILE, NOISE_QUANTILE], axis=0)
    return low.tolist(), high.tolist()


def _ode_error(model, schedule, entry, ode: ODEReference | None):
    """ode_error of a deterministic sweep entry on the evaluation set; None for a noisy one."""
    table = sweep_table(schedule, *entry)
    if ode is None or table is None or bool(table.coefs[:, 5].ne(0).any()):
        return None
    return rms(deterministic_images(model, table, ode.x_T), ode.solution)


def analyse(out: Path, sweep=SWEEP, num_samples: int | None = None, ode: ODEReference | None = None) -> dict:
    """The report of every cached set of ``sweep`` (those not drawn yet are listed as missing).
    ``num_samples``: score only the first n images of each set (all sets then compare at the
    same n; images/s stays that of the whole set as drawn). ``ode``: the evaluation set's ODE
    reference; deterministic rows then report their ode_error on it."""

    features = DigitsFeatures.fit()
    heldout = features.features(load_digits_dataset("heldout").images)
    model, schedule, _ = _built_in_model()
    records = {}
    for entry in sweep:
        path = out / "sets" / f"{set_name(*entry)}.pt"
        if path.exists():
            record = torch.load(path)
            record["scored"] = record["images"][:num_samples]
            record["entry"] = entry
            records[set_name(*entry)] = record
    sizes = {rec["scored"].shape[0] for rec in records.values()}
    if len(sizes) > 1:
        raise ValueError(f"the sets hold different numbers of images {sorted(sizes)}: pass num_samples")
    anchor = set_name(*sweep[0])
    if anchor not in records:
        raise ValueError(f"the {anchor} set is not drawn yet: nothing to compare against")
    anchor_features = features.features(records[anchor]["scored"])
    anchor_fd = frechet_distance(anchor_features, heldout)
    band = bootstrap_band(anchor_features, heldout, anchor_fd)
    anchor_seconds = records[anchor]["seconds"]
    rows, row_features = [], {}
    for name, rec in records.items():
        f = row_features[name] = features.features(rec["scored"])
        fd, fd_to_anchor = frechet_distance(f, heldout), frechet_distance(f, anchor_features)
        precision, recall = precision_recall(heldout, f)
        pr_band = bootstrap_interval(lambda rows: precision_recall(heldout, f, rows=rows), f.shape[0])
        rows.append({
            "name": name, "sampler": rec["sampler"], "steps": rec["steps"], "model_calls": rec["model_calls"],
            "timesteps": rec.get("timesteps"), "schedule": rec["entry"][2] if len(rec["entry"]) > 2 else "default",
            "fd_heldout_band": list(bootstrap_band(f, heldout, fd)),
            "precision": precision, "recall": recall, "precision_band": [pr_band[0][0], pr_band[1][0]],
            "recall_band": [pr_band[0][1], pr_band[1][1]], "ode_error": _ode_error(model, schedule, rec["entry"], ode),
            "num_samples": rec["scored"].shape[0], "cpu_seconds": rec.get("cpu_seconds"), "fd_heldout": fd,
            "fd_to_anchor": fd_to_anchor, "fd_to_anchor_band": list(bootstrap_band(f, anchor_features, fd_to_anchor,
                                                                                   paired=True)),
            "within_anchor_band": bool(fd <= band[1]), "seconds": rec["seconds"], "images_per_s": rec["images"].shape[0] / rec["seconds"],
            "speedup_vs_anchor": anchor_seconds / rec["seconds"], "load_before": rec["load_before"][0],
            "load_after": rec["load_after"][0], "label_histogram": features.label_histogram(rec["scored"]),
            "note": rec.get("note", ""),
        })
    front = pareto_front(rows)
    for row in rows:
        row["pareto"] = row["name"] in front
    bar = next((r for r in rows if r["name"] == set_name(*TUNED_BAR)), None)
    reaching = [] if bar is None else [r for r in rows if r["within_anchor_band"] and r["name"] != anchor
                                       and r["fd_to_anchor"] <= bar["fd_to_anchor"]]
    fewest = min(reaching, key=lambda r: (r["model_calls"], r["fd_to_anchor"])) if reaching else None
    if fewest is not None:  # how sure "no worse than the bar" is: rows resampled alike in all three sets
        fewest["fd_to_anchor_minus_bar_band"] = list(bootstrap_interval(
            lambda rows: frechet_distance(row_features[fewest["name"]][rows], anchor_features[rows])
            - frechet_distance(row_features[bar["name"]][rows], anchor_features[rows]), anchor_features.shape[0]))
    dpm = [r for r in rows if r["sampler"].startswith("dpm++") and r["within_anchor_band"]]
    best = min(dpm, key=lambda r: (r["model_calls"], r["seconds"])) if dpm else None
    # entries without a set: not drawn yet, or a tuned entry with no schedule (a folder read per entry)
    absent = {set_name(*entry): sweep_table(schedule, *entry) is not None
              for entry in sweep if set_name(*entry) not in records}
    with_error = [r for r in rows if r["ode_error"] is not None]
    most_accurate = min(with_error, key=lambda r: r["ode_error"]) if with_error else None
    first = next(iter(records.values()))
    return {
        "schema": "fastdiff-quality/1",
        "model": "fastdiff/weights/digits (built-in)",
        "path": first["path"],
        "torch_threads": first["torch_threads"],
        "num_samples": first["scored"].shape[0],
        "images_drawn_per_set": {name: rec["images"].shape[0] for name, rec in records.items()},
        "seed": first["seed"],
        "feature_space": f"hidden layer of a digits MLP (held-out accuracy {features.heldout_accuracy:.3f})",
        "heldout_real": int(heldout.shape[0]),
        "anchor": {"name": anchor, "fd_heldout": anchor_fd, "band": list(band), "bootstraps": BOOTSTRAPS,
                     "quantile": NOISE_QUANTILE},
        "missing": [name for name, has_table in absent.items() if has_table],
        "no_tuned_schedule": [name for name, has_table in absent.items() if not has_table],
        "ode_evaluation": None if ode is None else {"size": ode.x_T.shape[0], "seed": ode.seed, "stride": ode.stride,
                                                    "change_at_double_step": ode.change_at_double_step},
        "headline": None if best is None else {
            "sampler": best["name"], "solver": best["sampler"], "steps": best["steps"],
            "model_calls": best["model_calls"], "fd_heldout": best["fd_heldout"],
            "speedup_vs_anchor": best["speedup_vs_anchor"],
            "model_call_ratio": records[anchor]["model_calls"] / best["model_calls"],
            "measured": read_speedup(out, best["name"]),
        },
        "fewest_calls_at_bar": None if bar is None else {
            "bar": bar["name"], "bar_fd_to_anchor": bar["fd_to_anchor"],
            "row": None if fewest is None else fewest["name"],
            "model_calls": None if fewest is None else fewest["model_calls"],
            "difference_band": None if fewest is None else fewest["fd_to_anchor_minus_bar_band"],
        },
        "most_accurate": None if most_accurate is None else {
            key: most_accurate[key] for key in ("name", "ode_error", "fd_heldout", "fd_to_anchor", "fd_to_anchor_band")
        },
        "rows": rows,
    }


def render_markdown(report: dict) -> str:
    anchor = report["anchor"]
    name, band = anchor["name"].upper(), anchor["band"]
    lines = [
        f"# Speed at equal quality: {report['model']}",
        "",
        f"N = {report['num_samples']} samples per sampler scored (seed {report['seed']}, same x_T for all), drawn with "
        f"{report['path']}, {report['torch_threads']} torch threads. FD: Fréchet distance to the "
        f"{report['heldout_real']} held-out real digits in the {report['feature_space']}. {name} FD "
        f"{anchor['fd_heldout']:.3f}, noise band [{band[0]:.3f}, {band[1]:.3f}] (basic bootstrap, "
        f"{anchor['bootstraps']} resamples, q{round(100 * anchor['quantile'])}). "
        "Timings are wall seconds on a shared 2-core CPU; load average (1 min) before/after each set is listed; "
        "CPU s: the process's CPU seconds for the set (all threads), which other work does not inflate.",
        "",
        f"| sampler | model calls | FD to held-out [band] | within {name} band | FD to {name} set [band] | precision [band] | "
        f"recall [band] | ode_error | images/s | speedup vs {name} | CPU s | Pareto | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(report["rows"], key=lambda r: (r["sampler"], r["steps"], r["schedule"])):
        ode = "" if r["ode_error"] is None else f"{r['ode_error']:.4f}"
        lines.append(
            f"| {r['name']} | {r['model_calls']} | {r['fd_heldout']:.3f} {_band(r['fd_heldout_band'])} | "
            f"{'yes' if r['within_anchor_band'] else 'no'} | {r['fd_to_anchor']:.3f} {_band(r['fd_to_anchor_band'])} | "
            f"{r['precision']:.3f} {_band(r['precision_band'])} | {r['recall']:.3f} {_band(r['recall_band'])} | "
            f"{ode} | "
            f"{r['images_per_s']:.3f} | {r['speedup_vs_anchor']:.1f}x | "
            f"{'' if r['cpu_seconds'] is None else round(r['cpu_seconds'])} | "
            f"{'*' if r['pareto'] else ''} | {r['load_before']:.1f}/{r['load_after']:.1f} |"
        )
    if report["ode_evaluation"]:
        ode = report["ode_evaluation"]
        lines += ["", f"ode_error: RMS difference to the model's exact ODE solution (float64 DPM-Solver++(3M) over "
                      f"every timestep; halving its step above t = 100 changes it by "
                      f"{ode['change_at_double_step']:.1e}) on {ode['size']} evaluation x_T (seed {ode['seed']}, "
                      "disjoint from the sets above and from tuning)."]
    fewest = report["fewest_calls_at_bar"]
    if fewest:
        found = "no row" if fewest["row"] is None else (
            f"**{fewest['row']}** ({fewest['model_calls']} calls; its FD to the {name} set minus the bar's, "
            f"paired bootstrap: [{fewest['difference_band'][0]:.3f}, {fewest['difference_band'][1]:.3f}])")
        lines += ["", f"Fewest calls with FD to held-out inside {name}'s band and FD to the {name} set no worse than "
                      f"{fewest['bar']}'s ({fewest['bar_fd_to_anchor']:.3f}, same run): {found}."]
    accurate = report.get("most_accurate")
    if accurate and fewest:
        lines += ["", f"The most accurate deterministic row, {accurate['name']} (ode_error {accurate['ode_error']:.4f}), "
                      f"is {accurate['fd_to_anchor']:.3f} {_band(accurate['fd_to_anchor_band'])} from the {name} set: "
                      "the FD to it that deterministic samplers converge to at this N."]
        if fewest["bar_fd_to_anchor"] < accurate["fd_to_anchor"]:
            lines[-1] += (f" The bar ({fewest['bar_fd_to_anchor']:.3f}) lies under it: a row meets the bar by sampling "
                          "noise, not by accuracy; ode_error tells the rows apart.")
    notes = [f"{r['name']}: {r['note']}" for r in report["rows"] if r["note"]]
    if notes:
        lines += ["", *(f"Note, {note}" for note in notes)]
    if report["missing"]:
        lines += ["", f"Not drawn (run stopped before them): {', '.join(report['missing'])}."]
    if report["no_tuned_schedule"]:
        lines += ["", f"No tuned schedule ships for: {', '.join(report['no_tuned_schedule'])}."]
    head = report["headline"]
    if head:
        lines += ["", f"Fewest DPM-Solver++ model calls within {name}'s band: **{head['sampler']}** "
                      f"({head['model_calls']} calls, FD {head['fd_heldout']:.3f}): "
                      f"{head['model_call_ratio']:.0f}x fewer model calls than {name}; wall-clock speedup of "
                      f"the sets as drawn above {head['speedup_vs_anchor']:.1f}x."]
        if head["measured"]:
            lines += ["", render_speedup(head["measured"])]
    return "\n".join(lines) + "\n"


def _band(band) -> str:
    return f"[{band[0]:.3f}, {band[1]:.3f}]"


def render_speedup(measured: dict) -> str:
    """The headline measurement (``speedup.json``) in words."""
    anchor, fast = measured["anchor"], measured["accelerated"]
    return (
        f"End to end, one run, the first {measured['num_samples']} images of the sweep, "
        f"{measured['torch_threads']} torch threads, load {measured['load_before']:.1f}/{measured['load_after']:.1f}: "
        f"the reference {anchor['name'].upper()} sampler ({anchor['path']}) took {anchor['seconds']:.1f} s "
        f"({anchor['images_per_s']:.2f} images/s); fastdiff's Sampler running {fast['name']} ({fast['path']}) took "
        f"{fast['seconds']:.3f} s, median of {len(fast['seconds_all'])} ({fast['images_per_s']:.1f} images/s; "
        f"compile and warm-up {fast['warmup_seconds']:.1f} s, once per batch shape, not included): "
        f"**{measured['speedup']:.0f}x faster at {anchor['name'].upper()}'s quality**. Both reproduce the scored sets' images "
        f"(max abs {anchor['max_abs_vs_set']:.1e} and {fast['max_abs_vs_set']:.1e})."
    )


def _family(row: dict) -> str:
    return row["sampler"] + ("" if row.get("schedule", "default") == "default" else f" ({row['schedule']})")


def plot(report: dict, path: Path) -> Path:
    # matplotlib is optional (fastdiff[bench])
    import matplotlib

    matplotlib.use("Agg")
    # matplotlib is optional (fastdiff[bench])
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    families = sorted({_family(r) for r in report["rows"]})
    for family in families:
        rows = sorted((r for r in report["rows"] if _family(r) == family), key=lambda r: r["steps"])
        ax.plot([r["images_per_s"] for r in rows], [r["fd_heldout"] for r in rows], marker="o", label=family)
        for r in rows:
            ax.annotate(str(r["steps"]), (r["images_per_s"], r["fd_heldout"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    front = sorted((r for r in report["rows"] if r["pareto"]), key=lambda r: r["images_per_s"])
    ax.plot([r["images_per_s"] for r in front], [r["fd_heldout"] for r in front], "k--", lw=1, label="Pareto front")
    low, high = report["anchor"]["band"]
    ax.axhspan(low, high, color="grey", alpha=0.2, label=f"{report['anchor']['name']} noise band")
    ax.set_xscale("log")
    ax.set_xlabel("images / s (log; eager reference, shared CPU)")
    ax.set_ylabel("FD to held-out real digits")
    ax.set_title(f"digits model, N = {report['num_samples']}: quality against speed", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp))
    plt.close(fig)
    return path


def write_report(out: Path, sweep=SWEEP, num_samples: int | None = None, ode: ODEReference | None = None,
                 base: str = "quality") -> dict:
    """Analyse the cached sets and write <base>.json/.md/.png and one sample grid per set."""
    report = analyse(out, sweep, num_samples, ode)
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(out / f"{base}.json", lambda tmp: tmp.write_text(text))
    markdown = render_markdown(report)
    atomic_write(out / f"{base}.md", lambda tmp: tmp.write_text(markdown))
    plot(report, out / f"{base}.png")
    (out / "grids").mkdir(exist_ok=True)
    for entry in sweep:
        path = out / "sets" / f"{set_name(*entry)}.pt"
        if path.exists():
            save_grid_png(torch.load(path)["images"][:GRID_IMAGES], out / "grids" / f"{set_name(*entry)}.png")
    return report


def write_tuned_report(out: Path, num_samples: int, chunk: int, seed: int = 0,
                       evaluation_size: int = EVALUATION_SIZE, progress: bool = True) -> dict:
    """Default against tuned timesteps (:data:`TUNED_SWEEP`): draw (or find cached) the sets,
    solve (or find cached) the evaluation set's ODE reference, write tuned.json/.md/.png."""
    draw_sets(out, num_samples, chunk, seed, sweep=TUNED_SWEEP, progress=progress)
    return write_report(out, TUNED_SWEEP, num_samples, evaluation_reference(out, evaluation_size), base="tuned")


def evaluation_reference(out: Path, size: int = EVALUATION_SIZE) -> ODEReference:
    """The built-in model's ODE solution on ``size`` evaluation x_T (the ode_error column), cached in OUT/sets."""
    model, schedule, shape = _built_in_model()
    return reference_solution(model, schedule, shape, size, EVALUATION_SEED, out / "sets")
