"""The benchmark run: every path on the same model, the same noise, in interleaved rounds.

Hygiene: the clock is read only after the device is synchronized; each path's first call
(compilation, autotuning, graph capture) is timed apart and never enters the statistics; the
timed calls are interleaved (round r starts at path r mod P) so machine noise hits all paths
alike; the spread (p10/p90) is reported beside the median; every figure comes from this run.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

from fastdiff.bench import environment, roofline
from fastdiff.bench.paths import DEFAULT_PATHS, PATHS, BenchContext, BenchPath, PathSkipped, build_path, fastdiff_label
from fastdiff.bench.report import SCHEMA
from fastdiff.bench.telemetry import Telemetry, summarize
from fastdiff.models.folders import load_model, random_init_model
from fastdiff.models.unet import UNetConfig, preset_config
from fastdiff.presets import DTYPE_NAMES, SAMPLERS, sampler_kwargs
from fastdiff.sampling import draw_noise
from fastdiff.schedulers import make_schedule, step_table

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass(frozen=True)
class Defaults:
    batches: tuple[int, ...]
    steps: int
    repeats: int


#: Sized so that the default run takes about 2 minutes on a 2-core CPU.
DEFAULTS = {
    "cpu": Defaults(batches=(1, 8), steps=10, repeats=7),
    "cuda": Defaults(batches=(1, 16, 64), steps=50, repeats=10),
    "quick": Defaults(batches=(2,), steps=2, repeats=2),
}


@dataclass
class BenchSettings:
    """What to run. ``None`` fields take the device's defaults (:data:`DEFAULTS`)."""

    model: str | None = None  # model folder; None: the built-in default model
    config: str | None = None  # preset name ("cifar10", "tiny") for a random-init model instead
    batches: tuple[int, ...] | None = None
    steps: int | None = None
    sampler: str = "ddim"
    dtype: str = "float32"
    device: str | None = None
    paths: tuple[str, ...] = DEFAULT_PATHS
    repeats: int | None = None
    seed: int = 0
    quick: bool = False
    threads: int | None = None  # torch intra-op threads; None: torch's default
    autotune: bool = True  # CUDA: compile path in max-autotune mode, Sampler autotuning; False: neither

    def resolved(self) -> "BenchSettings":
        """Checked settings with defaults filled in; raises ValueError/TypeError naming the option."""
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_device(device)
        defaults = DEFAULTS["quick" if self.quick else torch.device(device).type]
        paths = tuple(self.paths)
        unknown = [p for p in paths if p not in PATHS]
        if unknown or not paths:
            raise ValueError(f"paths: unknown {unknown or 'empty list'}; choose from {', '.join(PATHS)}")
        if len(set(paths)) != len(paths):
            raise ValueError(f"paths: listed twice in {list(paths)}")
        batches = tuple(self.batches or defaults.batches)
        for name, values in (("batch", batches), ("steps", (self.steps,)), ("repeats", (self.repeats,)),
                             ("threads", (self.threads,))):
            for value in values:
                if value is None:
                    continue
                if not isinstance(value, int) or isinstance(value, bool):
                    raise TypeError(f"{name} must be an integer, got {value!r}")
                if value < 1:
                    raise ValueError(f"{name} must be >= 1, got {value}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.model is not None and self.config is not None:
            raise ValueError("pass model (a folder) or config (a preset), not both")
        return BenchSettings(
            model=self.model, config=self.config, batches=tuple(sorted(set(batches))),
            steps=self.steps or defaults.steps, sampler=self.sampler, dtype=self.dtype, device=device,
            paths=paths, repeats=self.repeats or defaults.repeats, seed=self.seed, quick=self.quick,
            threads=self.threads, autotune=self.autotune,
        )


def check_device(device: str) -> None:
    """A device that is not present is an error before any work starts."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a valid torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is available (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: the bench runs on cpu or cuda")


#: The presets a benchmark takes (the "default" preset is the CIFAR-10 model under another name).
PRESETS = ("cifar10", "tiny")


def load_bench_model(settings: BenchSettings):
    """(fp32 model on the device, ModelInfo) for the settings: quick -> tiny preset."""

    if settings.quick and settings.model is None and settings.config is None:
        return random_init_model(UNetConfig.tiny(), device=settings.device)
    if settings.config is not None:
        if settings.config not in PRESETS:
            raise ValueError(f"config must be one of {PRESETS}, got {settings.config!r}")
        return random_init_model(preset_config(settings.config), device=settings.device)
    return load_model(settings.model, device=settings.device)


# ---- memory ------------------------------------------------------------------------------

_CLEAR_REFS = Path("/proc/self/clear_refs")


def _rss_bytes(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class MemoryMeter:
    """Peak memory of one call: CUDA max_memory_allocated, or the CPU process's peak RSS.

    On Linux, writing 5 to /proc/self/clear_refs resets the kernel's peak-RSS mark (VmHWM),
    so each call's peak is its own; elsewhere the lifetime peak is reported and labelled so.
    """

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
        elif os.access(_CLEAR_REFS, os.W_OK) and _rss_bytes("VmHWM") is not None:
            self.kind = "cpu_peak_rss"
        else:
            self.kind = "cpu_peak_rss_lifetime"

    def start(self) -> int:
        if self.kind == "cuda_max_memory_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        if self.kind == "cpu_peak_rss":
            _CLEAR_REFS.write_text("5")
            return _rss_bytes("VmRSS")

        return psutil.Process().memory_info().rss

    def peak(self) -> int:
        if self.kind == "cuda_max_memory_allocated":
            return torch.cuda.max_memory_allocated(self.device)
        if self.kind == "cpu_peak_rss":
            return _rss_bytes("VmHWM")
        # POSIX only
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ---- statistics --------------------------------------------------------------------------

def spread(values: list[float]) -> dict:
    """median, p10, p90 (linear interpolation between order statistics)."""
    ordered = sorted(values)

    def quantile(q: float) -> float:
        position = q * (len(ordered) - 1)
        low, high = math.floor(position), math.ceil(position)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {"median": statistics.median(ordered), "p10": quantile(0.1), "p90": quantile(0.9), "n": len(ordered)}


def fidelity(images: torch.Tensor, reference: torch.Tensor) -> dict:
    """Max abs difference and PSNR (peak 1) of [0, 1] images against the reference path's."""
    diff = images.double().cpu() - reference.double().cpu()
    mse = diff.square().mean().item()
    return {"max_abs": diff.abs().max().item(), "psnr_db": math.inf if mse == 0 else -10 * math.log10(mse)}


# ---- the run -----------------------------------------------------------------------------

class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(total=total, unit="call", file=sys.stderr, disable=not enabled, dynamic_ncols=True)

    def show(self, text: str):
        self.bar.set_description_str(text)

    def advance(self):
        self.bar.update(1)

    def close(self):
        self.bar.close()


def _timed_call(path: BenchPath, noise, class_labels, device, memory: MemoryMeter, telemetry):
    """One full sampling call: (seconds, images, memory dict, telemetry samples)."""
    base = memory.start()
    with telemetry.record() as recording:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        images = path.run(noise, class_labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    peak = memory.peak()
    return seconds, images, {"peak_bytes": peak, "peak_above_start_bytes": max(peak - base, 0)}, recording.samples


def run_bench(settings: BenchSettings, progress: bool = True) -> dict:
    """Run the benchmark described by ``settings``; returns the JSON-ready result."""
    settings = settings.resolved()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    device, dtype = torch.device(settings.device), DTYPES[settings.dtype]
    model, info = load_bench_model(settings)
    schedule = make_schedule(info.schedule, info.num_timesteps)
    if settings.steps > schedule.num_timesteps:
        raise ValueError(f"steps must be at most T = {schedule.num_timesteps} for this model, got {settings.steps}")
    table = step_table(schedule, steps=settings.steps, **sampler_kwargs(settings.sampler))
    cfg = info.config

    env = environment.collect(device)
    telemetry = Telemetry(device)
    memory = MemoryMeter(device)
    load_before = list(os.getloadavg())
    wall_start = time.perf_counter()
    phases: dict[str, float] = {}
    mark = [wall_start]

    def phase(name: str) -> None:
        now = time.perf_counter()
        phases[name], mark[0] = now - mark[0], now

    roof_dtypes = list(dict.fromkeys(("float32", settings.dtype)))
    first_probes = {name: roofline.measure_roof(device, DTYPES[name], quick=settings.quick) for name in roof_dtypes}
    labels1 = torch.zeros(1, dtype=torch.int64, device=device) if cfg.num_classes else None
    example = (torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size, device=device),
               torch.zeros(1, dtype=torch.int64, device=device), *([labels1] if labels1 is not None else []))
    flops = roofline.count_forward_flops(model, example)
    flops_per_image = flops["total"] * table.num_steps
    phase("roof_and_flops")

    ctx = BenchContext(model, schedule, table, device, dtype, autotune=settings.autotune)
    paths: dict[str, BenchPath] = {}
    path_report: dict[str, dict] = {}
    for name in settings.paths:
        try:
            paths[name] = build_path(name, ctx)
        except PathSkipped as e:
            path_report[name] = {"status": "skipped", "reason": str(e)}
        except Exception as e:  # a broken path is reported, never fatal to the others
            path_report[name] = {"status": "skipped", "reason": f"{type(e).__name__}: {e}"}

    phase("build_paths")
    calls = len(settings.batches) * len(paths) * (1 + settings.repeats)
    bar = _Progress(calls, progress)
    results = []
    try:
        for batch in settings.batches:
            results.extend(_bench_batch(batch, settings, cfg, table, device, paths, path_report, memory, telemetry,
                                        bar))
    finally:
        bar.close()
    phase("measure")
    # Probed again after the timed calls: the roof is a best case, and one probe can be hit by other work.
    roofs = {}
    for name in roof_dtypes:
        again = roofline.measure_roof(device, DTYPES[name], quick=settings.quick)
        roofs[name] = roofline.best_roof(first_probes[name], again)

    for name, path in paths.items():
        entry = path_report.setdefault(name, {"status": "ok"})
        entry.update(label=path.label, dtype=str(path.dtype).removeprefix("torch."), info=path.info)
        if path.describe is not None:
            described = path.describe()  # after the run: e.g. a compile fallback shows here
            entry["info"] = {**path.info, "describe_after_run": described}
            if name.startswith("fastdiff"):
                entry["label"] = fastdiff_label(described)

    _derive(results, table.num_steps, flops_per_image, roofs,
            {name: str(path.dtype).removeprefix("torch.") for name, path in paths.items()})
    return {
        "schema": SCHEMA,
        "environment": env,
        "settings": {**asdict(settings), "batches": list(settings.batches), "paths": list(settings.paths)},
        "model": {"description": info.description, "config": cfg.to_dict(), "random_init": info.random_init,
                  "schedule": info.schedule, "num_timesteps": info.num_timesteps},
        "sampling": {"method": table.method, "steps": table.num_steps, "clip": table.clip,
                     "timesteps": table.timesteps.tolist()},
        "flops": {"per_forward_per_image": flops, "per_image_sample": flops_per_image},
        "roofline": roofs,
        "memory_kind": memory.kind,
        "telemetry": telemetry.static(),
        "paths": path_report,
        "results": results,
        "load": {"loadavg_before": load_before, "loadavg_after": list(os.getloadavg())},
        "wall_seconds": time.perf_counter() - wall_start,
        "phase_seconds": phases,
    }


def _bench_batch(batch, settings, cfg, table, device, paths, path_report, memory, telemetry, bar) -> list[dict]:
    """Warm-up then interleaved rounds for one batch size; returns one result row per path."""
    noise = draw_noise(table, (batch, cfg.in_channels, cfg.image_size, cfg.image_size), settings.seed, device=device)
    class_labels = None
    if cfg.num_classes:
        class_labels = torch.arange(batch, dtype=torch.int64, device=device) % cfg.num_classes
    rows = {name: {"path": name, "batch": batch, "times_s": [], "memory": [], "telemetry": []} for name in paths}
    outputs: dict[str, torch.Tensor] = {}

    def call(name: str, what: str):
        bar.show(f"batch {batch} | {name} | {what}")
        try:
            return _timed_call(paths[name], noise, class_labels, device, memory, telemetry)
        except Exception as e:
            path_report[name] = {"status": "skipped", "reason": f"failed at batch {batch} ({what}): "
                                                                f"{type(e).__name__}: {e}"}
            return None
        finally:
            bar.advance()

    def alive(name: str) -> bool:
        return path_report.get(name, {}).get("status") != "skipped"

    for name in paths:
        if not alive(name):  # failed at an earlier batch size: never retried
            bar.advance()
            continue
        done = call(name, "warm-up")
        if done is not None:
            rows[name]["warmup_s"] = done[0]
            outputs[name] = done[1]
            if paths[name].warm_start is not None:
                bar.show(f"batch {batch} | {name} | warm start from the cache")
                rows[name]["warm_start_s"] = paths[name].warm_start(noise, class_labels)
            if device.type == "cuda":  # e.g. CUDA graphs capture on the second call: discard it too
                call(name, "second warm-up")
    order = list(paths)
    for round_index in range(settings.repeats):
        rotation = order[round_index % len(order):] + order[:round_index % len(order)]
        for name in rotation:
            if not alive(name):
                bar.advance()
                continue
            done = call(name, f"round {round_index + 1}/{settings.repeats}")
            if done is not None:
                seconds, images, mem, samples = done
                rows[name]["times_s"].append(seconds)
                rows[name]["memory"].append(mem)
                rows[name]["telemetry"].extend(samples)
                outputs[name] = images

    finished = []
    for name, row in rows.items():
        if not alive(name) or not row["times_s"]:
            continue
        row["memory"] = {
            "peak_bytes": max(m["peak_bytes"] for m in row["memory"]),
            "peak_above_start_bytes": max(m["peak_above_start_bytes"] for m in row["memory"]),
        }
        row["telemetry"] = summarize(row["telemetry"])
        row["samples_shape"] = list(outputs[name].shape)
        row["samples_finite"] = bool(torch.isfinite(outputs[name]).all())
        if "reference" in outputs and alive("reference"):
            row["fidelity_vs_reference"] = fidelity(outputs[name], outputs["reference"])
        finished.append(row)
    return finished


def _derive(results: list[dict], steps: int, flops_per_image: int, roofs: dict, dtypes: dict[str, str]) -> None:
    """Throughput, ms per step, TFLOP/s, % of roof and speedup from each row's measured times."""
    reference_median = {r["batch"]: statistics.median(r["times_s"]) for r in results if r["path"] == "reference"}
    for row in results:
        times, batch = row["times_s"], row["batch"]
        median = statistics.median(times)
        row["ms_per_step"] = spread([1000 * t / steps for t in times])
        row["images_per_s"] = spread([batch / t for t in times])
        row["tflops"] = flops_per_image * batch / median / 1e12
        roof = roofs[dtypes[row["path"]]]["roof_tflops"]
        row["pct_of_roof"] = 100 * row["tflops"] / roof
        ref = reference_median.get(batch)
        row["speedup_vs_reference"] = ref / median if ref else None
