"""Sample images from a model folder (or a preset) and write a PNG grid and an .npz."""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

import psutil

from fastdiff.commands import (
    UsageError,
    add_cache_arguments,
    add_threads_argument,
    apply_threads,
    cache_arg,
    load_model_arg,
    non_negative_float,
    positive_int,
    resolve_device,
    seed_int,
)
from fastdiff.presets import DTYPE_NAMES, PRESETS, SAMPLERS, default_steps, sampler_kwargs

DEFAULT_DDIM_STEPS = 50
#: The output set: written together into --out, as one unit (fastdiff.models.folders.atomic_folder).
PNG_NAME, NPZ_NAME = "samples.png", "samples.npz"


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_and_sampler_arguments(parser)
    parser.add_argument("--batch", type=positive_int, default=16, help="number of images (default: %(default)s)")
    parser.add_argument("--seed", type=seed_int, default=0, help="noise seed; same seed, same images (default: %(default)s)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: %(default)s)")
    add_threads_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    large = parser.add_argument_group(
        "large-N sampling (fastdiff.scale.shards; under torchrun each rank takes its share of the shards)"
    )
    large.add_argument("--num-images", type=positive_int, metavar="N",
                       help="draw N images into --out in resumable shards instead of one grid of --batch")
    large.add_argument("--shard-size", type=positive_int, default=100,
                       help="images per shard and per forward pass (default: %(default)s)")
    large.add_argument("--merge", action="store_true", help="also write all N images as one --out/images.npz")
    parser.add_argument(
        "--accelerate", action="store_true",
        help="use fastdiff.Sampler: fused ops, torch.compile, CUDA graphs on a GPU (default: the eager reference)",
    )
    parser.add_argument(
        "--dtype", choices=DTYPE_NAMES, default="float32",
        help="model precision with --accelerate; step maths stay float32 (default: %(default)s)",
    )
    add_cache_arguments(parser)


