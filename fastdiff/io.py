"""Model folders (``config.json`` + ``model.safetensors``) and atomic file writes.

Loading never touches the network. Every file fastdiff writes goes through
:func:`atomic_write`, so a crash or an error leaves the old file or none, never half of one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import time
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
        """The model's :class:`~fastdiff.schedule.NoiseSchedule` (what it was trained with)."""
        from fastdiff.schedule import make_schedule

        return make_schedule(self.schedule, self.num_timesteps)


#: Attribute :func:`load_model` sets on the model: its NoiseSchedule, the default of fastdiff.Sampler.
SCHEDULE_ATTRIBUTE = "fastdiff_schedule"


def _with_schedule(model, info: ModelInfo):
    setattr(model, SCHEDULE_ATTRIBUTE, info.noise_schedule())
    return model, info


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


#: Environment variables of the test-only pause hook (see :func:`pause_point`).
PAUSE_AT_ENV = "FASTDIFF_TEST_PAUSE_AT"
PAUSE_FILE_ENV = "FASTDIFF_TEST_PAUSE_FILE"


def pause_point(name: str) -> None:
    """A hook for kill tests, inert unless ``$FASTDIFF_TEST_PAUSE_AT`` is ``name``: then it
    creates ``$FASTDIFF_TEST_PAUSE_FILE`` (so the test knows the process got here) and sleeps,
    waiting to be killed. Placed between the writes of multi-file outputs."""
    if os.environ.get(PAUSE_AT_ENV) != name:
        return
    Path(os.environ[PAUSE_FILE_ENV]).write_text(str(os.getpid()))
    time.sleep(600)


def _temp_path(path: Path, suffix: str = "") -> Path:
    """A fresh temp name beside ``path``; it carries our pid so a later run can tell it is stale."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path) -> list[Path]:
    """Remove the temp files and folders that :func:`atomic_write` / :func:`atomic_folder` left
    beside ``path`` in a process that no longer runs (killed mid-write); returns what went.
    Temps of live processes (and of this one) are left alone."""
    path = Path(path)
    # New names carry the writer's pid; the older form (12 hex digits, no pid) is always stale.
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)-[0-9a-f]{{8}}|[0-9a-f]{{12}})\.tmp")
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None:
            continue
        pid = int(match[1]) if match[1] else None
        if pid is not None and (pid == os.getpid() or _process_alive(pid)):
            continue
        if entry.name.endswith(".tmp.old") and not path.exists():
            os.rename(entry, path)  # killed between _swap_in's two renames: the old set goes back
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def atomic_write(path, write_fn: Callable[[Path], object]) -> Path:
    """Call ``write_fn(tmp_path)`` to write a temp file beside ``path``, then rename it over ``path``.

    The temp name keeps ``path``'s suffix (numpy and PIL pick the format from it). On error the
    temp file is removed and ``path`` is left as it was; temps that a killed earlier run left
    beside ``path`` are removed first. The file gets the usual permissions (0o666 less the
    umask) whatever the writer chose: safetensors writes 0o600.
    """
    path = Path(path)
    remove_stale_temps(path)
    tmp = _temp_path(path, path.suffix)
    try:
        write_fn(tmp)
        os.chmod(tmp, _default_file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        pause_point("atomic-write")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_folder(folder):
    """Write a set of files as one unit: ``with atomic_folder(out) as staging:`` write into
    ``staging``; on a clean exit it replaces ``out`` in one rename, on an error (or Ctrl-C) it
    is removed and ``out`` stays as it was. Killed at any moment, ``out`` holds the whole old
    set or the whole new set, never a mix.

    Files already in ``out`` that the new set does not write are kept (hard-linked into the
    new folder, or copied where links do not work). Entering it creates the staging folder,
    so an unwritable destination fails before any work; stale temps of killed runs go first.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder)
        staging = _temp_path(folder)
        staging.mkdir()
    except OSError as e:
        raise OSError(f"cannot write into {folder}: {e.strerror or e}") from None
    try:
        yield staging
        if folder.is_dir():
            _link_missing(folder, staging)
            shutil.copymode(folder, staging)
        pause_point("folder-staged")
        _swap_in(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _link_missing(source: Path, target: Path) -> None:
    """Hard-link (or copy) every file under ``source`` that ``target`` lacks into ``target``."""
    for entry in source.iterdir():
        destination = target / entry.name
        if entry.is_dir() and not entry.is_symlink():
            destination.mkdir(exist_ok=True)
            _link_missing(entry, destination)
        elif not destination.exists() and not destination.is_symlink():
            try:
                os.link(entry, destination, follow_symlinks=False)
            except OSError:
                shutil.copy2(entry, destination, follow_symlinks=False)


def _swap_in(staging: Path, folder: Path) -> None:
    """Put ``staging`` at ``folder``: an atomic exchange where the OS has one (Linux
    renameat2), else rename the old folder aside, rename the new one in, remove the old."""
    if not folder.exists():
        os.rename(staging, folder)
    elif _exchange(staging, folder):
        shutil.rmtree(staging, ignore_errors=True)  # staging now holds the old set
    else:
        old = _temp_path(folder, ".old")
        os.rename(folder, old)
        os.rename(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_folder(folder.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_model(
    model,
    folder,
    extra: dict | None = None,
    schedule: str = "linear",
    num_timesteps: int = 1000,
) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` for a :class:`fastdiff.unet.UNet`.

    The two files are one unit (:func:`atomic_folder`): a crash leaves the old pair or the new
    pair, and other files already in ``folder`` are kept. ``config.json`` records the weights'
    SHA-256, which :func:`load_model` checks. ``extra`` (JSON-serialisable) is stored under
    ``"extra"`` and returned in :class:`ModelInfo`.
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
            from fastdiff.unet import UNetConfig

            model, info = random_init_model(UNetConfig.cifar10(), device=device, dtype=dtype)
            return model, dataclasses.replace(info, description=f"no built-in model shipped: {info.description}")
        folder = BUILTIN_FOLDER
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    info = read_model_info(folder)
    weights_path = folder / WEIGHTS_FILE
    tensors, sha256 = _read_weights(weights_path)

    from fastdiff.unet import UNet

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
    return _with_schedule(model.to(device=device, dtype=dtype).eval(), info)


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a safetensors file and the SHA-256 of its bytes."""
    from safetensors import SafetensorError
    from safetensors.torch import load

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

