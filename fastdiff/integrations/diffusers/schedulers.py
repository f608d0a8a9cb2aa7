"""diffusers schedulers -> fastdiff: the scheduler -> StepTable bridge and the fused ``step``s.

:func:`table_from_scheduler` builds the :class:`~fastdiff.schedulers.StepTable` that computes
what a scheduler's ``step`` computes with its config, or raises naming the setting no table
reproduces (:func:`unsupported_reason`). :func:`fastdiff.accelerate` installs a :class:`FusedStep`
as the scheduler's ``step``: the same signature, output type and random draws, through
``fastdiff.ops.sampler_step`` on that table; ``fused_calls`` / ``fallback_calls`` count which ran.
"""
from __future__ import annotations

import collections
import copy
import inspect
from typing import NamedTuple

import torch

from fastdiff import ops
from fastdiff.integrations.diffusers import types
from fastdiff.schedulers import TIMESTEP_SPACINGS, NoiseSchedule, StepTable, ddim_table, ddpm_table
from fastdiff.schedulers.dpmsolver import ALGORITHMS, PREDICTIONS, SPACINGS, dpmsolver_table
from fastdiff.schedulers.euler import PREDICTIONS as EULER_PREDICTIONS
from fastdiff.schedulers.euler import euler_rows
from fastdiff.schedulers.unipc import SOLVER_TYPES, undefined_final_step, unipc_table

EULER_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
#: The scheduler classes a table reproduces.
FUSED_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", *EULER_SCHEDULERS,
                    "UniPCMultistepScheduler")
#: diffusers DDPM variance types whose sigma a StepTable reproduces (fixed_small_log is
#: exp(0.5 log var) = sqrt(var), the same value).
DDPM_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}
#: DPMSolverMultistepScheduler config flags whose sigmas or conversions the tables do not reproduce.
_UNFUSED_DPM_FLAGS = ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                      "use_flow_sigmas", "use_dynamic_shifting")
#: UniPCMultistepScheduler config fields whose sigmas or conversions the tables do not reproduce.
_UNFUSED_UNIPC_FLAGS = ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas",
                        "use_dynamic_shifting", "sigma_min", "sigma_max", "shift_terminal")


def is_fused_scheduler(obj) -> bool:
    return types.is_type(obj, *FUSED_SCHEDULERS)


def is_multistep(scheduler) -> bool:
    return types.is_type(scheduler, "DPMSolverMultistepScheduler")


def is_unipc(scheduler) -> bool:
    return types.is_type(scheduler, "UniPCMultistepScheduler")


def unsupported_reason(scheduler) -> str | None:
    """Why a StepTable cannot reproduce this scheduler's step, or None when it can."""
    if not is_fused_scheduler(scheduler):
        return f"{type(scheduler).__name__} is not one of {', '.join(FUSED_SCHEDULERS)}"
    if is_multistep(scheduler):
        return _unsupported_dpmsolver(scheduler.config)
    if types.is_type(scheduler, *EULER_SCHEDULERS):
        return _unsupported_euler(scheduler)
    if is_unipc(scheduler):
        return _unsupported_unipc(scheduler)
    config = scheduler.config
    if config.prediction_type != "epsilon":
        return f"prediction_type {config.prediction_type!r} (only 'epsilon' is fused)"
    if config.thresholding:
        return "dynamic thresholding is not fused"
    variance = getattr(config, "variance_type", None)
    if types.is_type(scheduler, "DDPMScheduler") and variance not in DDPM_VARIANCES:
        return f"variance_type {variance!r} (fused: {', '.join(DDPM_VARIANCES)})"
    if config.timestep_spacing not in TIMESTEP_SPACINGS:
        return f"timestep_spacing {config.timestep_spacing!r} (fused: {', '.join(TIMESTEP_SPACINGS)})"
    return None


def _unsupported_dpmsolver(config) -> str | None:
    if config.algorithm_type not in ALGORITHMS:
        return f"algorithm_type {config.algorithm_type!r} (fused: {', '.join(ALGORITHMS)})"
    if config.prediction_type not in PREDICTIONS:
        return f"prediction_type {config.prediction_type!r} (fused: {', '.join(PREDICTIONS)})"
    if config.variance_type is not None:
        return f"variance_type {config.variance_type!r} (a learned variance is not fused)"
    flags = [name for name in _UNFUSED_DPM_FLAGS if getattr(config, name, False)]
    if flags:
        return f"{', '.join(flags)} not fused"
    return None


