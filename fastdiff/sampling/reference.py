"""The reference sampler: the plain eager DDPM/DDIM loop every fast path is checked against.

One loop serves every method, because a :class:`~fastdiff.schedulers.StepTable` turns DDPM
(both forms) and DDIM into the same update (:func:`fastdiff.ops.reference.sampler_step`).
All randomness comes from an :class:`ExternalNoise` (x_T and one z per step, drawn a step at a
time), so the accelerated sampler can be fed the very same numbers and compared with this loop.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from fastdiff.ops import backend, reference
from fastdiff.sampling.inputs import check_class_labels, check_shape
from fastdiff.sampling.loop import run_steps
from fastdiff.sampling.noise import ExternalNoise, draw_noise
from fastdiff.schedulers import StepTable

#: ``model(x, t)`` or ``model(x, t, class_labels)`` -> eps, shaped like x.
EpsModel = Callable[..., torch.Tensor]


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
    :func:`fastdiff.ops.backend.exact_fp32`), so every path is measured against the same truth.
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
        check_shape(noise.x_T.shape)
        noise = noise.to(device=device)
    if noise.num_steps != table.num_steps:
        raise ValueError(f"noise has {noise.num_steps} steps of z, the table has {table.num_steps} steps")
    batch = noise.x_T.shape[0]
    class_labels = check_class_labels(class_labels, batch, device)

    table = table.to(device)
    trajectory = [noise.x_T] if return_trajectory else None

    def step(x, step_index, z, history):
        t = table.timesteps[step_index].expand(batch)
        eps = model(x, t) if class_labels is None else model(x, t, class_labels)
        if not isinstance(eps, torch.Tensor) or eps.shape != x.shape:
            got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
            raise ValueError(f"model must return eps shaped like x {tuple(x.shape)}, got {got}")
        x_prev, _ = reference.sampler_step(x, eps, step_index, table.coefs, noise=z, clip_range=table.clip,
                                           history=history)
        return x_prev

    with _eval_mode(model), backend.exact_fp32():
        x = run_steps(table, noise.x_T, step, noise.step_noise, progress,
                      on_step=None if trajectory is None else trajectory.append)
    if trajectory is not None:
        return x, torch.stack(trajectory)
    return x


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
