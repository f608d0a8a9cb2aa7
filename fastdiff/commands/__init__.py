"""``fastdiff`` subcommands: one module each, defining ``configure(parser)`` and ``run(args) -> int``,
and the argument types they share. Commands parse arguments and call the library's API.

:mod:`fastdiff.cli` imports a command's module only when that command runs, and a command
imports torch and the library inside ``run``: ``fastdiff COMMAND --help`` stays instant.
May import: the whole library; nothing in the library imports it.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path


class UsageError(Exception):
    """A bad command-line value found after parsing; the CLI reports it argparse-style, exit code 2."""


def resolve_device(name: str | None) -> str:
    """``None`` -> "cuda" when a GPU is visible else "cpu"; "cuda" without a GPU is a UsageError."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here (torch {torch.__version__})")
    return name


def _int_at_least(minimum: int, name: str):
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = parse.__qualname__ = name
    return parse


positive_int = _int_at_least(1, "positive_int")
non_negative_int = _int_at_least(0, "non_negative_int")


#: Seeds are in [0, 2**63): what torch's generators and the training checkpoint both hold.
SEED_LIMIT = 2**63


def seed_int(text: str) -> int:
    """argparse type: an integer seed in [0, 2**63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {value}")
    return value


def _finite_float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (nan and inf refused)."""
    value = _finite_float(text, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (nan and inf refused)."""
    value = _finite_float(text, "a number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def unit_interval_float(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    value = _finite_float(text, "a number in [0, 1)")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def load_model_arg(args: argparse.Namespace, device: str):
    """The model named by ``--config PRESET`` (random init) or ``--model FOLDER`` (default: the
    built-in model) -> (model, ModelInfo); a bad folder is a UsageError naming --model."""
    from fastdiff.models.folders import load_model, random_init_model
    from fastdiff.models.unet import preset_config

    if args.config is not None:
        return random_init_model(preset_config(args.config), device=device)
    try:
        return load_model(args.model, device=device)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--model: {e}") from None


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cache-dir", type=Path, metavar="FOLDER",
                       help="compiled-artifact cache (default: $FASTDIFF_CACHE_DIR, else $XDG_CACHE_HOME/fastdiff, "
                            "else ~/.cache/fastdiff)")
    group.add_argument("--no-cache", action="store_true",
                       help="compile in this process only: neither load nor store compiled steps")


def cache_arg(args: argparse.Namespace):
    """--cache-dir / --no-cache as the Sampler's ``cache`` argument; a --cache-dir that is a
    file is a usage error."""
    if args.no_cache:
        return False
    if args.cache_dir is None:
        return "auto"
    if args.cache_dir.exists() and not args.cache_dir.is_dir():
        raise UsageError(f"--cache-dir {args.cache_dir}: exists and is not a folder")
    return args.cache_dir


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=positive_int,
        help="torch CPU threads (default: the cores not busy with other work -- this machine's cores "
             "less its 1-minute load average, at least 1)",
    )


def default_threads() -> int:
    """The cores left idle by other work: usable cores less the 1-minute load, rounded, >= 1.

    More threads than idle cores is many times slower (README, "Limitations": threads): OpenMP
    threads spin-wait at every parallel region for a core another process holds. On an idle
    machine this is every core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, math.floor(cores - os.getloadavg()[0] + 0.5)))


def apply_threads(requested: int | None, processes: int = 1) -> str:
    """Set torch's intra-op threads (``requested``, else :func:`default_threads` shared by the
    ``processes`` on this machine); returns a line for the command's output saying what was
    chosen and why."""
    import torch

    threads = requested or max(1, default_threads() // processes)
    torch.set_num_threads(threads)
    if requested:
        return f"{threads} (--threads)"
    shared = f"; shared by {processes} processes" if processes > 1 else ""
    return (f"{threads} (of {os.cpu_count()} cores; 1-minute load {os.getloadavg()[0]:.1f}{shared}; "
            "--threads to choose)")