def _unsupported_euler(scheduler) -> str | None:
    ancestral = types.is_type(scheduler, "EulerAncestralDiscreteScheduler")
    fused = ("epsilon", "v_prediction") if ancestral else EULER_PREDICTIONS  # its step raises for "sample"
    if scheduler.config.prediction_type not in fused:
        return f"prediction_type {scheduler.config.prediction_type!r} (fused: {', '.join(fused)})"
    return None


def _unsupported_unipc(scheduler) -> str | None:
    config = scheduler.config
    if not scheduler.predict_x0:
        return "predict_x0=False (only the data-prediction form, predict_x0=True, is fused)"
    if scheduler.solver_p is not None:
        return "solver_p (another scheduler as the predictor) is not fused"
    if config.solver_type not in SOLVER_TYPES:
        return f"solver_type {config.solver_type!r} (fused: {', '.join(SOLVER_TYPES)})"
    if config.prediction_type not in PREDICTIONS:
        return f"prediction_type {config.prediction_type!r} (fused: {', '.join(PREDICTIONS)})"
    if config.timestep_spacing not in SPACINGS:
        return f"timestep_spacing {config.timestep_spacing!r} (fused: {', '.join(SPACINGS)})"
    if not 1 <= config.solver_order <= 3:
        return f"solver_order {config.solver_order} (fused: 1, 2, 3)"
    flags = [name for name in _UNFUSED_UNIPC_FLAGS if getattr(config, name, None) not in (None, False)]
    if flags:
        return f"{', '.join(flags)} not fused"
    return undefined_final_step(config.solver_type, config.final_sigmas_type, config.solver_order,
                                config.lower_order_final)


def schedule_from_scheduler(scheduler) -> NoiseSchedule:
    """The NoiseSchedule whose cumulative products are exactly the scheduler's (float32)
    ``alphas_cumprod``, so tables agree with diffusers' own arithmetic to float32 rounding."""
    abar = scheduler.alphas_cumprod.double().cpu()
    return NoiseSchedule(1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]]))


def table_from_scheduler(scheduler, steps: int | None = None, eta: float = 0.0,
                         use_clipped_model_output: bool = False, start: int = 0) -> StepTable:
    """The StepTable that computes exactly what a diffusers ``DDPMScheduler`` / ``DDIMScheduler``
    / ``DPMSolverMultistepScheduler`` / ``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler``
    step computes with its config (schedule, clip_sample and its range, variance_type,
    set_alpha_to_one, timestep_spacing, steps_offset; the solver's order and options) over
    ``steps`` steps (default: the scheduler's ``num_inference_steps`` if set, else T for DDPM, 50
    for DDIM, 20 for DPM-Solver++ and 30 for Euler), for the run from step ``start`` (img2img).
    Euler tables are in the VP coordinates a :class:`~fastdiff.sampling.Sampler` samples in.
    Raises ValueError naming the setting a table cannot reproduce."""
    reason = unsupported_reason(scheduler)
    if reason:
        raise ValueError(f"fastdiff cannot reproduce this scheduler's step: {reason}")
    if is_multistep(scheduler):
        return dpmsolver_table_from_scheduler(scheduler, steps or scheduler.num_inference_steps or 20, start)
    if is_unipc(scheduler):
        return unipc_table_from_scheduler(scheduler, steps or scheduler.num_inference_steps or 20, start)
    if types.is_type(scheduler, *EULER_SCHEDULERS):
        table = _euler_table_from_scheduler(scheduler, steps or scheduler.num_inference_steps or 30)
        return table.tail(start) if start else table
    config = scheduler.config
    is_ddim = types.is_type(scheduler, "DDIMScheduler")
    steps = steps or scheduler.num_inference_steps or (50 if is_ddim else config.num_train_timesteps)
    schedule = schedule_from_scheduler(scheduler)
    spaced = dict(spacing=config.timestep_spacing, steps_offset=config.steps_offset)
    if is_ddim:
        table = ddim_table(schedule, steps=steps, eta=eta, clip_sample=config.clip_sample,
                           clip_range=config.clip_sample_range, set_alpha_to_one=config.set_alpha_to_one,
                           use_clipped_model_output=use_clipped_model_output, **spaced)
    else:
        table = ddpm_table(schedule, steps=steps, variance=DDPM_VARIANCES[config.variance_type], form="diffusers",
                           clip_sample=config.clip_sample, clip_range=config.clip_sample_range, **spaced)
    return table.tail(start) if start else table


