"""The reference sampler: the plain eager DDPM/DDIM loop every fast path is checked against.

One loop serves every method, because a :class:`~fastdiff.schedule.StepTable` turns DDPM
(both forms) and DDIM into the same update (:func:`fastdiff.reference.sampler_step`).
All randomness is drawn up front into an :class:`ExternalNoise` (x_T and one z per step), so
the accelerated sampler can be fed the very same numbers and compared with this loop.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastdiff import backend, reference
from fastdiff.schedule import StepTable

#: ``model(x, t)`` or ``model(x, t, class_labels)`` -> eps, shaped like x.
EpsModel = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class ExternalNoise:
    """Every random number one sampling run uses.

    ``x_T``: (B, C, H, W), the starting noise; ``z``: (S, B, C, H, W), the noise added at step
    ``i`` (multiplied by that step's sigma, which is 0 at the last DDPM step).
    """

    x_T: torch.Tensor
    z: torch.Tensor

    def __post_init__(self):
        if self.x_T.dim() != 4:
            raise ValueError(f"noise.x_T must be (B, C, H, W), got shape {tuple(self.x_T.shape)}")
        if self.z.dim() != 5 or self.z.shape[1:] != self.x_T.shape:
            raise ValueError(
                f"noise.z must be (steps, *x_T.shape) = (S, {', '.join(map(str, self.x_T.shape))}), "
                f"got shape {tuple(self.z.shape)}"
            )

    @property
    def num_steps(self) -> int:
        return self.z.shape[0]

    def to(self, device=None, dtype=None) -> ExternalNoise:
        return ExternalNoise(self.x_T.to(device=device, dtype=dtype), self.z.to(device=device, dtype=dtype))


def draw_noise(
    table: StepTable, shape, seed: int, device="cpu", dtype: torch.dtype = torch.float32
) -> ExternalNoise:
    """x_T and the per-step z for ``table``, from a CPU ``torch.Generator`` seeded with ``seed``.

    Drawn on the CPU and then moved, so the same seed gives the same numbers on every device.
    """
    shape = _check_shape(shape)
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if not -(2**63) <= int(seed) < 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"seed must be in [-2**63, 2**64), got {int(seed)}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    x_T = torch.randn(shape, generator=generator, dtype=torch.float32)
    z = torch.randn((table.num_steps, *shape), generator=generator, dtype=torch.float32)
    return ExternalNoise(x_T, z).to(device=device, dtype=dtype)


@torch.no_grad()
def sample_reference(
    model: EpsModel,
    table: StepTable,
    shape=None,
    seed: int | None = None,
    noise: ExternalNoise | None = None,
    class_labels: torch.Tensor | None = None,
    device="cpu",
    progress: bool = False,
    return_trajectory: bool = False,
):
    """Run ``table``'s sampler with ``model`` eagerly; returns x_0, (B, C, H, W).

    Randomness comes from ``seed`` (with ``shape``; see :func:`draw_noise`) or from ``noise``
    (external noise mode): pass exactly one. Same seed, same samples, bit for bit.
    With ``return_trajectory=True`` returns ``(x_0, trajectory)``, trajectory (S + 1, B, C, H, W)
    holding x_T then x after each step. float32 is exact float32 on every device (no TF32:
    :func:`fastdiff.backend.exact_fp32`), so every path is measured against the same truth.
    """
    if (seed is None) == (noise is None):
        raise ValueError("pass exactly one of seed (with shape) or noise")
    if noise is None:
        if shape is None:
            raise ValueError("shape is required when sampling from a seed")
        noise = draw_noise(table, shape, seed, device=device)
    else:
        if shape is not None and tuple(shape) != tuple(noise.x_T.shape):
            raise ValueError(f"shape {tuple(shape)} does not match noise.x_T {tuple(noise.x_T.shape)}")
        _check_shape(noise.x_T.shape)
        noise = noise.to(device=device)
    if noise.num_steps != table.num_steps:
        raise ValueError(f"noise has {noise.num_steps} steps of z, the table has {table.num_steps} steps")
    batch = noise.x_T.shape[0]
    class_labels = _check_class_labels(class_labels, batch, device)

    table = table.to(device)
    x = noise.x_T
    history = table.new_history(x.shape, device)
    trajectory = [x] if return_trajectory else None
    steps = range(table.num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{table.method} sampling", unit="step")
    with _eval_mode(model), backend.exact_fp32():
        for i in steps:
            t = table.timesteps[i].expand(batch)
            eps = model(x, t) if class_labels is None else model(x, t, class_labels)
            if not isinstance(eps, torch.Tensor) or eps.shape != x.shape:
                got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
                raise ValueError(f"model must return eps shaped like x {tuple(x.shape)}, got {got}")
            step_index = torch.tensor(i, dtype=torch.int64, device=device)
            x, _ = reference.sampler_step(x, eps, step_index, table.coefs, noise=noise.z[i], clip_range=table.clip,
                                          history=history)
            if trajectory is not None:
                trajectory.append(x)
    if trajectory is not None:
        return x, torch.stack(trajectory)
    return x


def _check_shape(shape) -> tuple[int, int, int, int]:
    shape = tuple(shape)
    if len(shape) != 4 or not all(hasattr(s, "__index__") and not isinstance(s, bool) for s in shape):
        raise ValueError(f"shape must be four integers (batch, channels, height, width), got {shape!r}")
    shape = tuple(int(s) for s in shape)
    if shape[0] < 1:
        raise ValueError(f"batch size must be >= 1, got {shape[0]}")
    if min(shape[1:]) < 1:
        raise ValueError(f"channels, height and width must be >= 1, got {shape[1:]}")
    return shape


def _check_class_labels(class_labels, batch: int, device):
    if class_labels is None:
        return None
    if not isinstance(class_labels, torch.Tensor) or class_labels.dtype != torch.int64:
        raise TypeError("class_labels must be an int64 tensor of shape (batch,)")
    if class_labels.shape != (batch,):
        raise ValueError(f"class_labels must have shape ({batch},), got {tuple(class_labels.shape)}")
    return class_labels.to(device)


@contextlib.contextmanager
def _eval_mode(model):
    """Sampling never uses dropout: run a module in eval mode and restore its mode after."""
    if not isinstance(model, torch.nn.Module) or not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()
