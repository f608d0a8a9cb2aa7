"""UniPC configs run through diffusers' own ``UniPCMultistepScheduler.step`` and through the fused
step ``fastdiff.accelerate`` installs, over whole runs and runs that start part-way
(``set_begin_index(k)``, or a loop over ``timesteps[k:]`` as img2img pipelines do).

``python tests/schedulers/unipc_cases.py`` prints the table of max differences (the issue's
closing-note table); ``test_unipc.py`` asserts them.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch

SHAPE = (2, 3, 8, 8)

#: (id, scheduler config, steps, begin): begin > 0 starts the run at that step.
CASES = [
    ("bh2-order1", dict(solver_order=1), 10, 0),
    ("bh2-order2", dict(solver_order=2), 10, 0),
    ("bh2-order3", dict(solver_order=3), 20, 0),
    ("bh2-2-leading-offset", dict(solver_order=2, timestep_spacing="leading", steps_offset=1), 15, 0),
    ("bh2-3-trailing", dict(solver_order=3, timestep_spacing="trailing"), 12, 0),
    ("bh2-2-karras", dict(solver_order=2, use_karras_sigmas=True), 12, 0),
    ("bh2-3-karras-cosine", dict(solver_order=3, use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2"), 10, 0),
    ("bh2-2-v", dict(solver_order=2, prediction_type="v_prediction"), 10, 0),
    ("bh2-3-x0-no-lower-final-sigma-min", dict(solver_order=3, prediction_type="sample", lower_order_final=False,
                                                final_sigmas_type="sigma_min"), 8, 0),
    ("bh2-3-disable-corrector", dict(solver_order=3, disable_corrector=[0, 3, 4]), 10, 0),
    ("bh2-2-scaled-linear", dict(solver_order=2, beta_schedule="scaled_linear", beta_start=0.00085,
                                 beta_end=0.012), 25, 0),
    ("bh1-order1-sigma-min", dict(solver_order=1, solver_type="bh1", final_sigmas_type="sigma_min"), 10, 0),
    ("bh1-order2-sigma-min", dict(solver_order=2, solver_type="bh1", final_sigmas_type="sigma_min"), 10, 0),
    ("bh1-3-karras-sigma-min", dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min",
                                    use_karras_sigmas=True), 12, 0),
    ("bh2-2-zero-snr-trailing", dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"), 10, 0),
    ("bh2-2-from-3", dict(solver_order=2), 10, 3),
    ("bh2-3-from-8", dict(solver_order=3), 20, 8),
    ("bh2-3-trailing-from-1", dict(solver_order=3, timestep_spacing="trailing"), 12, 1),
    ("bh2-2-karras-from-10", dict(solver_order=2, use_karras_sigmas=True), 25, 10),
    ("bh2-3-disable-from-4", dict(solver_order=3, disable_corrector=[5]), 10, 4),
    ("bh1-3-sigma-min-from-5", dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"), 10, 5),
    ("bh2-1-from-last", dict(solver_order=1), 6, 5),
    ("bh2-3-v-zero-snr-from-4", dict(solver_order=3, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                     timestep_spacing="trailing"), 10, 4),
]


def fake_model(x: torch.Tensor, t, abar: torch.Tensor) -> torch.Tensor:
    """A smooth, t-dependent, nonlinear stand-in for a UNet that keeps samples bounded (close to
    the ideal eps of unit-variance data, sqrt(1 - abar_t) x_t)."""
    t = int(t)
    return (1.0 - abar[t]).sqrt() * x + 0.1 * torch.tanh(0.7 * x + t / 1000.0)


def trajectory(scheduler, steps: int, begin: int, x: torch.Tensor, loop: str = "set_begin_index",
               float64: bool = False) -> torch.Tensor:
    """x after a run of ``steps`` from step ``begin``: ``set_begin_index(begin)`` then
    ``timesteps[begin:]``, or (``loop="slice"``) the slice alone, the step found by timestep.
    ``float64``: diffusers' step with float64 sigmas and samples (the truth for large values)."""
    scheduler.set_timesteps(steps)
    if loop == "set_begin_index":
        scheduler.set_begin_index(begin)
    abar = scheduler.alphas_cumprod
    if float64:
        scheduler.sigmas, abar, x = scheduler.sigmas.double(), abar.double(), x.double()
    for t in scheduler.timesteps[begin:]:
        x = scheduler.step(fake_model(x, t, abar), t, x).prev_sample
    return x


class Comparison(NamedTuple):
    fused: torch.Tensor  # the accelerated scheduler's result
    diffusers: torch.Tensor  # diffusers' own step's
    truth: torch.Tensor  # diffusers' step in float64
    fused_calls: int

    def max_diff(self) -> float:
        return (self.fused - self.diffusers).abs().max().item()

    def errors(self) -> tuple[float, float]:
        """max |fused - truth|, max |diffusers - truth|."""
        return tuple((out.double() - self.truth).abs().max().item() for out in (self.fused, self.diffusers))


def compare(config: dict, steps: int, begin: int, loop: str = "set_begin_index") -> Comparison:
    from diffusers import UniPCMultistepScheduler

    from fastdiff import accelerate

    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, **config)
    fast = accelerate(copy.deepcopy(scheduler))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    truth = trajectory(copy.deepcopy(scheduler), steps, begin, x, loop, float64=True)
    expected = trajectory(scheduler, steps, begin, x, loop)
    actual = trajectory(fast, steps, begin, x, loop)
    return Comparison(actual, expected, truth, fast.step.fused_calls)


def main() -> None:
    print("| config | steps | run | max abs diff vs diffusers | max abs x | fused vs fp64 | diffusers vs fp64 "
          "| fused steps |")
    print("|---|---|---|---|---|---|---|---|")
    for name, config, steps, begin in CASES:
        for loop in ("set_begin_index", "slice") if begin else ("set_begin_index",):
            c = compare(config, steps, begin, loop)
            run = f"from {begin} ({'set_begin_index' if loop != 'slice' else 'timesteps[k:]'})" if begin else "whole"
            fused_error, diffusers_error = c.errors()
            print(f"| {name} | {steps} | {run} | {c.max_diff():.2e} | {c.diffusers.abs().max().item():.2f} "
                  f"| {fused_error:.2e} | {diffusers_error:.2e} | {c.fused_calls} |")


if __name__ == "__main__":
    main()