def _euler_table_from_scheduler(scheduler, steps: int) -> StepTable:
    """The scheduler's own sigmas after ``set_timesteps(steps)`` (on a copy), as VP-coordinate rows."""
    s = copy.deepcopy(scheduler)
    s.set_timesteps(steps)
    timesteps = s.timesteps.double()
    if not torch.equal(timesteps, timesteps.round()):
        raise ValueError(f"fastdiff cannot reproduce this scheduler's step: its timesteps are fractional "
                         f"(timestep_spacing {s.config.timestep_spacing!r}, use_karras_sigmas "
                         f"{s.config.use_karras_sigmas}) and a Sampler's table feeds the model integer timesteps; "
                         "use timestep_spacing 'trailing' or 'leading'")
    ancestral = types.is_type(s, "EulerAncestralDiscreteScheduler")
    coefs = euler_rows(s.sigmas, ancestral, s.config.prediction_type, scaled=False).float()
    return StepTable("euler-ancestral" if ancestral else "euler", timesteps.long(), coefs, None)


def dpmsolver_table_from_scheduler(scheduler, steps: int, start: int = 0) -> StepTable:
    """The StepTable of a DPMSolverMultistepScheduler (its own betas, options and order) for
    ``steps``, for the run from step ``start`` (``set_begin_index(start)``, img2img)."""
    c = scheduler.config
    return dpmsolver_table(
        schedule_from_scheduler(scheduler), steps=steps, order=c.solver_order, algorithm=c.algorithm_type,
        solver_type=c.solver_type, prediction=c.prediction_type, spacing=c.timestep_spacing,
        steps_offset=c.steps_offset, karras=c.use_karras_sigmas,
        round_karras_timesteps=c.beta_schedule != "squaredcos_cap_v2", final_sigmas=c.final_sigmas_type,
        lower_order_final=c.lower_order_final, euler_at_final=c.euler_at_final,
        lambda_min_clipped=c.lambda_min_clipped, start=start,
    )


def unipc_table_from_scheduler(scheduler, steps: int, begin: int = 0) -> StepTable:
    """The StepTable of a UniPCMultistepScheduler (its own betas, options and order) for ``steps``,
    for a run that starts at step ``begin`` (``set_begin_index``)."""
    c = scheduler.config
    return unipc_table(
        schedule_from_scheduler(scheduler), steps=steps, order=c.solver_order, solver_type=c.solver_type,
        prediction=c.prediction_type, spacing=c.timestep_spacing, steps_offset=c.steps_offset,
        karras=c.use_karras_sigmas, final_sigmas=c.final_sigmas_type, lower_order_final=c.lower_order_final,
        disable_corrector=tuple(scheduler.disable_corrector), begin=begin,
    )


class DeviceTable(NamedTuple):
    """A StepTable on the sample's device, with what a fused step looks up in it."""

    table: StepTable
    index_of: dict[int, int]  # timestep -> step index
    step_indices: torch.Tensor  # arange(S) on the device: step i's index tensor is a view, no copy


def on_device(table: StepTable, device) -> DeviceTable:
    index_of = {t: i for i, t in enumerate(table.timesteps.tolist())}
    return DeviceTable(table.to(device), index_of, torch.arange(table.num_steps, device=device))


def randn_like_diffusers(model_output: torch.Tensor, generator, dtype: torch.dtype) -> torch.Tensor:
    """The noise diffusers' own step draws: ``randn_tensor`` with the caller's generator."""
    from diffusers.utils.torch_utils import randn_tensor  # diffusers is optional (see types)

    return randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=dtype)


