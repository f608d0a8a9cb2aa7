"""The step loop both samplers run (the reference's and :class:`~fastdiff.sampling.Sampler`'s
eager one; a CUDA graph replays the same steps, :mod:`fastdiff.engines.cuda_graphs`)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from fastdiff.schedulers import StepTable

#: ``step(x_t, step_index, z or None, history or None) -> x_prev``
StepFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


def run_steps(
    table: StepTable,
    x: torch.Tensor,
    step: StepFn,
    noise_at: Callable[[int], torch.Tensor | None],
    progress: bool = False,
    on_step: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """x after the table's S steps, step i called with a device step index holding i, z =
    ``noise_at(i)`` and the multistep history buffer (zeroed, on x's device in x's dtype; None for DDPM/DDIM)."""
    steps = range(table.num_steps)
    if progress:
        from tqdm.auto import tqdm  # only when a progress bar is asked for

        steps = tqdm(steps, desc=f"{table.method} sampling", unit="step")
    step_index = torch.zeros((), dtype=torch.int64, device=x.device)
    history = table.new_history(x.shape, x.device, x.dtype)
    for i in steps:
        step_index.fill_(i)
        x = step(x, step_index, noise_at(i), history)
        if on_step is not None:
            on_step(x)
    return x
