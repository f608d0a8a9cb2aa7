"""diffusers schedulers -> fastdiff: the scheduler -> StepTable bridge and the fused ``step``s.

:func:`table_from_scheduler` builds the :class:`~fastdiff.schedulers.StepTable` that computes
what a scheduler's ``step`` computes with its config, or raises naming the setting no table
reproduces (:func:`unsupported_reason`). :func:`fastdiff.accelerate` installs a :class:`FusedStep`
as the scheduler's ``step``: the same signature, output type and random draws, through
``fastdiff.ops.sampler_step`` on that table; ``fused_calls`` / ``fallback_calls`` count which ran.
"""
from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

from fastdiff import ops
from fastdiff.integrations.diffusers import types
from fastdiff.schedulers import TIMESTEP_SPACINGS, NoiseSchedule, StepTable, ddim_table, ddpm_table
from fastdiff.schedulers.dpmsolver import ALGORITHMS, PREDICTIONS, SPACINGS, dpmsolver_table
from fastdiff.schedulers.unipc import SOLVER_TYPES, undefined_final_step, unipc_table

#: The scheduler classes a table reproduces.
FUSED_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
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
        return (f"{type(scheduler).__name__} is not a DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler or "
                "UniPCMultistepScheduler")
    if is_multistep(scheduler):
        return _unsupported_dpmsolver(scheduler.config)
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
                         use_clipped_model_output: bool = False) -> StepTable:
    """The StepTable that computes exactly what a diffusers ``DDPMScheduler`` / ``DDIMScheduler``
    / ``DPMSolverMultistepScheduler`` step computes with its config (schedule, clip_sample and
    its range, variance_type, set_alpha_to_one, timestep_spacing, steps_offset; the solver's
    order and options) over ``steps`` steps (default: the scheduler's ``num_inference_steps``
    if set, else T for DDPM, 50 for DDIM and 20 for DPM-Solver++).
    Raises ValueError naming the setting a table cannot reproduce."""
    reason = unsupported_reason(scheduler)
    if reason:
        raise ValueError(f"fastdiff cannot reproduce this scheduler's step: {reason}")
    if is_multistep(scheduler):
        return dpmsolver_table_from_scheduler(scheduler, steps or scheduler.num_inference_steps or 20)
    if is_unipc(scheduler):
        return unipc_table_from_scheduler(scheduler, steps or scheduler.num_inference_steps or 20)
    config = scheduler.config
    is_ddim = types.is_type(scheduler, "DDIMScheduler")
    steps = steps or scheduler.num_inference_steps or (50 if is_ddim else config.num_train_timesteps)
    schedule = schedule_from_scheduler(scheduler)
    spaced = dict(spacing=config.timestep_spacing, steps_offset=config.steps_offset)
    if is_ddim:
        return ddim_table(schedule, steps=steps, eta=eta, clip_sample=config.clip_sample,
                          clip_range=config.clip_sample_range, set_alpha_to_one=config.set_alpha_to_one,
                          use_clipped_model_output=use_clipped_model_output, **spaced)
    return ddpm_table(schedule, steps=steps, variance=DDPM_VARIANCES[config.variance_type], form="diffusers",
                      clip_sample=config.clip_sample, clip_range=config.clip_sample_range, **spaced)