class FusedStep:
    """What every fused scheduler step shares: the original ``step`` and its signature, the
    per-run tables (built once per key; a string where no table reproduces the run: the reason)
    and the counters: ``fused_calls``, ``fallback_calls`` and ``fallback_reasons`` (reason ->
    calls that ran diffusers' own step for it)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.original = type(scheduler).step.__get__(scheduler)
        self.signature = inspect.signature(self.original)
        self._tables: dict[tuple, DeviceTable | str] = {}
        self.fused_calls = 0
        self.fallback_calls = 0
        self.fallback_reasons: collections.Counter[str] = collections.Counter()

    def arguments(self, args, kwargs) -> dict:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments

    def fallback(self, args, kwargs, reason: str):
        """diffusers' own step (outside the table, or an error diffusers reports), counted with its reason."""
        self.fallback_calls += 1
        self.fallback_reasons[reason] += 1
        return self.original(*args, **kwargs)

    def table(self, key: tuple, build) -> DeviceTable | str:
        if key not in self._tables:
            self._tables[key] = build()
        return self._tables[key]

    def mismatch(self, table: StepTable, start: int = 0) -> str | None:
        """Why the table does not visit the scheduler's own timesteps (from ``start``), or None."""
        s = self.scheduler
        if getattr(s, "custom_timesteps", False):
            return "custom timesteps (set_timesteps(timesteps=...))"
        if not torch.equal(table.timesteps, s.timesteps[start:].cpu().long()):
            return "the scheduler's timesteps differ from the table's"
        return None

    def counts(self) -> str:
        """What ran, in words: the fused step and diffusers' own, with the reasons."""
        ran = f"{self.fused_calls} fused step(s)"
        if self.fallback_calls:
            reasons = "; ".join(f"{n}x {reason}" for reason, n in self.fallback_reasons.items())
            ran += f", {self.fallback_calls} by diffusers' own step ({reasons})"
        return ran

    def multistep_output(self, x_prev: torch.Tensor, return_dict: bool):
        """What a multistep scheduler's own ``step`` returns and leaves behind: its order warm-up
        and step counters advanced past the fused step, ``x_prev`` wrapped as its output."""
        s = self.scheduler
        s.lower_order_nums = min(s.lower_order_nums + 1, s.config.solver_order)
        s._step_index += 1
        return scheduler_output(x_prev, return_dict)


class FusedSchedulerStep(FusedStep):
    """A diffusers DDPMScheduler / DDIMScheduler ``step`` through ``fastdiff.ops.sampler_step``.

    Noise comes from diffusers' ``randn_tensor`` with the caller's generator, exactly when the
    original would draw it. Every ``timestep_spacing`` and ``steps_offset`` is fused; timesteps
    the table does not cover (``set_timesteps(timesteps=[...])``) fall back to the original step.
    """

    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.is_ddim = types.is_type(scheduler, "DDIMScheduler")

    def __call__(self, *args, **kwargs):
        a = self.arguments(args, kwargs)
        model_output, sample = a["model_output"], a["sample"]
        eta = float(a.get("eta", 0.0))
        use_clipped = bool(a.get("use_clipped_model_output", False))
        fused = self._device_table(eta, use_clipped, sample.device)
        timestep = int(a["timestep"])
        if isinstance(fused, str):
            return self.fallback(args, kwargs, fused)
        if timestep not in fused.index_of:
            return self.fallback(args, kwargs, f"timestep {timestep} is not one of the run's")
        if a.get("variance_noise") is not None and a["generator"] is not None:
            return self.fallback(args, kwargs, "both variance_noise and generator given (diffusers raises)")
        self.fused_calls += 1
        x_prev, x0 = ops.sampler_step(
            sample, model_output, fused.step_indices[fused.index_of[timestep]], fused.table.coefs,
            noise=self._noise(a, timestep, eta), clip_range=fused.table.clip,
        )
        if not a["return_dict"]:
            return x_prev, x0
        return self._output_type()(prev_sample=x_prev, pred_original_sample=x0)

    def _noise(self, a: dict, timestep: int, eta: float) -> torch.Tensor | None:
        """diffusers draws z only for t > 0 (DDPM) or eta > 0 (DDIM, then at every step)."""
        if (eta <= 0) if self.is_ddim else (timestep <= 0):
            return None
        if a.get("variance_noise") is not None:
            return a["variance_noise"]
        return randn_like_diffusers(a["model_output"], a["generator"], a["model_output"].dtype)

    def _device_table(self, eta: float, use_clipped: bool, device) -> DeviceTable | str:
        s = self.scheduler
        steps = s.num_inference_steps or s.config.num_train_timesteps
        key = (steps, getattr(s, "custom_timesteps", False), eta, use_clipped, str(device))

        def build():
            table = table_from_scheduler(s, steps, eta, use_clipped)
            return self.mismatch(table) or on_device(table, device)

        return self.table(key, build)

    def _output_type(self):
        if self.is_ddim:
            from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput  # diffusers is optional

            return DDIMSchedulerOutput
        from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput  # diffusers is optional

        return DDPMSchedulerOutput


