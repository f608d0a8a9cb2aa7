"""Benchmark sampling: reference, torch.compile, fastdiff and diffusers on the same model and noise."""
from __future__ import annotations

import argparse
import datetime
import re
from pathlib import Path

from fastdiff.commands import UsageError, positive_int, seed_int
from fastdiff.presets import DTYPE_NAMES, SAMPLERS

PATH_NAMES = ("reference", "compile", "fastdiff", "diffusers")  # the default; "openvino" on request


def configure(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="FOLDER", help="model folder (default: the built-in model)")
    source.add_argument("--config", choices=("cifar10", "tiny"), help="a random-init model of this preset instead")
    parser.add_argument("--batch", metavar="N", nargs="+", type=_int_list,
                        help="batch sizes, e.g. --batch 1 4 16 (default: 1 8 on CPU, 1 16 64 on GPU)")
    parser.add_argument("--steps", type=positive_int, help="sampling steps (default: 10 on CPU, 50 on GPU)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="default: %(default)s")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                        help="precision of the compile/fastdiff/diffusers paths; the reference is always "
                             "float32 (default: %(default)s)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--paths", default=",".join(PATH_NAMES),
                        help="comma-separated paths to compare, of these, fastdiff-nographs (the Sampler without "
                             "CUDA graphs) and openvino (OpenVINO's default CPU settings; the optional openvino "
                             "package) (default: %(default)s)")
    parser.add_argument("--repeats", type=positive_int,
                        help="timed calls per path and batch after warm-up (default: 7 CPU, 10 GPU)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=seed_int, default=0, help="noise seed shared by all paths (default: %(default)s)")
    parser.add_argument("--out", type=Path,
                        help="folder for JSON + PNG (default: out/bench; with --quality benchmarks/quality)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny random model, 2 steps, batch 2, 2 repeats (< 60 s on a CPU)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress display")
    parser.add_argument("--quality", action="store_true",
                        help="speed at equal quality on the built-in digits model: DDPM 1000, DDIM, DPM-Solver++ "
                             "2M/3M and SDE at several step counts, FD to held-out digits against images/s "
                             "(eager reference path; sets cached under OUT/sets, so a stopped run resumes; "
                             "default OUT: benchmarks/quality)")
    parser.add_argument("--tuned", action="store_true",
                        help="with --quality: default against tuned timesteps instead (DPM-Solver++ 2M/3M and UniPC at 4, 5, 6, "
                             "8, 10 calls, the built-in model's schedules/; precision, recall, ode_error; writes "
                             "OUT/tuned.json/.md/.png)")
    parser.add_argument("--ode-size", type=positive_int, default=500,
                        help="--quality: evaluation x_T of the ode_error column (solved once and cached; default: %(default)s)")
    parser.add_argument("--num-samples", type=positive_int, default=1000,
                        help="--quality: samples per sampler (default: %(default)s)")
    parser.add_argument("--chunk", type=positive_int, default=250,
                        help="--quality: samples per sampler call (default: %(default)s)")
    parser.add_argument("--speedup-samples", type=positive_int, default=100,
                        help="--quality: images the headline's end-to-end timing runs on (reference DDPM-1000 "
                             "against fastdiff's Sampler; at most --chunk) (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    if args.tuned and not args.quality:
        raise UsageError("--tuned applies with --quality only")
    if args.quality:
        return _run_quality(args)
    from fastdiff.bench.harness import BenchSettings

    paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())
    batches = tuple(b for group in args.batch for b in group) if args.batch else None
    settings = BenchSettings(model=args.model, config=args.config, batches=batches, steps=args.steps,
                             sampler=args.sampler, dtype=args.dtype, device=args.device, paths=paths,
                             repeats=args.repeats, seed=args.seed, quick=args.quick, threads=args.threads)
    try:
        settings = settings.resolved()
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    args.out = args.out or Path("out/bench")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    if args.model is not None:
        from fastdiff.models.folders import read_model_info

        try:
            read_model_info(args.model)  # a bad folder is a usage error before any work
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--model: {e}") from None

    from fastdiff.bench import environment, report
    from fastdiff.bench.harness import run_bench

    result = run_bench(settings, progress=not args.no_progress)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = _result_stem(args.out, environment.device_slug(settings.device), settings.quick)
    json_path = report.write_json(result, args.out / f"{stem}.json")
    png_path = report.plot_png(result, args.out / f"{stem}.png")
    print(report.render(result))
    print(f"\nwrote: {json_path} and {png_path}")
    return 0


def _result_stem(folder: Path, device_slug: str, quick: bool) -> str:
    """"<date>_<device>[_quick]", with the time added when that name is taken."""
    now = datetime.datetime.now()
    stem = f"{now:%Y-%m-%d}_{device_slug}" + ("_quick" if quick else "")
    if (folder / f"{stem}.json").exists():
        stem += f"_{now:%H%M%S}"
    return stem


def _int_list(text: str) -> list[int]:
    """"4" or "1,4,16" -> integers (range checks happen with the other settings, before any work)."""
    try:
        return [int(part) for part in re.split(r"[,\s]+", text.strip()) if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None


def _run_quality(args: argparse.Namespace) -> int:
    """--quality: draw the sweep's sets (resuming from the cache), then write the report."""
    out = args.out or Path("benchmarks/quality")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    import torch

    from fastdiff.bench import quality

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tuned:
        report = quality.write_tuned_report(out, args.num_samples, args.chunk, args.seed, args.ode_size,
                                            progress=not args.no_progress)
        print(quality.render_markdown(report))
        print(f"wrote: {out / 'tuned.json'}, {out / 'tuned.md'}, {out / 'tuned.png'} and {out / 'grids'}/")
        return 0
    quality.draw_sets(out, args.num_samples, args.chunk, seed=args.seed, progress=not args.no_progress)
    quality.ensure_speedup(out, min(args.speedup_samples, args.chunk, args.num_samples), scored=args.num_samples)
    report = quality.write_report(out, num_samples=args.num_samples, ode=quality.evaluation_reference(out, args.ode_size))
    print(quality.render_markdown(report))
    print(f"wrote: {out / 'quality.json'}, {out / 'quality.md'}, {out / 'quality.png'} and {out / 'grids'}/")
    return 0