def dpmsolver_table_from_scheduler(scheduler, steps: int) -> StepTable:
    """The StepTable of a DPMSolverMultistepScheduler (its own betas, options and order) for ``steps``."""
    c = scheduler.config
    return dpmsolver_table(
        schedule_from_scheduler(scheduler), steps=steps, order=c.solver_order, algorithm=c.algorithm_type,
        solver_type=c.solver_type, prediction=c.prediction_type, spacing=c.timestep_spacing,
        steps_offset=c.steps_offset, karras=c.use_karras_sigmas,
        round_karras_timesteps=c.beta_schedule != "squaredcos_cap_v2", final_sigmas=c.final_sigmas_type,
        lower_order_final=c.lower_order_final, euler_at_final=c.euler_at_final,
        lambda_min_clipped=c.lambda_min_clipped,
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
    per-run tables (built once per key, ``None`` where the table does not reproduce the run)
    and the two counters."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.original = type(scheduler).step.__get__(scheduler)
        self.signature = inspect.signature(self.original)
        self._tables: dict[tuple, DeviceTable | None] = {}
        self.fused_calls = 0
        self.fallback_calls = 0

    def arguments(self, args, kwargs) -> dict:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments

    def fallback(self, args, kwargs):
        """diffusers' own step (outside the table, or an error diffusers reports)."""
        self.fallback_calls += 1
        return self.original(*args, **kwargs)

    def table(self, key: tuple, build) -> DeviceTable | None:
        if key not in self._tables:
            self._tables[key] = build()
        return self._tables[key]

    def multistep_output(self, x_prev: torch.Tensor, return_dict: bool):
        """What a multistep scheduler's own ``step`` returns and leaves behind: its order warm-up
        and step counters advanced past the fused step, ``x_prev`` wrapped as its output."""
        s = self.scheduler
        s.lower_order_nums = min(s.lower_order_nums + 1, s.config.solver_order)
        s._step_index += 1
        if not return_dict:
            return (x_prev,)
        from diffusers.schedulers.scheduling_utils import SchedulerOutput  # diffusers is optional

        return SchedulerOutput(prev_sample=x_prev)

    def matches_scheduler(self, table: StepTable, begin: int = 0) -> bool:
        """The table visits the scheduler's own timesteps (not custom ones) from step ``begin``."""
        s = self.scheduler
        own = s.timesteps.cpu().long()[begin:]
        return not getattr(s, "custom_timesteps", False) and torch.equal(table.timesteps, own)


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
        noise_twice = a.get("variance_noise") is not None and a["generator"] is not None
        if fused is None or timestep not in fused.index_of or noise_twice:
            return self.fallback(args, kwargs)
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

    def _device_table(self, eta: float, use_clipped: bool, device) -> DeviceTable | None:
        s = self.scheduler
        steps = s.num_inference_steps or s.config.num_train_timesteps
        key = (steps, getattr(s, "custom_timesteps", False), eta, use_clipped, str(device))

        def build():
            table = table_from_scheduler(s, steps, eta, use_clipped)
            return on_device(table, device) if self.matches_scheduler(table) else None

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
    shifts in place, beside diffusers' step counter; a new run (``set_timesteps`` resets the
    counter) zeroes it. Falls back to the original step for a run whose timesteps the table
    does not produce (custom timesteps), or whose step count is below the solver order.
    """

    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.history: torch.Tensor | None = None

    def __call__(self, *args, **kwargs):
        a = self.arguments(args, kwargs)
        s = self.scheduler
        fused = self._device_table(a["sample"].device)
        if fused is None:
            return self.fallback(args, kwargs)
        self.fused_calls += 1
        if s.step_index is None:  # the first step of a run (set_timesteps resets the counter)
            s._init_step_index(a["timestep"])
            self.history = None
        model_output, sample = a["model_output"], a["sample"].to(torch.float32)
        if self.history is None or self.history.shape[1:] != sample.shape:
            self.history = fused.table.new_history(sample.shape, sample.device)
        x_prev, _ = ops.sampler_step(
            sample, model_output, fused.step_indices[s.step_index], fused.table.coefs,
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

    def _device_table(self, device) -> DeviceTable | None:
        s = self.scheduler
        if s.num_inference_steps is None:
            return None
        key = (s.num_inference_steps, tuple(s.timesteps.tolist()), str(device))

        def build():
            try:
                table = dpmsolver_table_from_scheduler(s, s.num_inference_steps)
            except ValueError:  # e.g. fewer steps than the solver order: diffusers lowers the order
                return None
            return on_device(table, device) if self.matches_scheduler(table) else None

        return self.table(key, build)


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
            return self.fallback(args, kwargs)
        first = s.step_index is None
        if first:  # the first step of a run (set_timesteps resets the counter)
            s._init_step_index(a["timestep"])
            self.begin = s.step_index
        fused = self._device_table(self.begin, a["sample"].device)
        if fused is None or s.step_index >= s.num_inference_steps:
            return self.fallback(args, kwargs)
        self.fused_calls += 1
        model_output, sample = a["model_output"], a["sample"]
        x = sample.to(torch.float32)
        if first or self.history is None or self.history.shape[1:] != x.shape:
            self.history = fused.table.new_history(x.shape, x.device)
        x_prev, _ = ops.sampler_step(x, model_output, fused.step_indices[s.step_index - self.begin],
                                     fused.table.coefs, history=self.history)
        return self.multistep_output(x_prev.to(sample.dtype), a["return_dict"])

    def _device_table(self, begin: int, device) -> DeviceTable | None:
        s = self.scheduler
        key = (s.num_inference_steps, tuple(s.timesteps.tolist()), tuple(s.disable_corrector), begin, str(device))

        def build():
            table = unipc_table_from_scheduler(s, s.num_inference_steps, begin)
            return on_device(table, device) if self.matches_scheduler(table, begin) else None

        return self.table(key, build)