class FusedDPMSolverStep(FusedStep):
    """A diffusers ``DPMSolverMultistepScheduler.step`` through the fused table-driven step.

    The previous data predictions live in one device buffer that ``fastdiff.ops.sampler_step``
    shifts in place, beside diffusers' step counter. A run starts where diffusers' counter is
    unset (after ``set_timesteps``), at ``begin_index`` or the first timestep's index (img2img):
    the buffer is zeroed and the table is the one for a run from that step (orders counted from
    it, as diffusers' ``lower_order_nums``). Falls back to the original step for a whole run whose
    timesteps the table does not produce (custom timesteps), and for a run it did not start.
    """

    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.history: torch.Tensor | None = None
        self.start: int | None = None  # the step index the current run began at
        self.run_fallback: str | None = None  # why diffusers' own step runs the current run

    def __call__(self, *args, **kwargs):
        a = self.arguments(args, kwargs)
        s = self.scheduler
        if s.num_inference_steps is None:
            return self.fallback(args, kwargs, "set_timesteps was not called")
        if s.step_index is None:  # the first step of a run (set_timesteps resets the counter)
            s._init_step_index(a["timestep"])
            self.start, self.history = s.step_index, None
            fused = self._device_table(a["sample"].device, self.start)
            self.run_fallback = fused if isinstance(fused, str) else None  # the whole run: one history
        if self.run_fallback:
            return self.fallback(args, kwargs, self.run_fallback)
        if self.start is None or s.lower_order_nums != min(s.step_index - self.start, s.config.solver_order):
            return self.fallback(args, kwargs, "a run fastdiff did not start (its history is diffusers')")
        fused = self._device_table(a["sample"].device, self.start)
        self.fused_calls += 1
        model_output, sample = a["model_output"], a["sample"].to(torch.float32)
        if self.history is None or self.history.shape[1:] != sample.shape:
            self.history = fused.table.new_history(sample.shape, sample.device)
        x_prev, _ = ops.sampler_step(
            sample, model_output, fused.step_indices[s.step_index - self.start], fused.table.coefs,
            noise=self._noise(a), history=self.history,
        )
        return self.multistep_output(x_prev.to(model_output.dtype), a["return_dict"])

    def _noise(self, a: dict) -> torch.Tensor | None:
        """The SDE form draws z at every step, as diffusers does; the ODE form none."""
        if not self.scheduler.config.algorithm_type.startswith("sde"):
            return None
        if a.get("variance_noise") is not None:
            return a["variance_noise"].to(torch.float32)
        return randn_like_diffusers(a["model_output"], a["generator"], torch.float32)

    def _device_table(self, device, start: int) -> DeviceTable | str:
        s = self.scheduler
        key = (s.num_inference_steps, tuple(s.timesteps.tolist()), start, str(device))

        def build():
            table = dpmsolver_table_from_scheduler(s, s.num_inference_steps, start)
            return self.mismatch(table, start) or on_device(table, device)

        return self.table(key, build)