def add_model_and_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """--model/--config, --sampler, --steps, --eta, --schedule: what `fastdiff sample` and `fastdiff compile` share."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model", metavar="FOLDER", type=Path,
        help="model folder with config.json + model.safetensors (default: the built-in model)",
    )
    source.add_argument("--config", choices=PRESETS, help="sample a random-init model of this preset instead")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim",
                        help="ddpm, ddim, or DPM-Solver++ multistep of order 2/3, deterministic or SDE "
                             "(default: %(default)s)")
    parser.add_argument(
        "--steps", type=positive_int,
        help=f"sampling steps, 1..T (default: {DEFAULT_DDIM_STEPS} for ddim, 20 for dpm++* and unipc, 30 for euler*, "
             "T for ddpm)",
    )
    parser.add_argument("--eta", type=non_negative_float, help="DDIM eta >= 0 (default 0: deterministic DDIM)")
    parser.add_argument("--schedule", choices=("default", "tuned"),
                        help="timesteps: the model folder's tuned schedule for --sampler and --steps "
                             "(schedules/<sampler>-<steps>.json, from fastdiff tune-steps) or the default spacing "
                             "(default: tuned when the folder has one for these weights)")


def run(args: argparse.Namespace) -> int:
    if args.eta is not None and args.sampler != "ddim":
        raise UsageError("--eta applies to --sampler ddim only")
    if args.dtype != "float32" and not args.accelerate:
        raise UsageError("--dtype applies with --accelerate only: the reference path runs float32")
    device = resolve_device(args.device)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    for parent in args.out.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"--out {args.out}: {parent} is a file, not a folder")
    if args.num_images is not None:
        return run_sharded(args, device)

    import torch

    threads = apply_threads(args.threads)
    from fastdiff.engines.memory import check_fits
    from fastdiff.files import atomic_folder
    from fastdiff.images import save_grid_png, save_npz
    from fastdiff.pause import pause_point

    model, info, table, timesteps = load_model_and_table(args, device)
    steps = table.num_steps
    config = info.config
    shape = (args.batch, config.in_channels, config.image_size, config.image_size)
    try:  # before compiling or sampling: a batch that cannot fit is refused with a hint
        check_fits(config, args.batch, sum(p.numel() for p in model.parameters()), device)
    except MemoryError as e:
        raise UsageError(f"--batch {args.batch}: {e}") from None
    class_labels = None
    if config.num_classes:
        class_labels = torch.arange(args.batch, dtype=torch.int64) % config.num_classes
    path_name, warmup, sample = build_sampler(
        model, table, device, progress=not args.no_progress,
        accelerated_dtype=getattr(torch, args.dtype) if args.accelerate else None, cache=cache_arg(args),
    )

    print(f"model:   {info.description}")
    print(f"path:    {path_name}")
    print(f"threads: {threads}")
    print(f"sampler: {args.sampler}, {steps} steps" + (f", eta {args.eta or 0.0}" if args.sampler == "ddim" else "")
          + f", batch {args.batch} of {config.image_size}x{config.image_size}, seed {args.seed}"
          + (f", class labels cycling 0..{config.num_classes - 1}" if class_labels is not None else ""))
    print(f"timesteps: {timesteps}")
    output = contextlib.ExitStack()
    try:  # the output folder is staged before any work, so an unwritable --out fails now
        staging = output.enter_context(atomic_folder(args.out))
    except OSError as e:
        raise UsageError(f"--out {args.out}: {e}") from None
    with output:  # the PNG and the npz replace the old pair together, or not at all
        warmup(shape, class_labels)
        start = time.perf_counter()
        images = sample(shape, args.seed, class_labels)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        save_grid_png(images, staging / PNG_NAME)
        pause_point("sample-between-files")
        save_npz(images, staging / NPZ_NAME)
    print(f"time:    {seconds:.2f} s for {args.batch} images ({seconds / steps * 1000:.1f} ms/step); time to first "
          f"image {time.time() - psutil.Process().create_time():.1f} s (process start to images written)")
    print(f"wrote:   {args.out / PNG_NAME} and {args.out / NPZ_NAME}")
    return 0


def load_model_and_table(args: argparse.Namespace, device: str):
    """(model, ModelInfo, StepTable, which timesteps in words) for --model/--config, --sampler,
    --steps, --eta and --schedule."""
    from fastdiff.sampling.placement import make_table
    from fastdiff.schedulers import make_schedule

    model, info = load_model_arg(args, device)
    schedule = make_schedule(info.schedule, info.num_timesteps)
    steps = args.steps or default_steps(args.sampler, schedule.num_timesteps)
    if steps > schedule.num_timesteps:
        raise UsageError(f"--steps {steps}: must be at most T = {schedule.num_timesteps} for this model")
    if info.config.out_channels != info.config.in_channels:
        raise UsageError("the model predicts more channels than it takes: only eps-prediction models can be sampled")
    kwargs = sampler_kwargs(args.sampler)
    try:
        table, timesteps = make_table(schedule, kwargs["method"], steps, args.eta or 0.0, kwargs.get("order"), model,
                                      timesteps=args.schedule or "auto")
    except ValueError as e:  # e.g. an order the step count cannot support, no tuned schedule
        what = f"--sampler {args.sampler} --steps {steps} --schedule {args.schedule or 'auto'}"
        raise UsageError(f"{what}: {e}") from None
    return model, info, table, timesteps


def run_sharded(args: argparse.Namespace, device: str) -> int:
    """--num-images: every rank (one without torchrun) samples its shards into --out."""
    from fastdiff.scale.distributed import process_group

    with process_group(device) as (device, world):
        return _sample_shards(args, device, world)


def _sample_shards(args: argparse.Namespace, device: str, world) -> int:
    import torch

    from fastdiff.engines.memory import check_fits
    from fastdiff.scale import shards

    say = print if world.is_main else (lambda *a, **k: None)
    # Ranks on one machine share its cores and memory (torchrun sets LOCAL_WORLD_SIZE).
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", world.size)) if torch.device(device).type == "cpu" else 1
    threads = apply_threads(args.threads, processes=sharing)
    model, info, table, timesteps = load_model_and_table(args, device)
    try:  # before sampling: a shard that cannot fit is refused with a hint
        check_fits(info.config, args.shard_size, sum(p.numel() for p in model.parameters()), device,
                   flag="--shard-size", processes=sharing)
    except MemoryError as e:
        raise UsageError(f"--shard-size {args.shard_size}: {e}") from None
    say(f"model:   {info.description}")
    say(f"threads: {threads} per process")
    say(f"sampler: {args.sampler}, {table.num_steps} steps, {args.num_images} images in shards of "
        f"{args.shard_size}, seed {args.seed}, {world.size} process(es) on {device}")
    say(f"timesteps: {timesteps}")
    try:
        result = shards.sample_model(
            model, table, args.out, args.num_images, device=device, shard_size=args.shard_size, seed=args.seed,
            accelerated_dtype=getattr(torch, args.dtype) if args.accelerate else None, cache=cache_arg(args),
            merge=args.merge,
            progress=not args.no_progress, world=world,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    rate = result.images_sampled / result.seconds if result.seconds else 0.0
    print(f"rank {world.rank}: sampled {result.shards_sampled} shards ({result.images_sampled} images, "
          f"{rate:.1f} images/s), kept {result.shards_skipped} verified, redid {result.shards_redone} that failed "
          f"verification, {result.seconds:.1f} s")
    if result.manifest is not None:
        say(f"wrote:   {result.manifest}" + (f" and {args.out / shards.MERGED_NPZ}" if args.merge else ""))
    return 0


def build_sampler(model, table, device: str, progress: bool = True, accelerated_dtype=None, cache="auto"):
    """The execution path of ``fastdiff sample``: returns (name, warmup(shape, class_labels),
    sample(shape, seed, class_labels)); warm-up (compilation) is kept out of the timed run.

    The one place that picks the path: the eager reference, or with ``accelerated_dtype`` the
    accelerated :class:`fastdiff.Sampler` (its own description names what actually ran), its
    compiled steps kept in ``cache`` (the Sampler's argument).
    """
    from fastdiff.sampling import sample_reference

    if accelerated_dtype is not None:
        from fastdiff.sampling.sampler import Sampler

        sampler = Sampler(model, table, dtype=accelerated_dtype, device=device, cache=cache)

        def warmup(shape, class_labels):
            graphs = " and capturing" if sampler.cuda_graphs else ""
            what = f"compiling{graphs}" if sampler.compiled else "preparing"
            print(f"warm-up: {what} the sampling step for batch {shape[0]} (once per shape; "
                  f"{expected_compile_time(sampler)}) ...", flush=True)
            seconds = sampler.warmup(shape[0], class_labels)
            capture = " (+ CUDA graph capture)" if sampler.cuda_graphs else ""
            if sampler.loaded_from_cache(shape[0], class_labels):
                print(f"warm-up: loaded compiled step from cache in {seconds:.2f} s{capture}")
            else:
                print(f"warm-up: {'compiled' if sampler.compiled else 'prepared'} in {seconds:.2f} s{capture}")

        def sample_fast(shape, seed, class_labels):
            return sampler.sample(batch=shape[0], seed=seed, class_labels=class_labels, progress=progress)

        return sampler.describe()["path"], warmup, sample_fast

    def sample(shape, seed, class_labels):
        return sample_reference(
            model, table, shape=shape, seed=seed, class_labels=class_labels, device=device, progress=progress
        )

    return f"reference (eager PyTorch) on {device}", lambda shape, class_labels: None, sample


def expected_compile_time(sampler) -> str:
    """What the first compile of a shape costs with this sampler's engine, in words."""
    cached = "; a second or two when the cache has it" if sampler.describe()["cache"] else ""
    if not sampler.compiled:
        return "no compile"
    if sampler.engine == "openvino":
        return "seconds; tens of seconds for a large model's first conversion" + cached
    if sampler.device.type == "cuda":
        return "minutes with max-autotune" + cached
    return "about a minute on a 2-core CPU" + cached
