"""Check the fast sampler against the reference sampler on the same noise (fp32 error, bf16 PSNR).

Runs the eager reference sampler once, then ``fastdiff.Sampler`` in each requested dtype with
the very same external noise, and compares the final samples: float32 must stay within
1e-4 max abs, half dtypes at >= 30 dB PSNR (samples clamped to [-1, 1], peak-to-peak 2).
Exit code 0 when every bar holds, 1 otherwise. The default is the issue's check: the tiny
config, a full 1000-step DDPM trajectory, x0 clipped to [-1, 1] as google/ddpm-cifar10-32 does
(an untrained model's samples would otherwise grow without bound).

``--fp64`` also runs the same maths in float64 and prints every path's distance to it,
including the fp32 reference's own: how much the trajectory amplifies rounding. Deterministic
DDIM with an untrained model is chaotic (the fp32 reference drifts far from fp64), so there
the fp32 bar measures rounding noise, not the sampler.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from fastdiff.commands import (
    add_threads_argument,
    apply_threads,
    load_model_arg,
    positive_int,
    resolve_device,
    seed_int,
)
from fastdiff.presets import DTYPE_NAMES, PRESETS, SAMPLERS, sampler_kwargs

FP32_MAX_ABS = 1e-4
HALF_MIN_PSNR_DB = 30.0


def configure(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="FOLDER", type=Path, help="model folder (default: --config tiny)")
    source.add_argument("--config", choices=PRESETS, help="a random-init model of this preset (default: tiny)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help="default: %(default)s")
    parser.add_argument("--steps", type=positive_int,
                        help="sampling steps (default: T for ddpm, 50 for ddim, 20 for dpm++* and unipc)")
    parser.add_argument("--batch", type=positive_int, default=4, help="default: %(default)s")
    parser.add_argument("--seed", type=seed_int, default=0, help="default: %(default)s")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default: %(default)s)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--no-compile", action="store_true", help="run the accelerated model without torch.compile")
    parser.add_argument("--no-clip", action="store_true", help="do not clamp x0 to [-1, 1]")
    parser.add_argument("--fp64", action="store_true", help="also compare every path with a float64 run")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_threads_argument(parser)


def psnr(actual, reference, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB of ``actual`` against ``reference``, both clamped to
    [-data_range/2, data_range/2] as images are; inf when they are equal."""
    half = data_range / 2
    mse = (actual.double().clamp(-half, half) - reference.double().clamp(-half, half)).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def fp64_trajectory(model, table, noise, class_labels=None):
    """The sampler's maths in float64, model included (a float64 copy): the truth that fp32
    paths are measured against when the fp32 reference's own rounding matters."""
    import copy

    import torch

    from fastdiff.ops import reference  # torch: imported when the command runs, not for --help

    model64 = copy.deepcopy(model).double().eval()
    x = noise.x_T.double()
    coefs = table.coefs.double().to(x.device)
    history = table.new_history(x.shape, x.device)
    history = None if history is None else history.double()
    with torch.no_grad():
        for i in range(table.num_steps):
            t = table.timesteps[i].to(x.device).expand(x.shape[0])
            eps = model64(x, t) if class_labels is None else model64(x, t, class_labels)
            x, _ = reference.sampler_step(x, eps, torch.tensor(i, device=x.device), coefs, noise=noise.z[i],
                                          clip_range=table.clip, history=history)
    return x


