"""Model folders (``config.json`` + ``model.safetensors``): save, load (hash-checked), read.

Loading never touches the network; the files are written with :func:`fastdiff.files.atomic_write`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from fastdiff.files import atomic_folder, atomic_write
from fastdiff.models.unet import UNet, UNetConfig, count_parameters
from fastdiff.pause import pause_point
from fastdiff.schedulers import make_schedule, tuned

if TYPE_CHECKING:
    from fastdiff.models.unet import UNetConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "fastdiff-unet"
FORMAT_VERSION = 1
#: Folder of the built-in model (a small trained digits model, when shipped).
BUILTIN_FOLDER = Path(__file__).parent / "weights" / "digits"
#: Seed of the random-init fallback when no built-in model is shipped.
RANDOM_INIT_SEED = 0

# Keys config.json holds beside the UNetConfig fields.
WEIGHTS_HASH_KEY = "weights_sha256"
_HEADER_KEYS = ("format", "version", "schedule", "num_timesteps", "extra", WEIGHTS_HASH_KEY)


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
    weights_sha256: str | None = None  # recorded by save_model; folders written before it lack it

    def noise_schedule(self):
        """The model's :class:`~fastdiff.schedulers.NoiseSchedule` (what it was trained with)."""
        return make_schedule(self.schedule, self.num_timesteps)


#: Attribute :func:`load_model` sets on the model: its NoiseSchedule, the default of fastdiff.Sampler.
SCHEDULE_ATTRIBUTE = "fastdiff_schedule"
#: Attribute :func:`load_model` sets on the model: its ModelInfo (where fastdiff.Sampler finds tuned schedules).
MODEL_INFO_ATTRIBUTE = "fastdiff_model_info"
#: Sub-folder of a model folder holding its tuned schedules (``<sampler>-<K>.json``).
SCHEDULES_FOLDER = "schedules"


def _with_schedule(model, info: ModelInfo):
    setattr(model, SCHEDULE_ATTRIBUTE, info.noise_schedule())
    setattr(model, MODEL_INFO_ATTRIBUTE, info)
    return model, info


def tuned_schedule_path(folder, sampler: str, calls: int) -> Path:
    return Path(folder) / SCHEDULES_FOLDER / tuned.file_name(sampler, calls)


def read_tuned_schedule(info: ModelInfo, sampler: str, calls: int) -> tuned.TunedSchedule | None:
    """The model folder's tuned schedule for ``sampler`` at ``calls`` steps; None when it has none.
    A damaged file, or one tuned for other weights, is a ValueError naming it."""
    if info.folder is None:
        return None
    path = tuned_schedule_path(info.folder, sampler, calls)
    if not path.exists():
        return None
    return tuned.load_tuned(path, info.weights_sha256, info.num_timesteps)


def save_tuned_schedule(info: ModelInfo, schedule: tuned.TunedSchedule) -> Path:
    """Write ``schedule`` into the model folder (atomically). Refused (ValueError) unless the
    folder's weights file still has the SHA-256 config.json records and the schedule was tuned for it."""
    if info.folder is None:
        raise ValueError("tuned schedules are saved into a model folder; this model has none (random init)")
    weights_path = Path(info.folder) / WEIGHTS_FILE
    if info.weights_sha256 is None:
        raise ValueError(f"{info.folder / CONFIG_FILE}: records no {WEIGHTS_HASH_KEY}, so a tuned schedule could not "
                         "be tied to these weights: save the model again with this fastdiff")
    _, sha256 = _read_weights(weights_path)
    if sha256 != info.weights_sha256 or schedule.weights_sha256 != sha256:
        raise ValueError(f"{weights_path}: its SHA-256 {sha256[:12]}... does not match the weights the schedule was "
                         f"tuned with ({schedule.weights_sha256[:12]}...) or config.json's {WEIGHTS_HASH_KEY}")
    path = tuned_schedule_path(info.folder, schedule.sampler, schedule.calls)
    path.parent.mkdir(exist_ok=True)
    return tuned.save_tuned(path, schedule)


