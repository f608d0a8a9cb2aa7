"""``fastdiff tune-steps``: the K timesteps that bring a deterministic sampler closest to the ODE.

The objective is :func:`fastdiff.bench.ode_error.ode_error` on a calibration set of x_T: the RMS
distance of the sampler's images to the model's exact probability-flow ODE solution. The
search is derivative-free (the timesteps are integers): a pattern search over the K timesteps,
starting from the default spacing. Each move takes one timestep a fraction of the way towards
a neighbour (the one above, or the one below; 0 below the last), fractions 1/2, 1/4, ... 1/64
(at least one timestep), so moves scale with the local gap. A pass visits every timestep, last
to first, and keeps the better of its two moves when it lowers the error; the fraction is
halved after a pass that kept none, and the search ends after the finest one keeps none (or at
the cap on candidate runs).

A candidate that moves timestep i changes table rows i - 1 .. i + 3 only (a row reads the
log-SNR of its step, the next one and up to three before: UniPC's corrector of order 3), so its
run restarts at step i - 1 from the incumbent's cached state and model output there: K - i model
calls instead of K, and the same images as a whole run (the cached model calls saw the same inputs).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fastdiff.bench.ode_error import (
    CALIBRATION_SEED,
    CALIBRATION_SIZE,
    DENSE_BELOW,
    EVALUATION_SEED,
    EVALUATION_SIZE,
    ODEReference,
    ode_error,
    reference_solution,
    rms,
)
from fastdiff.ops import backend, reference
from fastdiff.presets import DETERMINISTIC_SAMPLERS, SAMPLER_METHODS, sampler_kwargs
from fastdiff.schedulers import EXPLICIT_TIMESTEP_METHODS, NoiseSchedule, StepTable, step_table
from fastdiff.schedulers.tuned import TunedSchedule

#: Fractions of the gap to a neighbour a move takes, coarse to fine.
FRACTIONS = (1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64)
#: Default cap on candidate runs (keeps the built-in model's search to minutes on 2 cores).
MAX_EVALUATIONS = 400


@dataclass
class TuneResult:
    timesteps: list[int]
    default_timesteps: list[int]
    error_before: float
    error_after: float
    evaluations: int  # candidate runs, the default's included
    model_calls: int  # calls the search made on the calibration set
    seconds: float
    trace: list[float] = field(default_factory=list)  # the incumbent's error after each accepted move


def tunable_samplers() -> tuple[str, ...]:
    """The --sampler names tune-steps takes: the deterministic ones whose method
    :mod:`fastdiff.schedulers` can build over explicit timesteps (Euler's table takes none)."""
    return tuple(name for name in DETERMINISTIC_SAMPLERS if SAMPLER_METHODS[name][0] in EXPLICIT_TIMESTEP_METHODS)


def sampler_table(schedule: NoiseSchedule, sampler: str, calls: int, timesteps=None) -> StepTable:
    """The deterministic table of ``sampler`` (a --sampler name) at ``calls`` steps, optionally
    over explicit ``timesteps``."""
    if sampler not in tunable_samplers():
        raise ValueError(f"sampler must be one of {', '.join(tunable_samplers())} (deterministic samplers), "
                         f"got {sampler!r}")
    kwargs = sampler_kwargs(sampler)
    return step_table(schedule, steps=None if timesteps is not None else calls, timesteps=timesteps, **kwargs)


class _Runs:
    """Runs of tables over one x_T set, keeping each step's input state, history and model output
    of the incumbent so a candidate restarts where its table first differs."""

    def __init__(self, model, x_T: torch.Tensor):
        self.model, self.x_T = model, x_T
        self.model_calls = 0

    @torch.no_grad()
    def run(self, table: StepTable, start: int = 0, cache: list | None = None) -> tuple[torch.Tensor, list]:
        """(images, per-step (x, history, eps)) of ``table``, steps before ``start`` and the model
        output at ``start`` taken from ``cache`` (an earlier run's states)."""
        states = list(cache[:start]) if cache else []
        if start == 0:
            x, history = self.x_T, table.new_history(self.x_T.shape)
        else:
            x, history, _ = cache[start]
            history = None if history is None else history.clone()
        batch = x.shape[0]
        with backend.exact_fp32():
            for i in range(start, table.num_steps):
                if cache is not None and i == start and start > 0:
                    eps = cache[start][2]
                else:
                    eps = self.model(x, table.timesteps[i].expand(batch))
                    self.model_calls += 1
                states.append((x, None if history is None else history.clone(), eps))
                index = torch.tensor(i)
                x, _ = reference.sampler_step(x, eps, index, table.coefs, clip_range=table.clip, history=history)
        return x, states


def _moves(timesteps: list[int], i: int, fraction: float, top: int) -> list[list[int]]:
    """Candidates moving timestep ``i`` ``fraction`` of the way (at least one timestep) to its
    neighbour above (T - 1 for the first) or below (-1 past the last), still strictly descending
    in [0, T - 1]."""
    t = timesteps[i]
    above = top + 1 if i == 0 else timesteps[i - 1]
    below = -1 if i == len(timesteps) - 1 else timesteps[i + 1]
    moved = set()
    for target in (above - (i == 0), below):
        step = fraction * (target - t)
        moved.add(t + int(round(step)) if abs(step) >= 1 else t + (1 if target > t else -1))
    return [timesteps[:i] + [m] + timesteps[i + 1:] for m in sorted(moved) if m != t and below < m < above]


def tune_timesteps(model, schedule: NoiseSchedule, sampler: str, calls: int, calibration: ODEReference,
                   max_evaluations: int = MAX_EVALUATIONS, progress=None) -> TuneResult:
    """The ``calls`` timesteps of ``sampler`` with the lowest ode_error on ``calibration`` the
    search finds within ``max_evaluations`` runs (see the module docstring)."""
    if not isinstance(calls, int) or isinstance(calls, bool) or calls < 1:
        raise ValueError(f"calls must be an integer >= 1, got {calls!r}")
    start_time = time.perf_counter()
    default = sampler_table(schedule, sampler, calls)
    runs = _Runs(model, calibration.x_T)
    images, cache = runs.run(default)
    best = default.timesteps.tolist()
    best_error = error_before = rms(images, calibration.solution)
    evaluations, trace = 1, [best_error]
    top = schedule.num_timesteps - 1
    for fraction in FRACTIONS:
        kept = True
        while kept and evaluations < max_evaluations:
            kept = False
            for i in reversed(range(calls)):
                tried = []
                for candidate in _moves(best, i, fraction, top)[:max_evaluations - evaluations]:
                    table = sampler_table(schedule, sampler, calls, candidate)
                    images, states = runs.run(table, max(i - 1, 0), cache)
                    evaluations += 1
                    tried.append((rms(images, calibration.solution), candidate, states))
                error, candidate, states = min(tried, key=lambda tried: tried[0], default=(best_error, None, None))
                if error < best_error:
                    best, best_error, cache, kept = candidate, error, states, True
                    trace.append(error)
                    if progress:
                        progress(f"{evaluations} runs: error {error:.5f}, timesteps {best}")
    return TuneResult(best, default.timesteps.tolist(), error_before, best_error, evaluations, runs.model_calls,
                      time.perf_counter() - start_time, trace)


def tune_model(model, info, sampler: str, calls: int, calibration_size: int = CALIBRATION_SIZE,
               evaluation_size: int = EVALUATION_SIZE, cache_dir=None, max_evaluations: int = MAX_EVALUATIONS,
               progress=None) -> TunedSchedule:
    """Tune ``sampler`` at ``calls`` steps for a model loaded from a folder (``info``: its
    ModelInfo): the ODE references of the calibration and evaluation sets (cached in
    ``cache_dir``), the search on the first, the errors before/after on both (evaluation skipped
    when ``evaluation_size`` is 0). Returns the schedule to save into the folder."""
    if info.weights_sha256 is None:
        raise ValueError(f"{info.description}: records no weights hash to tie a tuned schedule to")
    if info.config.num_classes:
        raise ValueError("tune-steps tunes unconditional models only (the ODE of a class-conditioned one needs labels)")
    schedule = info.noise_schedule()
    sampler_table(schedule, sampler, calls)  # refuses an unknown sampler or impossible calls before any work
    shape = (info.config.in_channels, info.config.image_size, info.config.image_size)
    calibration = reference_solution(model, schedule, shape, calibration_size, CALIBRATION_SEED, cache_dir)
    result = tune_timesteps(model, schedule, sampler, calls, calibration, max_evaluations, progress)
    errors = {"calibration": {"before": result.error_before, "after": result.error_after, "size": calibration_size,
                              "seed": CALIBRATION_SEED}}
    if evaluation_size:
        evaluation = reference_solution(model, schedule, shape, evaluation_size, EVALUATION_SEED, cache_dir)
        errors["evaluation"] = {
            "before": ode_error(model, sampler_table(schedule, sampler, calls), evaluation),
            "after": ode_error(model, sampler_table(schedule, sampler, calls, result.timesteps), evaluation),
            "size": evaluation_size, "seed": EVALUATION_SEED,
        }
    settings = {"default_timesteps": result.default_timesteps, "search": "pattern search over integer timesteps",
                "fractions": list(FRACTIONS), "max_evaluations": max_evaluations, "evaluations": result.evaluations,
                "model_calls": result.model_calls, "seconds": round(result.seconds, 1),
                "reference": {"solver": "dpm++3m float64", "stride": calibration.stride, "dense_below": DENSE_BELOW,
                              "change_at_double_step": calibration.change_at_double_step}}
    return TunedSchedule(sampler, tuple(result.timesteps), schedule.num_timesteps, info.weights_sha256, errors,
                         settings)