def run(args: argparse.Namespace) -> int:
    from fastdiff.commands import UsageError

    dtype_names = [name.strip() for name in args.dtypes.split(",") if name.strip()]
    unknown = sorted(set(dtype_names) - set(DTYPE_NAMES))
    if unknown or not dtype_names:
        raise UsageError(f"--dtypes must list some of {', '.join(DTYPE_NAMES)}, got {args.dtypes!r}")
    device = resolve_device(args.device)
    if args.model is None and args.config is None:
        args.config = "tiny"

    import torch

    threads = apply_threads(args.threads)
    from fastdiff.sampling import draw_noise, sample_reference
    from fastdiff.sampling.sampler import Sampler
    from fastdiff.schedulers import ddim_table, ddpm_table, make_schedule, step_table

    model, info = load_model_arg(args, device)
    schedule = make_schedule(info.schedule, info.num_timesteps)
    clip = not args.no_clip
    if args.sampler == "ddpm":
        table = ddpm_table(schedule, steps=args.steps, clip_sample=clip)
    elif args.sampler == "ddim":
        table = ddim_table(schedule, steps=args.steps or 50, clip_sample=clip)
    else:  # DPM-Solver++: diffusers has no x0 clipping for it
        try:
            table = step_table(schedule, steps=args.steps or 20, **sampler_kwargs(args.sampler))
        except ValueError as e:
            raise UsageError(f"--sampler {args.sampler}: {e}") from None
    config = info.config
    shape = (args.batch, config.in_channels, config.image_size, config.image_size)
    labels = torch.arange(args.batch, device=device) % config.num_classes if config.num_classes else None
    noise = draw_noise(table, shape, args.seed, device=device)

    print(f"model:   {info.description}")
    print(f"threads: {threads}")
    print(f"sampler: {table.method}, {table.num_steps} steps, clip {table.clip}, batch {args.batch}, seed {args.seed}")
    start = time.perf_counter()
    reference = sample_reference(model, table, noise=noise, class_labels=labels, device=device,
                                 progress=not args.no_progress)
    print(f"reference (eager fp32): {time.perf_counter() - start:.1f} s")
    truth = fp64_trajectory(model, table, noise, labels) if args.fp64 else None
    if truth is not None:
        print(f"reference vs float64: max abs {_max_abs(reference, truth):.3e} (the trajectory's own rounding)")

    passed = True
    for name in dtype_names:
        dtype = getattr(torch, name)
        sampler = Sampler(model, table, dtype=dtype, device=device, compile=not args.no_compile)
        warmup = sampler.warmup(args.batch, class_labels=labels, external_noise=True)
        start = time.perf_counter()
        out = sampler.sample(noise=noise, class_labels=labels, progress=not args.no_progress)
        seconds = time.perf_counter() - start
        max_abs = _max_abs(out, reference)
        db = psnr(out, reference)
        ok = max_abs <= FP32_MAX_ABS if dtype == torch.float32 else db >= HALF_MIN_PSNR_DB
        bar = f"max abs <= {FP32_MAX_ABS:g}" if dtype == torch.float32 else f"PSNR >= {HALF_MIN_PSNR_DB:g} dB"
        print(f"{name:>9}: max abs {max_abs:.3e}, PSNR {db:.2f} dB -> {'PASS' if ok else 'bar not met'} ({bar}); "
              f"warm-up {warmup:.1f} s, sampling {seconds:.1f} s")
        if not ok:  # is it the sampler, or a trajectory that amplifies any rounding? Ask float64.
            truth = truth if truth is not None else fp64_trajectory(model, table, noise, labels)
            ok = _within_2x_of_pytorch(out, reference, truth, model, table, noise, labels, dtype, device)
        elif truth is not None:
            print(f"           vs float64: max abs {_max_abs(out, truth):.3e}")
        print(f"           path: {sampler.describe()['path']}")
        passed &= ok
    return 0 if passed else 1


def _within_2x_of_pytorch(out, reference, truth, model, table, noise, labels, dtype, device) -> bool:
    """The FlashAttention 2x rule, for a trajectory where the bar above cannot hold: fastdiff's
    error against the float64 truth is at most twice plain PyTorch's own in the same precision
    (max abs for float32, against the eager fp32 reference; PSNR within 20 log10(2) = 6.02 dB
    for a half dtype, against the eager model in that dtype). Prints why, and the verdict."""
    import copy

    import torch

    from fastdiff.bench.paths import CastIO
    from fastdiff.sampling import sample_reference

    name = str(dtype).removeprefix("torch.")
    if dtype == torch.float32:
        pytorch_error, our_error = _max_abs(reference, truth), _max_abs(out, truth)
        ok = our_error <= 2 * pytorch_error + 1e-6
        print(f"           the fp32 reference itself is {pytorch_error:.3e} (max abs) from float64: this trajectory "
              f"amplifies rounding (deterministic DDIM or an untrained model is chaotic), so 1e-4 measures rounding "
              f"noise; fastdiff is {our_error:.3e} from float64 -> {'PASS' if ok else 'FAIL'} (2x rule: <= "
              f"{2 * pytorch_error:.3e})")
        return ok
    pytorch_half = CastIO(copy.deepcopy(model).to(dtype), dtype).eval()
    pytorch_out = sample_reference(pytorch_half, table, noise=noise, class_labels=labels, device=device)
    pytorch_db, our_db = psnr(pytorch_out, truth), psnr(out, truth)
    ok = our_db >= pytorch_db - 20 * math.log10(2)
    print(f"           plain PyTorch in {name} (eager) is itself at {pytorch_db:.2f} dB PSNR from float64: this "
          f"trajectory amplifies {name} rounding (deterministic DDIM or an untrained model is chaotic), so the "
          f"{HALF_MIN_PSNR_DB:g} dB bar cannot hold for any {name} path; fastdiff is at {our_db:.2f} dB -> "
          f"{'PASS' if ok else 'FAIL'} (2x rule: >= {pytorch_db - 20 * math.log10(2):.2f} dB)")
    return ok


def _max_abs(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()