def save_model(
    model,
    folder,
    extra: dict | None = None,
    schedule: str = "linear",
    num_timesteps: int = 1000,
) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` for a :class:`fastdiff.models.unet.UNet`.

    The two files are one unit (:func:`atomic_folder`): a crash leaves the old pair or the new
    pair, and other files already in ``folder`` are kept. ``config.json`` records the weights'
    SHA-256, which :func:`load_model` checks. ``extra`` (JSON-serialisable) is stored under
    ``"extra"`` and returned in :class:`ModelInfo`.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError("model must be a fastdiff UNet (with a .config UNetConfig)")
    make_schedule(schedule, num_timesteps)  # validates the names before anything is written
    header = {"format": FORMAT, "version": FORMAT_VERSION, "schedule": schedule, "num_timesteps": num_timesteps}
    if extra:
        header["extra"] = dict(extra)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    folder = Path(folder)
    with atomic_folder(folder) as staging:
        weights = atomic_write(staging / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        header[WEIGHTS_HASH_KEY] = hashlib.sha256(weights.read_bytes()).hexdigest()
        pause_point("model-weights-written")
        config_text = json.dumps({**header, **config.to_dict()}, indent=2) + "\n"
        atomic_write(staging / CONFIG_FILE, lambda tmp: tmp.write_text(config_text))
    return folder


def load_model(folder=None, device="cpu", dtype: torch.dtype = torch.float32):
    """Load ``(UNet, ModelInfo)`` from a folder written by :func:`save_model`; eval mode.
    The model carries the folder's noise schedule as ``model.fastdiff_schedule``, so
    ``fastdiff.Sampler(model)`` samples with the schedule the model was trained with.

    ``folder=None`` loads the built-in model (:data:`BUILTIN_FOLDER`) when it is shipped, else
    a random-init ``UNetConfig.cifar10()`` with a fixed seed (``info.random_init`` says so).
    Missing folder or file: ``FileNotFoundError``; a corrupt or mismatched file: ``ValueError``;
    both name the file.
    """
    if folder is None:
        if not BUILTIN_FOLDER.is_dir():
            model, info = random_init_model(UNetConfig.cifar10(), device=device, dtype=dtype)
            return model, dataclasses.replace(info, description=f"no built-in model shipped: {info.description}")
        folder = BUILTIN_FOLDER
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    info = read_model_info(folder)
    weights_path = folder / WEIGHTS_FILE
    tensors, sha256 = _read_weights(weights_path)

    model = UNet(info.config)
    _check_state_dict(weights_path, tensors, model.state_dict())
    if info.weights_sha256 is not None and sha256 != info.weights_sha256:
        raise ValueError(
            f"{weights_path}: does not match config.json (its SHA-256 differs from {WEIGHTS_HASH_KEY}): "
            "the folder holds the weights and the config of different saves"
        )
    model.load_state_dict(tensors)
    return _with_schedule(model.to(device=device, dtype=dtype).eval(), info)


def read_model_info(folder) -> ModelInfo:
    """Parse and validate ``folder/config.json`` (no weights read)."""

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
    weights_sha256 = data.get(WEIGHTS_HASH_KEY)
    if weights_sha256 is not None and not (isinstance(weights_sha256, str) and re.fullmatch(r"[0-9a-f]{64}", weights_sha256)):
        raise ValueError(f"{path}: {WEIGHTS_HASH_KEY!r} must be 64 lowercase hex digits, got {weights_sha256!r}")
    try:
        make_schedule(schedule, num_timesteps)
        config = UNetConfig.from_dict({k: v for k, v in data.items() if k not in _HEADER_KEYS})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    return ModelInfo(config, folder, schedule, num_timesteps, extra, description=f"model folder {folder}",
                     weights_sha256=weights_sha256)


def random_init_model(config, seed: int = RANDOM_INIT_SEED, device="cpu", dtype: torch.dtype = torch.float32):
    """A freshly initialised UNet for ``config`` (same seed, same weights) and its ModelInfo.

    Leaves the global RNG state as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet(config)
    millions = count_parameters(model) / 1e6
    info = ModelInfo(
        config, None, random_init=True,
        description=f"random-init UNet ({millions:.2f}M parameters, {config.image_size}x{config.image_size}, "
        f"seed {seed}; untrained, so samples look like noise)",
    )
    return _with_schedule(model.to(device=device, dtype=dtype).eval(), info)


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a safetensors file and the SHA-256 of its bytes."""

    if not path.is_file():
        raise FileNotFoundError(f"{path}: model weights file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        tensors = load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors, hashlib.sha256(data).hexdigest()


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

