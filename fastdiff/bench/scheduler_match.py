"""How closely ``accelerate``'s fused scheduler steps follow diffusers' own, over whole runs and
runs that start part-way (img2img), as the README's scheduler table and issue 18's closing note
report them; the tests assert on the same loops.

:func:`img2img_loop` is the loop shape of diffusers' ``StableDiffusionImg2ImgPipeline`` (its
``get_timesteps``: ``t_start = steps - int(steps * strength)``, ``set_begin_index(t_start)``,
``add_noise`` at the first timestep, ``scale_model_input`` before the model, the caller's
generator passed to ``step``), run with any scheduler and any model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from fastdiff.integrations.diffusers.accelerate import accelerate


def smooth_model(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth, t-dependent, nonlinear stand-in for a UNet (any prediction type)."""
    scale = float(t) / 1000.0
    return torch.tanh(0.7 * x + scale) - 0.3 * scale * x


def img2img_loop(scheduler, model, image: torch.Tensor, steps: int, strength: float, seed: int = 0) -> torch.Tensor:
    """The denoised image of an img2img run of ``strength`` over ``steps`` (1.0: a whole run from noise)."""
    scheduler.set_timesteps(steps)
    start = max(steps - min(int(steps * strength), steps), 0)
    timesteps = scheduler.timesteps[start:]
    if hasattr(scheduler, "set_begin_index"):  # as the pipeline does: DDPM/DDIM count no steps
        scheduler.set_begin_index(start)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(image.shape, generator=generator, dtype=image.dtype)
    if strength >= 1.0:
        x = noise * scheduler.init_noise_sigma
    else:
        x = scheduler.add_noise(image, noise, timesteps[:1].repeat(image.shape[0]))
    for t in timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


@dataclass
class Match:
    """One config's comparison: max |fused - diffusers|, max |diffusers|, and what ran."""

    max_diff: float
    max_value: float
    fused_calls: int
    fallback_calls: int

    def within(self, rtol: float = 1e-5, atol: float = 2e-5) -> bool:
        return self.max_diff <= atol + rtol * self.max_value


def compare(scheduler, steps: int, strength: float = 1.0, shape=(2, 3, 8, 8), model=smooth_model, seed: int = 0
            ) -> Match:
    """The same img2img loop with diffusers' step and with the fused one (same model, image, noise)."""
    image = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).clamp(-1, 1)
    expected = img2img_loop(copy.deepcopy(scheduler), model, image, steps, strength, seed)
    fused = accelerate(copy.deepcopy(scheduler))
    actual = img2img_loop(fused, model, image, steps, strength, seed)
    step = fused.fastdiff_report.steps["scheduler"]
    return Match((actual - expected).abs().max().item(), expected.abs().max().item(), step.fused_calls,
                 step.fallback_calls)
