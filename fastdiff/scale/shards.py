"""Large-N sampling in fixed-size shards: per-image noise, atomic shard folders, a manifest, resume.

Noise. Image ``i``'s randomness depends only on ``(seed, i)``, never on the batch, the shard
size, the number of processes or the order shards are done in. With ``e`` the element index
within the image, Philox gives (:func:`fastdiff.ops.reference.philox_normal`)::

    x_T[i][e]        = philox_normal(seed, e, i, X_T_WORD, 0)
    z at step s[i][e] = philox_normal(seed, e, i, 0, s)

The z words are exactly those the fused step kernel draws in-kernel when its rng is
``[seed, 0, first image index]`` (``fastdiff.kernels.sampler_step``), so a GPU can draw each
z in the kernel, keyed by global image index, instead of reading it from memory.

Layout of the output folder (``out``)::

    run.json            the run's settings; a later run with other settings is refused
    shards/00003/       shard 3, renamed into place whole (so present means complete):
        images.npz      (n, H, W, C) uint8 under key "images", images in index order
        0000300.png ... one PNG per image, named by global index (a folder pytorch-fid,
                        clean-fid and torch-fidelity read)
        shard.json      the manifest entry: indices, settings hash, checksums
    manifest.json       written by rank 0 when every shard verifies: settings + all entries
    images.npz          optional (``merge=True``): all N images in index order

Processes. Shard ``k`` belongs to rank ``k % world_size``; a rank samples its shards, writes
each one atomically and talks to no other rank. Rank 0's progress bar counts the shard
folders on the (shared) file system. The one collective is the barrier at the end, after which
rank 0 verifies every shard and writes the manifest. A re-run (any world size) verifies each
shard's checksums, skips those that pass and redoes the rest: a rank killed mid-shard leaves
only a temporary folder, which the re-run removes.
"""
from __future__ import annotations

import hashlib
import io as _io
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fastdiff.files import atomic_write
from fastdiff.images import save_npz, to_uint8
from fastdiff.ops.reference import philox_noise_like
from fastdiff.sampling import ExternalNoise, sample_reference
from fastdiff.sampling.sampler import Sampler
from fastdiff.scale.distributed import World, join
from fastdiff.schedulers import StepTable

FORMAT = "fastdiff-shards"
FORMAT_VERSION = 1
#: Third Philox counter word of x_T; z at step s uses (0, s).
X_T_WORD = 0xFFFFFFFF
NOISE_SCHEME = "philox4x32-10: x_T = (seed; element, image, 0xFFFFFFFF, 0), z_s = (seed; element, image, 0, s)"
RUN_FILE, MANIFEST_FILE, SHARDS_DIR, SHARD_FILE, SHARD_NPZ, MERGED_NPZ = (
    "run.json", "manifest.json", "shards", "shard.json", "images.npz", "images.npz",
)
#: Test hook: the process that writes this shard dies (exit 137) after writing its temporary
#: folder and before renaming it into place, as a rank killed mid-write would.
KILL_ENV = "FASTDIFF_TEST_KILL_AT_SHARD"
INDEX_DIGITS = 7

#: ``sample(noise, class_labels) -> (B, C, H, W)`` float images in [-1, 1].
SampleFn = Callable[[ExternalNoise, "torch.Tensor | None"], torch.Tensor]


# ---------------------------------------------------------------- per-image noise


def image_noise(table: StepTable, start: int, count: int, image_shape, seed: int) -> ExternalNoise:
    """x_T and every step's z for images ``start .. start + count - 1`` (see the module doc); each
    step's z is drawn when the sampler reaches it (a CIFAR-10 shard of 100 at 1000 DDPM steps
    would otherwise hold 1.2 GB of z)."""
    _check_seed(seed)
    if start < 0 or count < 1:
        raise ValueError(f"need start >= 0 and count >= 1, got start {start}, count {count}")
    template = torch.empty((count, *image_shape))
    x_T = philox_noise_like(template, seed, X_T_WORD, 0, first_sample=start)
    return ExternalNoise.drawn_per_step(
        x_T, table.num_steps, lambda step: philox_noise_like(template, seed, 0, step, first_sample=start)
    )


def class_labels_for(start: int, count: int, num_classes: int | None) -> torch.Tensor | None:
    """Image i's class label is ``i % num_classes`` (None for an unconditional model)."""
    if not num_classes:
        return None
    return torch.arange(start, start + count, dtype=torch.int64) % num_classes