class FusedEulerStep(FusedStep):
    """A diffusers ``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler.step`` through
    the fused step: rows from the scheduler's own ``sigmas`` (so every spacing, Karras sigmas and
    an img2img start are fused), noise from the caller's generator as diffusers draws it.
    Euler's stochastic churn (``s_churn`` > 0 inside [s_tmin, s_tmax]) runs diffusers' own step."""

    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.ancestral = types.is_type(scheduler, "EulerAncestralDiscreteScheduler")

    def __call__(self, *args, **kwargs):
        a = self.arguments(args, kwargs)
        s = self.scheduler
        timestep = a["timestep"]
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            return self.fallback(args, kwargs, "an integer step index as timestep (diffusers raises)")
        if s.step_index is None:
            s._init_step_index(timestep)
        if not self.ancestral and a["s_churn"] > 0 and a["s_tmin"] <= s.sigmas[s.step_index] <= a["s_tmax"]:
            return self.fallback(args, kwargs, "s_churn > 0 (stochastic churn)")
        device = a["sample"].device
        fused = self.table((tuple(s.sigmas.tolist()), str(device)), lambda: on_device(self._table(), device))
        self.fused_calls += 1
        model_output = a["model_output"]
        noise = randn_like_diffusers(model_output, a["generator"], model_output.dtype) if self.ancestral else None
        x_prev, x0 = ops.sampler_step(a["sample"].to(torch.float32), model_output, fused.step_indices[s.step_index],
                                      fused.table.coefs, noise=noise)
        s._step_index += 1
        x_prev = x_prev.to(model_output.dtype)
        if not a["return_dict"]:
            return x_prev, x0
        return self._output_type()(prev_sample=x_prev, pred_original_sample=x0)

    def _output_type(self):
        # diffusers is optional
        if self.ancestral:
            from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput

            return EulerAncestralDiscreteSchedulerOutput
        from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

        return EulerDiscreteSchedulerOutput

    def _table(self) -> StepTable:
        """Rows in diffusers' sigma-scaled coordinates; timesteps as diffusers has them (float)."""
        s = self.scheduler
        coefs = euler_rows(s.sigmas, self.ancestral, s.config.prediction_type, scaled=True).float()
        return StepTable("euler-ancestral" if self.ancestral else "euler", s.timesteps.cpu(), coefs, None)


class FusedUniPCStep(FusedStep):
    """A diffusers ``UniPCMultistepScheduler.step`` through the fused table-driven step.

    The previous data predictions and the last corrected sample live in one device buffer that
    ``fastdiff.ops.sampler_step`` updates in place. A run starts where diffusers' step counter is
    unset (after ``set_timesteps``): at ``set_begin_index(k)`` or the index of its first
    timestep, with a fresh buffer and the table of a run from there (its orders restart, no
    correction at its first step), as diffusers' own state does. Falls back to the original step
    for a run whose timesteps the table does not produce (custom timesteps) and past the
    schedule's end (where diffusers raises).
    """

    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.history: torch.Tensor | None = None
        self.begin = 0

    def __call__(self, *args, **kwargs):
        a = self.arguments(args, kwargs)
        s = self.scheduler
        if s.num_inference_steps is None:
            return self.fallback(args, kwargs, "set_timesteps was not called")
        first = s.step_index is None
        if first:  # the first step of a run (set_timesteps resets the counter)
            s._init_step_index(a["timestep"])
            self.begin = s.step_index
        fused = self._device_table(self.begin, a["sample"].device)
        if isinstance(fused, str):
            return self.fallback(args, kwargs, fused)
        if s.step_index >= s.num_inference_steps:
            return self.fallback(args, kwargs, "a step past the schedule's end (diffusers raises)")
        self.fused_calls += 1
        model_output, sample = a["model_output"], a["sample"]
        x = sample.to(torch.float32)
        if first or self.history is None or self.history.shape[1:] != x.shape:
            self.history = fused.table.new_history(x.shape, x.device)
        x_prev, _ = ops.sampler_step(x, model_output, fused.step_indices[s.step_index - self.begin],
                                     fused.table.coefs, history=self.history)
        return self.multistep_output(x_prev.to(sample.dtype), a["return_dict"])

    def _device_table(self, begin: int, device) -> DeviceTable | str:
        s = self.scheduler
        key = (s.num_inference_steps, tuple(s.timesteps.tolist()), tuple(s.disable_corrector), begin, str(device))

        def build():
            table = unipc_table_from_scheduler(s, s.num_inference_steps, begin)
            return self.mismatch(table, begin) or on_device(table, device)

        return self.table(key, build)


def scheduler_output(prev_sample: torch.Tensor, return_dict: bool):
    """diffusers' plain ``SchedulerOutput`` (or the tuple)."""
    if not return_dict:
        return (prev_sample,)
    from diffusers.schedulers.scheduling_utils import SchedulerOutput  # diffusers is optional

    return SchedulerOutput(prev_sample=prev_sample)


def fused_step_for(scheduler) -> FusedStep:
    """The fused ``step`` for a scheduler :func:`unsupported_reason` accepts."""
    if is_multistep(scheduler):
        return FusedDPMSolverStep(scheduler)
    if types.is_type(scheduler, *EULER_SCHEDULERS):
        return FusedEulerStep(scheduler)
    if is_unipc(scheduler):
        return FusedUniPCStep(scheduler)
    return FusedSchedulerStep(scheduler)
