"""DDPM training (Ho et al. 2020, Algorithm 1, L_simple) with resumable, atomic checkpoints.

One step: draw a batch and uniform timesteps from a seeded ``torch.Generator``, let the fused
q-sample op produce x_t and the noise (Philox keyed by the step number, so no noise tensor is
drawn on the host), regress eps with MSE, clip the gradient norm, AdamW, then update an EMA of
the weights.

A checkpoint is one safetensors file holding the raw and EMA weights, the optimizer state and
every random-number state, with the configs and step in its metadata; it is replaced
atomically, so a kill mid-write leaves the previous one. Resuming restores all of it, and on
CPU the resumed run's weights equal the uninterrupted run's bit for bit (with the same thread
count: the checkpoint records it and a resume with another count warns).

Guards: a non-finite loss or gradient norm stops training with :class:`NonFiniteError` before
the optimizer step, so the weights and the last checkpoint stay good; a checkpoint is checked
in full (every key, shape and dtype, the step, the metadata) before any of it is restored.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from fastdiff.files import atomic_write
from fastdiff.models.folders import save_model
from fastdiff.models.unet import UNet, UNetConfig
from fastdiff.ops import q_sample
from fastdiff.scale.distributed import World
from fastdiff.schedulers import make_schedule

CHECKPOINT_FORMAT = "fastdiff-train-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.safetensors"
_METADATA_KEYS = ("step", "model_config", "train_config", "optimizer_param_groups", "data_shape")
_OPTIMIZER_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")  # AdamW's per-parameter state


class NonFiniteError(RuntimeError):
    """Training met a NaN/Inf loss or gradient; the weights were not updated with it."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes the optimisation; a resumed run must use the same values
    (``steps``, the total to train to, may grow)."""

    steps: int = 10_000
    batch_size: int = 64
    lr: float = 5e-4
    lr_warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    schedule: str = "linear"
    num_timesteps: int = 1000

    def __post_init__(self):
        for name in ("steps", "batch_size", "num_timesteps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.lr_warmup_steps, int) or isinstance(self.lr_warmup_steps, bool) or self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be an integer >= 0, got {self.lr_warmup_steps!r}")
        for name in ("lr", "grad_clip", "weight_decay", "ema_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        make_schedule(self.schedule, self.num_timesteps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**d)


class Trainer:
    """The model, its EMA, the optimizer and the step counter, over a fixed image tensor.

    ``data``: (N, C, H, W) in [-1, 1], matching the model's channels and image size.
    ``compile``: run the model's forward through ``torch.compile``.
    """

    def __init__(self, model_config: UNetConfig, train_config: TrainConfig, data: torch.Tensor,
                 device="cpu", compile: bool = False, world: World | None = None):
        _check_data(data, model_config)
        self.world = world or World()
        if train_config.batch_size % self.world.size:
            raise ValueError(
                f"batch_size {train_config.batch_size} must be a multiple of the {self.world.size} processes: "
                "each takes an equal slice of the global batch"
            )
        self.model_config, self.config = model_config, train_config
        self.device = torch.device(device)
        self.data = data.to(self.device, torch.float32)
        # Seeds torch's global generator too: it draws the initial weights and dropout masks.
        torch.manual_seed(train_config.seed)
        self.model = UNet(model_config).to(self.device).train()
        self.ema = UNet(model_config).to(self.device).eval().requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay
        )
        self.replicas = self.model
        if self.world.distributed:  # gradients are averaged across processes during backward
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.replicas = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.forward = torch.compile(self.replicas) if compile else self.replicas
        self.q_table = make_schedule(train_config.schedule, train_config.num_timesteps).q_sample_table(self.device)
        # Batches and timesteps come from this generator, q-sample noise from Philox keyed by
        # (seed, step), dropout from the global generator: all three resume from a checkpoint.
        self.generator = torch.Generator(device="cpu").manual_seed(train_config.seed)
        self.step = 0

    def learning_rate(self, step: int) -> float:
        """Linear warm-up over ``lr_warmup_steps``, then constant (as Ho et al.)."""
        warmup = self.config.lr_warmup_steps
        return self.config.lr * min(1.0, (step + 1) / warmup) if warmup else self.config.lr

    def ema_decay(self, step: int) -> float:
        """EMA decay warmed up as (1 + step) / (10 + step), so early averages are not stuck at init."""
        return min(self.config.ema_decay, (1.0 + step) / (10.0 + step))

    def train_step(self) -> torch.Tensor:
        """One optimisation step; returns the (detached) loss without synchronising."""
        cfg = self.config
        index = torch.randint(self.data.shape[0], (cfg.batch_size,), generator=self.generator)
        t = torch.randint(cfg.num_timesteps, (cfg.batch_size,), generator=self.generator)
        x0, t = self.data[index.to(self.device)], t.to(self.device)
        rng = torch.tensor([cfg.seed, self.step], dtype=torch.int64, device=self.device)
        # q-sample's noise is keyed by position in the batch: draw it for the whole global batch
        # (elementwise, cheap), then this process keeps its slice, as DistributedSampler would.
        x_t, eps = q_sample(x0, t, self.q_table, rng=rng)
        mine = self._my_slice()

        loss = F.mse_loss(self.forward(x_t[mine], t[mine]), eps[mine])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        # One host sync per step: a NaN/Inf must stop training before it reaches the weights.
        if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
            raise NonFiniteError(
                f"step {self.step + 1}: the loss is {loss.item()} and the gradient norm {grad_norm.item()}; "
                "stopped before updating the weights (check the learning rate and the data)"
            )
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        self.optimizer.step()
        self._update_ema(self.ema_decay(self.step))
        self.step += 1
        return loss.detach()

    def _my_slice(self) -> slice:
        """This process's rows of the global batch: equal slices, in rank order."""
        size = self.config.batch_size // self.world.size
        return slice(self.world.rank * size, (self.world.rank + 1) * size)

    @torch.no_grad()
    def _update_ema(self, decay: float) -> None:
        ema_params, params = list(self.ema.parameters()), list(self.model.parameters())
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)

    def train(self, until: int | None = None, checkpoint_dir=None, checkpoint_every: int = 0,
              on_log: Callable[[int, float, float], None] | None = None, log_every: int = 50) -> float | None:
        """Train until step ``until`` (default ``config.steps``); returns the mean loss of the last
        log window (None if no step ran). ``on_log(step, loss, images_per_s)`` every ``log_every``
        steps; a checkpoint every ``checkpoint_every`` steps and at the end when
        ``checkpoint_dir`` is given."""
        until = self.config.steps if until is None else until
        window_loss, window_steps, window_start = torch.zeros((), device=self.device), 0, time.perf_counter()
        last_loss = None
        while self.step < until:
            try:
                window_loss += self.train_step()
            except NonFiniteError as e:
                if checkpoint_dir is None:
                    raise
                saved = checkpoint_path(checkpoint_dir)
                kept = f"the last good checkpoint {saved} is kept" if saved.is_file() else "no checkpoint was written"
                raise NonFiniteError(f"{e}; {kept}") from None
            window_steps += 1
            if window_steps == log_every or self.step == until:
                last_loss = self._mean_over_processes(window_loss / window_steps)
                rate = window_steps * self.config.batch_size / (time.perf_counter() - window_start)
                if on_log is not None:
                    on_log(self.step, last_loss, rate)
                window_loss.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if checkpoint_dir is not None and checkpoint_every and self.step % checkpoint_every == 0:
                self.save_checkpoint(checkpoint_dir)
        if checkpoint_dir is not None:
            self.save_checkpoint(checkpoint_dir)
        return last_loss

    def _check_finite_weights(self, what: str) -> None:
        for name, tensor in self.ema.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteError(f"{what}: EMA weight {name!r} holds NaN or Inf values")

    # ------------------------------------------------------------ checkpoints

    def _mean_over_processes(self, value: torch.Tensor) -> float:
        """The mean of a per-process scalar over all processes (a log-time all-reduce)."""
        if self.world.distributed:
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= self.world.size
        return value.item()

    def save_checkpoint(self, folder) -> Path:
        """Write ``folder/checkpoint.safetensors`` atomically (the previous one survives a crash).

        Only rank 0 writes: every process holds the same weights, optimizer and generator states."""
        folder = Path(folder)
        if not self.world.is_main:
            return checkpoint_path(folder)
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        optimizer_state = self.optimizer.state_dict()
        for index, state in optimizer_state["state"].items():
            tensors.update({f"optimizer.{index}.{key}": value for key, value in state.items()})
        tensors["rng.batches"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        metadata = {
            "format": CHECKPOINT_FORMAT,
            "version": str(CHECKPOINT_VERSION),
            "step": str(self.step),
            "model_config": json.dumps(self.model_config.to_dict()),
            "train_config": json.dumps(self.config.to_dict()),
            "optimizer_param_groups": json.dumps(optimizer_state["param_groups"]),
            "data_shape": json.dumps(list(self.data.shape)),
            "threads": str(torch.get_num_threads()),
            "world_size": str(self.world.size),
        }
        folder.mkdir(parents=True, exist_ok=True)
        return atomic_write(folder / CHECKPOINT_FILE, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))

    def load_checkpoint(self, path) -> None:
        """Restore everything :meth:`save_checkpoint` wrote. ``path``: the file or its folder.

        A checkpoint of another model config, training config (except ``steps``) or data shape
        raises ValueError naming the differences.
        """
        tensors, metadata = read_checkpoint(path)
        path = checkpoint_path(path)
        step, saved = _parse_metadata(path, metadata)
        _check_same(path, "model config", saved["model_config"], self.model_config.to_dict())
        saved_train = dict(saved["train_config"])
        saved_train["steps"] = self.config.steps
        _check_same(path, "training config", saved_train, self.config.to_dict())
        _check_same(path, "data shape", {"shape": saved["data_shape"]}, {"shape": list(self.data.shape)})
        state = self._check_tensors(path, tensors)
        optimizer_state = {"state": state, "param_groups": saved["optimizer_param_groups"]}
        try:  # on a copy first: a damaged checkpoint must leave this trainer as it was
            trial = torch.optim.AdamW(self.model.parameters(), lr=self.config.lr)
            trial.load_state_dict(optimizer_state)
            for group in trial.param_groups:
                if group.get("lr") is None or not math.isfinite(float(group["lr"])):
                    raise ValueError(f"learning rate {group.get('lr')!r}")
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ValueError(f"{path}: damaged checkpoint: optimizer state does not load ({e})") from None

        self.model.load_state_dict(_strip(tensors, "model."))
        self.ema.load_state_dict(_strip(tensors, "ema."))
        self.optimizer.load_state_dict(optimizer_state)
        self.generator.set_state(tensors["rng.batches"])
        torch.set_rng_state(tensors["rng.torch"])
        self.step = step
        threads = metadata.get("threads")
        if threads is not None and threads != str(torch.get_num_threads()):
            warnings.warn(
                f"{path} was written with {threads} CPU threads, this run has {torch.get_num_threads()}: "
                f"results will differ in the last bits from an uninterrupted run (--threads {threads} matches it)",
                stacklevel=2,
            )

    def _check_tensors(self, path: Path, tensors: dict) -> dict[int, dict]:
        """Every tensor a checkpoint must hold, with this trainer's shapes and dtypes; returns the
        optimizer's per-parameter state. ValueError naming the file and the tensor otherwise."""
        expected = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        expected.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        expected["rng.batches"] = self.generator.get_state()
        expected["rng.torch"] = torch.get_rng_state()
        params = list(self.model.parameters())
        state: dict[int, dict] = {}
        for name, value in tensors.items():
            if not name.startswith("optimizer."):
                continue
            index, _, key = name[len("optimizer."):].partition(".")
            if not index.isdigit() or int(index) >= len(params) or key not in _OPTIMIZER_STATE_KEYS:
                raise ValueError(f"{path}: damaged checkpoint: unexpected tensor {name!r}")
            want = params[int(index)] if key != "step" else torch.zeros((), dtype=torch.float32)
            expected[name] = want
            state.setdefault(int(index), {})[key] = value.to(self.device)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path}: damaged checkpoint: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
        for name, want in expected.items():
            got = tensors[name]
            if got.shape != want.shape or got.dtype != want.dtype:
                raise ValueError(
                    f"{path}: damaged checkpoint: tensor {name!r} is {got.dtype} {tuple(got.shape)}, "
                    f"expected {want.dtype} {tuple(want.shape)}"
                )
        incomplete = [i for i, s in state.items() if set(s) != set(_OPTIMIZER_STATE_KEYS)]
        if incomplete:
            raise ValueError(f"{path}: damaged checkpoint: incomplete optimizer state for parameters {incomplete[:5]}")
        return state

    def export(self, folder, extra: dict | None = None) -> Path:
        """Save the EMA weights as a model folder (:func:`fastdiff.models.folders.save_model`)."""
        self._check_finite_weights(f"export to {folder}")
        info = {"trained_steps": self.step, "train_config": self.config.to_dict(), **(extra or {})}
        return save_model(self.ema, folder, extra=info, schedule=self.config.schedule,
                          num_timesteps=self.config.num_timesteps)