# ---------------------------------------------------------------- the plan and its settings


@dataclass(frozen=True)
class ShardPlan:
    """N images cut into shards of ``shard_size`` (the last one may be smaller)."""

    num_images: int
    shard_size: int

    def __post_init__(self):
        for name in ("num_images", "shard_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def span(self, shard: int) -> tuple[int, int]:
        """[start, stop) image indices of ``shard``."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_images)

    def owned_by(self, world: World) -> list[int]:
        return list(range(world.rank, self.num_shards, world.size))


def model_hash(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def table_hash(table: StepTable) -> str:
    """sha256 of the step table: the sampler, its steps, eta and clamp, exactly."""
    digest = hashlib.sha256(f"{table.method}:{table.clip}".encode())
    for tensor in (table.timesteps, table.coefs):
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_settings(plan: ShardPlan, table: StepTable, seed: int, image_shape, model_sha256: str,
                 num_classes: int | None, path: str) -> dict:
    """Everything that decides the images; a resumed run must match it exactly."""
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "num_images": plan.num_images, "shard_size": plan.shard_size,
        "seed": seed, "sampler": table.method, "steps": table.num_steps, "table_sha256": table_hash(table),
        "image_shape": list(image_shape), "num_classes": num_classes or 0, "model_sha256": model_sha256,
        "path": path, "noise": NOISE_SCHEME,
    }


# ---------------------------------------------------------------- running


@dataclass(frozen=True)
class ShardRunResult:
    out: Path
    manifest: Path | None  # None on ranks other than 0
    shards_sampled: int  # by this process in this run
    shards_skipped: int  # verified and kept
    shards_redone: int  # present but failed verification
    images_sampled: int
    seconds: float
    world_size: int


def sample_shards(
    sample: SampleFn,
    table: StepTable,
    out,
    num_images: int,
    image_shape,
    model_sha256: str,
    *,
    shard_size: int = 100,
    seed: int = 0,
    num_classes: int | None = None,
    path: str = "reference",
    merge: bool = False,
    progress: bool = True,
    world: World | None = None,
) -> ShardRunResult:
    """Sample ``num_images`` images into ``out`` in shards, resuming what a previous run left.

    ``sample(noise, class_labels)`` draws one shard from the given noise. ``world``: this
    process's place (default: :func:`fastdiff.scale.distributed.join`). Every rank calls this with
    the same arguments. Raises ValueError for bad input or an ``out`` holding a run with other
    settings, RuntimeError if the finished set does not verify.
    """
    plan = ShardPlan(num_images, shard_size)
    _check_seed(seed)
    world = world or join()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out}: exists and is not a folder")
    settings = run_settings(plan, table, seed, image_shape, model_sha256, num_classes, path)
    _claim(out, settings)
    settings_sha = _sha256_json(settings)
    shards_dir = out / SHARDS_DIR

    bar = _ProgressBar(shards_dir, plan) if progress and world.is_main else None
    start_time = time.perf_counter()
    sampled = skipped = redone = images = 0
    for shard in plan.owned_by(world):
        first, stop = plan.span(shard)
        folder = shards_dir / _shard_name(shard)
        _remove_temporaries(shards_dir, shard)
        if folder.is_dir():
            problem = verify_shard(folder, first, stop, settings_sha)
            if problem is None:
                skipped += 1
                continue
            redone += 1
            _discard(folder)
        noise = image_noise(table, first, stop - first, image_shape, seed)
        pictures = sample(noise, class_labels_for(first, stop - first, num_classes))
        _write_shard(shards_dir, shard, first, pictures, settings_sha)
        sampled, images = sampled + 1, images + stop - first
        if bar is not None:
            bar.refresh()

    world.barrier()  # the only collective: every rank's shards are on disk after it
    manifest = None
    if world.is_main:
        manifest = _finish(out, plan, settings, settings_sha, world, merge)
        if bar is not None:
            bar.close()
    return ShardRunResult(out, manifest, sampled, skipped, redone, images, time.perf_counter() - start_time, world.size)


def verify_shard(folder: Path, start: int, stop: int, settings_sha: str) -> str | None:
    """None if ``folder`` holds images ``start .. stop - 1`` of this run intact, else what is wrong."""
    try:
        entry = json.loads((folder / SHARD_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable {SHARD_FILE} ({e})"
    if entry.get("start") != start or entry.get("stop") != stop:
        return f"holds images {entry.get('start')}..{entry.get('stop')}, expected {start}..{stop}"
    if entry.get("settings_sha256") != settings_sha:
        return "written by a run with other settings"
    try:
        npz_bytes = (folder / SHARD_NPZ).read_bytes()
        pngs = _png_digest(folder, start, stop)
        with np.load(_io.BytesIO(npz_bytes)) as data:
            array = data["images"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable files ({e})"
    if hashlib.sha256(npz_bytes).hexdigest() != entry.get("npz_sha256"):
        return f"{SHARD_NPZ} checksum mismatch"
    if pngs != entry.get("png_sha256"):
        return "PNG checksum mismatch"
    if array.dtype != np.uint8 or array.shape[0] != stop - start or _array_sha(array) != entry.get("images_sha256"):
        return "image array does not match its entry"
    return None


def load_images(out) -> np.ndarray:
    """All images of a finished run (``manifest.json`` present), (N, H, W, C) uint8 in index order."""
    out = Path(out)
    return _concatenate_shards(out, json.loads((out / MANIFEST_FILE).read_text())["shards"])


def sample_model(
    model: torch.nn.Module, table: StepTable, out, num_images: int, *, device="cpu",
    accelerated_dtype: torch.dtype | None = None, cache="auto", **options,
) -> ShardRunResult:
    """:func:`sample_shards` for a fastdiff ``UNet``: the eager reference sampler, or with
    ``accelerated_dtype`` the accelerated :class:`fastdiff.Sampler`, each shard from its
    per-image noise, its compiled steps kept in ``cache`` (the Sampler's argument). ``options``:
    those of :func:`sample_shards`."""
    config = model.config
    image_shape = (config.in_channels, config.image_size, config.image_size)
    if accelerated_dtype is None:
        path = "reference"

        def sample(noise, class_labels):
            return sample_reference(model, table, noise=noise, class_labels=class_labels, device=device)
    else:
        sampler = Sampler(model, table, dtype=accelerated_dtype, device=device, cache=cache)
        path = f"accelerated {str(accelerated_dtype).removeprefix('torch.')}"

        def sample(noise, class_labels):
            return sampler.sample(noise=noise, class_labels=class_labels)

    return sample_shards(sample, table, out, num_images, image_shape, model_hash(model),
                         num_classes=config.num_classes, path=path, **options)


# ---------------------------------------------------------------- internals


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")


def _shard_name(shard: int) -> str:
    return f"{shard:05d}"


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _array_sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _png_name(index: int) -> str:
    return f"{index:0{INDEX_DIGITS}d}.png"


def _png_digest(folder: Path, start: int, stop: int) -> str:
    digest = hashlib.sha256()
    for index in range(start, stop):
        name = _png_name(index)
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def _claim(out: Path, settings: dict) -> None:
    """Write ``run.json`` (every rank writes the same bytes, atomically) or check it matches."""
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            saved = json.loads(run_file.read_text())
        except ValueError as e:
            raise ValueError(f"{run_file}: not readable JSON ({e}); remove it or use another output folder") from None
        differences = [
            f"{key}: folder has {saved.get(key)!r}, this run {settings.get(key)!r}"
            for key in sorted(set(saved) | set(settings))
            if saved.get(key) != settings.get(key)
        ]
        if differences:
            raise ValueError(
                f"{out} holds a sampling run with other settings ({'; '.join(differences)}): "
                "use another output folder or the same settings"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(settings, indent=2, sort_keys=True) + "\n"
    atomic_write(run_file, lambda tmp: tmp.write_text(text))


def _write_shard(shards_dir: Path, shard: int, start: int, images: torch.Tensor, settings_sha: str) -> Path:
    """Write a shard into a temporary folder and rename it into place: present means complete.

    Files are not fsync'ed one by one: the checksums verified on every resume catch whatever a
    power loss could tear."""
    array = to_uint8(images)
    stop = start + array.shape[0]
    shards_dir.mkdir(parents=True, exist_ok=True)
    tmp = shards_dir / f".{_shard_name(shard)}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        for offset, image in enumerate(array):
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp / _png_name(start + offset))
        buffer = _io.BytesIO()
        np.savez_compressed(buffer, images=array)
        (tmp / SHARD_NPZ).write_bytes(buffer.getvalue())
        entry = {
            "shard": shard, "folder": _shard_name(shard), "start": start, "stop": stop, "settings_sha256": settings_sha,
            "images_sha256": _array_sha(array), "npz_sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
            "png_sha256": _png_digest(tmp, start, stop),
        }
        (tmp / SHARD_FILE).write_text(json.dumps(entry, indent=2) + "\n")
        if os.environ.get(KILL_ENV) == str(shard):
            os._exit(137)
        folder = shards_dir / _shard_name(shard)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _discard(folder: Path) -> None:
    """Move a failed shard aside, then delete it (a crash in between leaves no shard: redone)."""
    aside = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.tmp")
    os.replace(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _remove_temporaries(shards_dir: Path, shard: int) -> None:
    """Temporary folders of ``shard`` left by a killed process (only its owner touches them)."""
    if shards_dir.is_dir():
        for leftover in shards_dir.glob(f".{_shard_name(shard)}.*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)


def _finish(out: Path, plan: ShardPlan, settings: dict, settings_sha: str, world: World, merge: bool) -> Path:
    """Rank 0, after the barrier: verify every shard, write the manifest (and the merged npz)."""
    entries, problems = [], []
    for shard in range(plan.num_shards):
        start, stop = plan.span(shard)
        folder = out / SHARDS_DIR / _shard_name(shard)
        problem = "missing" if not folder.is_dir() else verify_shard(folder, start, stop, settings_sha)
        if problem is not None:
            problems.append(f"shard {shard} (images {start}..{stop - 1}): {problem}")
            continue
        entries.append(json.loads((folder / SHARD_FILE).read_text()))
    if problems:
        raise RuntimeError(
            f"{out}: {len(problems)} of {plan.num_shards} shards are not complete ({'; '.join(problems[:5])}); "
            "run the same command again to redo them"
        )
    covered = [i for e in entries for i in range(e["start"], e["stop"])]
    if covered != list(range(plan.num_images)):
        raise RuntimeError(f"{out}: shard indices do not cover 0..{plan.num_images - 1} exactly once")
    set_digest = hashlib.sha256("".join(e["images_sha256"] for e in entries).encode()).hexdigest()
    manifest = {
        "settings": settings, "shards": entries, "num_shards": plan.num_shards,
        "images_sha256_of_shards": set_digest, "world_size": world.size,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if merge:
        save_npz(_concatenate_shards(out, entries), out / MERGED_NPZ)
        manifest["merged_npz"] = MERGED_NPZ
    text = json.dumps(manifest, indent=2) + "\n"
    return atomic_write(out / MANIFEST_FILE, lambda tmp: tmp.write_text(text))


def _concatenate_shards(out: Path, entries: list[dict]) -> np.ndarray:
    parts = []
    for entry in entries:
        with np.load(out / SHARDS_DIR / entry["folder"] / SHARD_NPZ) as data:
            parts.append(data["images"])
    return np.concatenate(parts)


class _ProgressBar:
    """Rank 0's bar: images done / N across all ranks (shard folders on disk), aggregate images/s."""

    def __init__(self, shards_dir: Path, plan: ShardPlan):
        self.shards_dir, self.plan = shards_dir, plan
        self.initial = self._done()
        self.start = time.perf_counter()
        self.bar = tqdm(total=plan.num_images, initial=self.initial, unit="img", desc="sampling (all ranks)",
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")

    def _done(self) -> int:
        if not self.shards_dir.is_dir():
            return 0
        done = 0
        for folder in self.shards_dir.iterdir():
            if folder.name.isdigit():
                start, stop = self.plan.span(int(folder.name))
                done += max(0, stop - start)
        return done

    def refresh(self) -> None:
        done = self._done()
        self.bar.update(done - self.bar.n)
        rate = (done - self.initial) / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:.1f} img/s all ranks")

    def close(self) -> None:
        self.refresh()
        self.bar.close()


__all__ = [
    "image_noise", "class_labels_for", "ShardPlan", "model_hash", "table_hash", "run_settings", "sample_shards",
    "verify_shard", "load_images", "sample_model", "ShardRunResult", "X_T_WORD",
]
