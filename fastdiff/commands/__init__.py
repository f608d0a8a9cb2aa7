"""``fastdiff`` subcommands: one module each, defining ``configure(parser)`` and ``run(args) -> int``.

:mod:`fastdiff.cli` imports a command's module only when that command runs.
"""
from __future__ import annotations

import argparse
import re


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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0 (nan refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


#: Random-init presets a command can take with --config instead of a model folder.
PRESETS = ("default", "cifar10", "tiny")
#: fastdiff.schedule.METHODS, restated so that `fastdiff COMMAND --help` needs no torch import.
SAMPLERS = ("ddpm", "ddim")


def load_model_arg(args: argparse.Namespace, device: str):
    """The model named by ``--config PRESET`` (random init) or ``--model FOLDER`` (default: the
    built-in model) -> (model, ModelInfo); a bad folder is a UsageError naming --model."""
    from fastdiff.io import load_model, random_init_model
    from fastdiff.unet import UNetConfig

    if args.config is not None:
        preset = {"default": UNetConfig, "cifar10": UNetConfig.cifar10, "tiny": UNetConfig.tiny}[args.config]
        return random_init_model(preset(), device=device)
    try:
        return load_model(args.model, device=device)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--model: {e}") from None
