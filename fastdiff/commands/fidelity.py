"""Check the accelerated sampler draws the reference's distribution (Fréchet distance on digits)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fastdiff.commands import UsageError, positive_int, resolve_device, seed_int
from fastdiff.presets import SAMPLERS, default_steps, sampler_kwargs

DEFAULT_DDIM_STEPS = 50
QUICK_SAMPLES, QUICK_DDIM_STEPS = 48, 10
#: Base seeds of the three sample sets; chunk i of a set uses base + seed + i.
SEED_SPACING = 100_000


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, metavar="FOLDER",
                        help="a 1x16x16 model folder (default: the built-in digits model)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="default: %(default)s")
    parser.add_argument("--steps", type=positive_int,
                        help=f"sampling steps (default: {DEFAULT_DDIM_STEPS} for ddim, 20 for dpm++* and unipc, "
                             "T for ddpm)")
    parser.add_argument("-n", "--num-samples", type=positive_int, default=1000,
                        help="samples per set (three sets are drawn; default: %(default)s)")
    parser.add_argument("--chunk", type=positive_int, default=250, help="samples per sampler call (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help=f"CI smoke run: {QUICK_SAMPLES} samples, ddim {QUICK_DDIM_STEPS} steps unless given")
    parser.add_argument("--seed", type=seed_int, default=0, help="base seed (default: %(default)s)")
    parser.add_argument("--no-compile", action="store_true", help="never torch.compile the accelerated sampler")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the figures here (default: out/fidelity-METHOD-STEPS.json)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    import torch

    from fastdiff.bench import fidelity
    from fastdiff.files import atomic_write
    from fastdiff.models.folders import load_model
    from fastdiff.sampling import sample_reference
    from fastdiff.sampling.sampler import Sampler
    from fastdiff.schedulers import make_schedule, step_table

    if args.threads:
        torch.set_num_threads(args.threads)
    n = QUICK_SAMPLES if args.quick and args.num_samples == 1000 else args.num_samples
    if n < 2:
        raise UsageError("--num-samples must be at least 2")
    try:
        model, info = load_model(args.model, device=device)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    config = info.config
    shape = (config.in_channels, config.image_size, config.image_size)
    if shape != fidelity.FEATURE_IMAGE_SHAPE or config.num_classes:
        raise UsageError(f"fidelity needs an unconditional model of 1x16x16 digits; {info.description} makes {shape}")
    schedule = make_schedule(info.schedule, info.num_timesteps)
    quick_ddim = args.quick and args.sampler == "ddim"
    steps = args.steps or (QUICK_DDIM_STEPS if quick_ddim else default_steps(args.sampler, schedule.num_timesteps))
    if steps > schedule.num_timesteps:
        raise UsageError(f"--steps {steps}: must be at most T = {schedule.num_timesteps}")
    try:
        table = step_table(schedule, steps=steps, **sampler_kwargs(args.sampler))
    except ValueError as e:  # e.g. an order the step count cannot support
        raise UsageError(f"--sampler {args.sampler} --steps {steps}: {e}") from None
    progress = not args.no_progress

    accelerated = Sampler(model, table, device=device, compile=False if args.no_compile else "auto")

    def reference(batch: int, seed: int) -> torch.Tensor:
        return sample_reference(model, table, (batch, *shape), seed=seed, device=device, progress=progress)

    def fast(batch: int, seed: int) -> torch.Tensor:
        return accelerated.sample(batch=batch, seed=seed, progress=progress)

    print(f"model:    {info.description}")
    print(f"sampler:  {args.sampler}, {steps} steps; {n} samples per set, chunks of {args.chunk}")
    seconds, sets = {}, {}
    start = time.perf_counter()
    features = fidelity.DigitsFeatures.fit()
    seconds["classifier"] = time.perf_counter() - start
    for name, fn, base in (("reference", reference, 0), ("reference_again", reference, 1), ("accelerated", fast, 2)):
        start = time.perf_counter()
        sets[name] = fidelity.draw_in_chunks(fn, n, args.chunk, args.seed + base * SEED_SPACING)
        seconds[name] = time.perf_counter() - start
        print(f"sampled:  {name}: {seconds[name]:.1f} s")

    report = fidelity.compare(features, sets["reference"], sets["reference_again"], sets["accelerated"],
                              method=args.sampler, steps=steps, accelerated_path=accelerated.describe()["path"],
                              seconds={k: round(v, 2) for k, v in seconds.items()})
    _print_report(report)
    path = args.json or Path("out") / f"fidelity-{args.sampler}-{steps}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"model": info.description, **report.to_dict()}, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
    print(f"wrote:    {path}")
    return 0 if report.passed else 1


def _print_report(report) -> None:
    from fastdiff.bench.fidelity import NOISE_QUANTILE

    q = f"q{round(100 * NOISE_QUANTILE)}"
    print(f"accelerated path: {report.accelerated_path}")
    print(f"feature space: hidden layer of a digits MLP, held-out accuracy {report.classifier_accuracy:.3f}")
    print(f"FD(accelerated, reference)    = {report.fd_accel_ref:.4f}")
    print(f"FD(reference, reference')     = {report.fd_ref_ref:.4f}   ref-vs-ref noise: mean {report.noise_mean:.4f}, "
          f"{q} {report.noise_threshold:.4f}")
    print(f"FD(reference, held-out real)  = {report.fd_ref_heldout:.4f}")
    print(f"FD(accelerated, held-out real)= {report.fd_accel_heldout:.4f}")
    print(f"FD(train real, held-out real) = {report.fd_heldout_train:.4f}   (real-vs-real floor)")
    print("labels:      " + " ".join(f"{d:>4}" for d in range(10)))
    for name, histogram in (("reference", report.histogram_ref), ("accelerated", report.histogram_accel),
                            ("held-out", report.histogram_heldout)):
        print(f"{name:<12} " + " ".join(f"{c:>4}" for c in histogram))
    verdict = "PASS" if report.passed else "FAIL"
    relation = "<=" if report.passed else ">"
    print(f"{verdict}: FD(accelerated, reference) {report.fd_accel_ref:.4f} {relation} "
          f"ref-vs-ref noise {q} {report.noise_threshold:.4f}")
