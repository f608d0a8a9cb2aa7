"""Prebuild compiled sampling steps into the compiled-artifact cache (e.g. at install or deploy
time), so that `fastdiff sample --accelerate` and fastdiff.Sampler load them instead of compiling."""
from __future__ import annotations

import argparse
from pathlib import Path

from fastdiff.commands import (
    UsageError,
    add_threads_argument,
    apply_threads,
    cache_arg,
    positive_int,
    resolve_device,
)
from fastdiff.commands.sample import add_model_and_sampler_arguments, load_model_and_table
from fastdiff.presets import DTYPE_NAMES


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_and_sampler_arguments(parser)
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[16],
                        help="batch sizes to build, e.g. --batch 1 16 64 (default: 16)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, nargs="+", default=["float32"],
                        help="model precisions to build (default: float32)")
    parser.add_argument("--engine", choices=("auto", "inductor", "openvino"), default="auto",
                        help="what compiles the step, as fastdiff.Sampler's engine (default: %(default)s: "
                             "OpenVINO for bfloat16 on a CPU where installed, else inductor)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--cache-dir", metavar="FOLDER", type=Path,
                        help="compiled-artifact cache (default: $FASTDIFF_CACHE_DIR, else $XDG_CACHE_HOME/fastdiff)")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    args.no_cache = False
    cache = cache_arg(args)
    device = resolve_device(args.device)
    import torch

    from fastdiff.sampling.sampler import Sampler

    threads = apply_threads(args.threads)
    model, info, table, _ = load_model_and_table(args, device)
    labels = info.config.num_classes
    print(f"model:   {info.description}")
    print(f"threads: {threads} (part of the key: sample with the same count to use these entries)")
    print(f"sampler: {args.sampler}, {table.num_steps} steps (the step table is compiled in)")
    for dtype in args.dtype:
        try:
            sampler = Sampler(model, table, dtype=getattr(torch, dtype), device=device, compile=True,
                              engine=args.engine, cache=cache)
        except (ValueError, ImportError) as e:
            raise UsageError(f"--dtype {dtype} --engine {args.engine}: {e}") from None
        print(f"{dtype}: {sampler.describe()['path']}")
        for batch in args.batch:
            class_labels = torch.arange(batch) % labels if labels else None
            seconds = sampler.warmup(batch, class_labels)
            done = "found in the cache, loaded" if sampler.loaded_from_cache(batch, class_labels) else "compiled"
            print(f"  batch {batch}: {done} in {seconds:.1f} s", flush=True)
    return 0

