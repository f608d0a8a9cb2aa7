"""One sampling step as one module: what the engines compile and a CUDA graph captures."""
from __future__ import annotations

import torch
import torch.nn as nn

from fastdiff import ops
from fastdiff.schedulers import StepTable


class DenoiseStep(nn.Module):
    """One sampling step as one module (what is compiled and captured)::

        t = timesteps[step_index] (gathered on the device)
        eps = model(x_t in the model's dtype and layout, t[, class_labels])
        x_prev = fastdiff.ops.sampler_step(x_t, eps, step_index, coefs, noise | rng, history)  (fp32)

    ``history`` is the multistep solvers' buffer of previous data predictions, (K, *x_t.shape)
    float32, updated in place by the step (None for DDPM/DDIM).
    """

    def __init__(self, model: nn.Module, table: StepTable, model_dtype: torch.dtype, channels_last: bool):
        super().__init__()
        self.model = model
        self.register_buffer("timesteps", table.timesteps, persistent=False)
        self.register_buffer("coefs", table.coefs, persistent=False)
        self.clip = table.clip
        self.method = table.method
        self.model_dtype = model_dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x_t, step_index, noise=None, rng=None, class_labels=None, history=None) -> torch.Tensor:
        if self.method in ("sde-dpmsolver++", "euler-ancestral") and noise is None and rng is None:
            raise ValueError(f"noise: the {self.method} step draws noise; pass noise or rng")
        t = self.timesteps.index_select(0, step_index.reshape(1)).expand(x_t.shape[0])
        x_in = x_t.to(dtype=self.model_dtype, memory_format=self.memory_format)
        eps = self.model(x_in, t) if class_labels is None else self.model(x_in, t, class_labels)
        x_prev, _ = ops.sampler_step(x_t, eps, step_index, self.coefs, noise=noise, rng=rng, clip_range=self.clip,
                                     history=history)
        return x_prev


class DiffusersEps(nn.Module):
    """A diffusers ``UNet2DModel`` as an eps model: ``forward(x, t, class_labels=None) -> eps``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, class_labels=None):
        return self.unet(x, t, class_labels=class_labels, return_dict=False)[0]