def checkpoint_path(path) -> Path:
    path = Path(path)
    return path / CHECKPOINT_FILE if path.is_dir() else path


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a training checkpoint; ValueError if it is not one."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    if metadata.get("format") != CHECKPOINT_FORMAT or metadata.get("version") != str(CHECKPOINT_VERSION):
        raise ValueError(
            f"{path}: not a fastdiff training checkpoint (format {metadata.get('format')!r}, "
            f"version {metadata.get('version')!r})"
        )
    return tensors, metadata


def checkpoint_configs(path) -> tuple[UNetConfig, TrainConfig, int]:
    """The (model config, training config, step) a checkpoint was written with."""
    _, metadata = read_checkpoint(path)
    path = checkpoint_path(path)
    step, saved = _parse_metadata(path, metadata)
    try:
        return UNetConfig.from_dict(saved["model_config"]), TrainConfig.from_dict(saved["train_config"]), step
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: damaged checkpoint: {e}") from None


def _parse_metadata(path: Path, metadata: dict[str, str]) -> tuple[int, dict]:
    """(step, the JSON metadata values parsed) of a checkpoint; ValueError naming the file."""
    missing = [key for key in _METADATA_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"{path}: damaged checkpoint: metadata lacks {missing}")
    step = metadata["step"]
    if not step.isdigit():  # digits only: no sign, so step >= 0
        raise ValueError(f"{path}: damaged checkpoint: step must be an integer >= 0, got {step!r}")
    parsed = {}
    for key in _METADATA_KEYS[1:]:
        try:
            parsed[key] = json.loads(metadata[key])
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: damaged checkpoint: metadata {key!r} is not valid JSON ({e})") from None
    for key, kind in (("model_config", dict), ("train_config", dict), ("optimizer_param_groups", list),
                      ("data_shape", list)):
        if not isinstance(parsed[key], kind):
            raise ValueError(f"{path}: damaged checkpoint: metadata {key!r} must be a JSON {kind.__name__}")
    return int(step), parsed


def _check_data(data: torch.Tensor, config: UNetConfig) -> None:
    if not isinstance(data, torch.Tensor) or data.dim() != 4 or not data.is_floating_point():
        raise ValueError("data must be a floating-point tensor of shape (N, C, H, W)")
    if data.shape[0] == 0:
        raise ValueError("data holds no images")
    want = (config.in_channels, config.image_size, config.image_size)
    if tuple(data.shape[1:]) != want:
        raise ValueError(
            f"data images are {tuple(data.shape[1:])} (C, H, W) but the model expects {want}: "
            f"set the model's in_channels/image_size to match the data"
        )


def _check_same(path: Path, what: str, saved: dict, current: dict) -> None:
    differences = [
        f"{key}: checkpoint {saved.get(key)!r} vs now {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if differences:
        raise ValueError(f"{path}: checkpoint was written with another {what}: " + "; ".join(differences))


def _strip(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


__all__ = ["TrainConfig", "Trainer", "NonFiniteError", "read_checkpoint", "checkpoint_configs", "CHECKPOINT_FILE"]
