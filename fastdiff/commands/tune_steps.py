"""Tune a deterministic sampler's K timesteps to a model (lowest error to its exact ODE) and save them in its folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from fastdiff.commands import UsageError, add_threads_argument, apply_threads, positive_int
from fastdiff.presets import DETERMINISTIC_SAMPLERS

#: Where the ODE reference solutions are cached unless --cache says otherwise (ignored by git).
DEFAULT_CACHE = Path("out") / "ode-cache"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="FOLDER", type=Path,
                        help="model folder (config.json + model.safetensors; default: the built-in model); "
                             "the schedule is written to FOLDER/schedules/<sampler>-<K>.json")
    parser.add_argument("--sampler", required=True, choices=DETERMINISTIC_SAMPLERS,
                        help="a deterministic sampler whose table takes explicit timesteps (ddim, dpm++2m, dpm++3m, unipc)")
    parser.add_argument("--calls", required=True, type=positive_int, metavar="K", help="model calls (= steps)")
    parser.add_argument("--calibration-size", type=positive_int, default=256,
                        help="x_T the search tunes on (seeded, disjoint from the evaluation set; default: %(default)s)")
    parser.add_argument("--evaluation-size", type=int, default=500,
                        help="x_T the errors before/after are also reported on (0: skip; default: %(default)s)")
    parser.add_argument("--max-evaluations", type=positive_int, default=400,
                        help="most candidate schedules tried (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="folder caching the ODE reference solutions (default: %(default)s)")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    if args.evaluation_size < 0:
        raise UsageError(f"--evaluation-size must be >= 0, got {args.evaluation_size}")
    threads = apply_threads(args.threads)
    from fastdiff.bench.step_tuning import tunable_samplers, tune_model
    from fastdiff.models.folders import BUILTIN_FOLDER, load_model, save_tuned_schedule

    if args.sampler not in tunable_samplers():
        raise UsageError(f"--sampler {args.sampler}: its table takes no explicit timesteps yet "
                         f"(tunable: {', '.join(tunable_samplers())})")
    folder = args.model or BUILTIN_FOLDER
    try:
        model, info = load_model(folder)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--model: {e}") from None
    if args.calls > info.num_timesteps:
        raise UsageError(f"--calls {args.calls}: must be at most T = {info.num_timesteps} for this model")
    print(f"model:   {info.description}")
    print(f"threads: {threads}")
    print(f"tuning:  {args.sampler} at {args.calls} calls on {args.calibration_size} calibration x_T "
          f"(ODE references cached in {args.cache}) ...", flush=True)
    try:
        tuned = tune_model(model, info, args.sampler, args.calls, args.calibration_size, args.evaluation_size,
                           args.cache, args.max_evaluations, progress=lambda line: print(f"  {line}", flush=True))
        path = save_tuned_schedule(info, tuned)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for name, errors in tuned.errors.items():
        print(f"{name}: ode_error {errors['before']:.5f} (default) -> {errors['after']:.5f} (tuned) "
              f"on {errors['size']} x_T")
    print(f"timesteps: {list(tuned.settings['default_timesteps'])} -> {list(tuned.timesteps)}")
    print(f"wrote:   {path}")
    return 0
