"""A diffusers ``DPMSolverMultistepScheduler.step`` through the fused table-driven step.

:func:`fastdiff.accelerate` installs :class:`FusedDPMSolverStep` on a pipeline's scheduler when
:func:`unsupported_reason` finds nothing the table cannot express. The step keeps the previous
data predictions in one device buffer that ``fastdiff.ops.sampler_step`` shifts in place, and
keeps diffusers' step counter; a new run (``set_timesteps`` resets the counter) zeroes it.
"""
from __future__ import annotations

import inspect

import torch

from fastdiff import ops
from fastdiff.dpmsolver import ALGORITHMS, PREDICTIONS, dpmsolver_table

#: Config flags whose sigmas or conversions the tables do not reproduce.
_UNFUSED_FLAGS = ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
                  "use_dynamic_shifting")  # fmt: skip


def unsupported_reason(scheduler) -> str | None:
    """Why the table cannot reproduce this DPMSolverMultistepScheduler, or None when it can."""
    config = scheduler.config
    if config.algorithm_type not in ALGORITHMS:
        return f"algorithm_type {config.algorithm_type!r} (fused: {', '.join(ALGORITHMS)})"
    if config.prediction_type not in PREDICTIONS:
        return f"prediction_type {config.prediction_type!r} (fused: {', '.join(PREDICTIONS)})"
    if config.variance_type is not None:
        return f"variance_type {config.variance_type!r} (a learned variance is not fused)"
    flags = [name for name in _UNFUSED_FLAGS if getattr(config, name, False)]
    if flags:
        return f"{', '.join(flags)} not fused"
    return None


def dpmsolver_table_from_scheduler(scheduler, steps: int):
    """The StepTable of ``scheduler`` (its own betas, options and order) for ``steps``."""
    from fastdiff.acceleration import schedule_from_scheduler

    c = scheduler.config
    return dpmsolver_table(
        schedule_from_scheduler(scheduler), steps=steps, order=c.solver_order, algorithm=c.algorithm_type,
        solver_type=c.solver_type, prediction=c.prediction_type, spacing=c.timestep_spacing,
        steps_offset=c.steps_offset, karras=c.use_karras_sigmas,
        round_karras_timesteps=c.beta_schedule != "squaredcos_cap_v2", final_sigmas=c.final_sigmas_type,
        lower_order_final=c.lower_order_final, euler_at_final=c.euler_at_final,
        lambda_min_clipped=c.lambda_min_clipped,
    )  # fmt: skip


class FusedDPMSolverStep:
    """Same signature, output type and random draws as the scheduler's ``step``. Falls back to
    the original step for a run whose timesteps the table does not produce (custom timesteps),
    or whose step count is below the solver order."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.original = type(scheduler).step.__get__(scheduler)
        self.signature = inspect.signature(self.original)
        self._tables: dict[tuple, object] = {}
        self.history: torch.Tensor | None = None

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        s = self.scheduler
        table = self._table(a["sample"].device)
        if table is None or s.num_inference_steps is None:
            return self.original(*args, **kwargs)
        if s.step_index is None:  # the first step of a run (set_timesteps resets the counter)
            s._init_step_index(a["timestep"])
            self.history = None
        model_output, sample = a["model_output"], a["sample"].to(torch.float32)
        if self.history is None or self.history.shape[1:] != sample.shape:
            self.history = table.new_history(sample.shape, sample.device)
        x_prev, _ = ops.sampler_step(
            sample, model_output, table.step_indices[s.step_index], table.coefs,
            noise=self._noise(a), history=self.history,
        )  # fmt: skip
        s.lower_order_nums = min(s.lower_order_nums + 1, s.config.solver_order)
        s._step_index += 1
        x_prev = x_prev.to(model_output.dtype)
        if not a["return_dict"]:
            return (x_prev,)
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        return SchedulerOutput(prev_sample=x_prev)

    def _noise(self, a: dict) -> torch.Tensor | None:
        """The SDE form draws z at every step, as diffusers does; the ODE form none."""
        if not self.scheduler.config.algorithm_type.startswith("sde"):
            return None
        if a.get("variance_noise") is not None:
            return a["variance_noise"].to(torch.float32)
        from diffusers.utils.torch_utils import randn_tensor

        out = a["model_output"]
        return randn_tensor(out.shape, generator=a["generator"], device=out.device, dtype=torch.float32)

    def _table(self, device):
        s = self.scheduler
        if s.num_inference_steps is None:
            return None
        key = (s.num_inference_steps, tuple(s.timesteps.tolist()), str(device))
        if key not in self._tables:
            try:
                table = dpmsolver_table_from_scheduler(s, s.num_inference_steps)
            except ValueError:  # e.g. fewer steps than the solver order: diffusers lowers the order
                table = None
            if table is not None and not torch.equal(table.timesteps, s.timesteps.cpu().long()):
                table = None  # custom timesteps
            self._tables[key] = None if table is None else _WithIndices(table.to(device), device)
        return self._tables[key]


class _WithIndices:
    """A StepTable on the device with arange(S) beside it: step i's index is a view, no copy."""

    def __init__(self, table, device):
        self.coefs = table.coefs
        self.new_history = table.new_history
        self.step_indices = torch.arange(table.num_steps, device=device)
