"""Model folders (``config.json`` + ``model.safetensors``) and atomic file writes.

Loading never touches the network. Every file fastdiff writes goes through
:func:`atomic_write`, so a crash or an error leaves the old file or none, never half of one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fastdiff.unet import UNetConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "fastdiff-unet"
FORMAT_VERSION = 1
#: Folder of the built-in model (a small trained digits model, when shipped).
BUILTIN_FOLDER = Path(__file__).parent / "weights" / "digits"
#: Seed of the random-init fallback when no built-in model is shipped.
RANDOM_INIT_SEED = 0

# Keys config.json holds beside the UNetConfig fields.
_HEADER_KEYS = ("format", "version", "schedule", "num_timesteps", "extra")


@dataclass(frozen=True)
class ModelInfo:
    """Where a model came from and what sampling it needs."""

    config: UNetConfig
    folder: Path | None  # None for a random-init model
    schedule: str = "linear"
    num_timesteps: int = 1000
    extra: dict = field(default_factory=dict)
    random_init: bool = False
    description: str = ""


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path, write_fn: Callable[[Path], object]) -> Path:
    """Call ``write_fn(tmp_path)`` to write a temp file beside ``path``, then rename it over ``path``.

    The temp name keeps ``path``'s suffix (numpy and PIL pick the format from it). On error the
    temp file is removed and ``path`` is left as it was. The file gets the usual permissions
    (0o666 less the umask) whatever the writer chose: safetensors writes 0o600.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp{path.suffix}")
    try:
        write_fn(tmp)
        os.chmod(tmp, _default_file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_model(
    model,
    folder,
    extra: dict | None = None,
    schedule: str = "linear",
    num_timesteps: int = 1000,
) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` for a :class:`fastdiff.unet.UNet`.

    A new folder is written in full under a temp name and then renamed; in an existing folder
    each file is replaced atomically (weights first), and other files there are kept.
    ``extra`` (JSON-serialisable) is stored under ``"extra"`` and returned in :class:`ModelInfo`.
    """
    from safetensors.torch import save_file

    from fastdiff.schedule import make_schedule

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError("model must be a fastdiff UNet (with a .config UNetConfig)")
    make_schedule(schedule, num_timesteps)  # validates the names before anything is written
    header = {"format": FORMAT, "version": FORMAT_VERSION, "schedule": schedule, "num_timesteps": num_timesteps}
    if extra:
        header["extra"] = dict(extra)
    config_text = json.dumps({**header, **config.to_dict()}, indent=2) + "\n"
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}

    def write_config(path: Path):
        path.write_text(config_text)

    def write_weights(path: Path):
        save_file(tensors, str(path), metadata={"format": "pt"})

    folder = Path(folder)
    if folder.is_dir():
        atomic_write(folder / WEIGHTS_FILE, write_weights)
        atomic_write(folder / CONFIG_FILE, write_config)
        return folder
    if folder.exists():
        raise FileExistsError(f"{folder} exists and is not a folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{secrets.token_hex(6)}.tmp")
    try:
        tmp.mkdir()
        atomic_write(tmp / WEIGHTS_FILE, write_weights)
        atomic_write(tmp / CONFIG_FILE, write_config)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_model(folder=None, device="cpu", dtype: torch.dtype = torch.float32):
    """Load ``(UNet, ModelInfo)`` from a folder written by :func:`save_model`; eval mode.

    ``folder=None`` loads the built-in model (:data:`BUILTIN_FOLDER`) when it is shipped, else
    a random-init ``UNetConfig.cifar10()`` with a fixed seed (``info.random_init`` says so).
    Missing folder or file: ``FileNotFoundError``; a corrupt or mismatched file: ``ValueError``;
    both name the file.
    """
    if folder is None:
        if not BUILTIN_FOLDER.is_dir():
            from fastdiff.unet import UNetConfig

            model, info = random_init_model(UNetConfig.cifar10(), device=device, dtype=dtype)
            return model, dataclasses.replace(info, description=f"no built-in model shipped: {info.description}")
        folder = BUILTIN_FOLDER
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    info = read_model_info(folder)
    weights_path = folder / WEIGHTS_FILE
    tensors = _read_weights(weights_path)

    from fastdiff.unet import UNet

    model = UNet(info.config)
    _check_state_dict(weights_path, tensors, model.state_dict())
    model.load_state_dict(tensors)
    return model.to(device=device, dtype=dtype).eval(), info


def read_model_info(folder) -> ModelInfo:
    """Parse and validate ``folder/config.json`` (no weights read)."""
    from fastdiff.schedule import make_schedule
    from fastdiff.unet import UNetConfig

    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model config file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format must be {FORMAT!r}, got {data.get('format')!r}")
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported version {data.get('version')!r} (this fastdiff reads {FORMAT_VERSION})")
    schedule, num_timesteps = data.get("schedule", "linear"), data.get("num_timesteps", 1000)
    extra = data.get("extra", {})
    if not isinstance(extra, dict):
        raise ValueError(f"{path}: 'extra' must be a JSON object")
    try:
        make_schedule(schedule, num_timesteps)
        config = UNetConfig.from_dict({k: v for k, v in data.items() if k not in _HEADER_KEYS})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    return ModelInfo(config, folder, schedule, num_timesteps, extra, description=f"model folder {folder}")


def random_init_model(config, seed: int = RANDOM_INIT_SEED, device="cpu", dtype: torch.dtype = torch.float32):
    """A freshly initialised UNet for ``config`` (same seed, same weights) and its ModelInfo.

    Leaves the global RNG state as it was.
    """
    from fastdiff.unet import UNet, count_parameters

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet(config)
    millions = count_parameters(model) / 1e6
    info = ModelInfo(
        config, None, random_init=True,
        description=f"random-init UNet ({millions:.2f}M parameters, {config.image_size}x{config.image_size}, "
        f"seed {seed}; untrained, so samples look like noise)",
    )
    return model.to(device=device, dtype=dtype).eval(), info


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: model weights file not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _check_state_dict(path: Path, tensors: dict, expected: dict) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing tensors {_preview(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors {_preview(unexpected)}")
        raise ValueError(f"{path}: does not match config.json: {'; '.join(problems)}")
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(got.shape)}, config.json implies {tuple(want.shape)}"
            )
        if got.is_floating_point() != want.is_floating_point():
            raise ValueError(f"{path}: tensor {name!r} has dtype {got.dtype}, expected a {want.dtype}-like tensor")


def _preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"

