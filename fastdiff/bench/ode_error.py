"""A sharp error measure for deterministic samplers: the distance to the exact ODE solution.

FD against 359 held-out digits cannot tell two good solvers apart (its noise band is wide). A
deterministic sampler (DDIM at eta 0, DPM-Solver++) is a discretisation of the probability-flow
ODE of the same model, so it can be scored without sampling noise: run it from a fixed set of
x_T and take the RMS difference to that ODE's exact solution from the same x_T.

The exact solution: DPM-Solver++(3M) over every integer timestep, T - 1 down to 0, with the
solver state, history and update in float64 (the model itself is evaluated in float32, its
input rounded to it: ~1e-7 relative, far under the tolerance). A discrete-time model is only
defined at integer timesteps, and its eps is rough in t at the scale of a few timesteps (on the
built-in model, 400 log-SNR-uniform nodes still differ from every timestep by 2.6e-4 RMS: the
README's measurements), so the reference takes the finest grid the model has. It is checked
converged: the solve over every second timestep above :data:`DENSE_BELOW` (every one below it,
where the step is one timestep in both) must lie within :data:`CONVERGENCE_TOLERANCE` RMS of it
on the first :data:`CHECK_SIZE` x_T. It is cached with the x_T, the model's weights fingerprint
and that measured change, verified before use.

Two disjoint x_T sets: the evaluation set (:data:`EVALUATION_SEED`, >= 500) scores samplers;
the calibration set (:data:`CALIBRATION_SEED`, 256) is what ``fastdiff tune-steps`` tunes on.
Neither overlaps the quality sweep's seeds (0, 1, ... per chunk).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastdiff.files import atomic_write
from fastdiff.ops import reference
from fastdiff.sampling.loop import run_steps
from fastdiff.sampling.noise import ExternalNoise
from fastdiff.sampling.reference import sample_reference
from fastdiff.schedulers import NoiseSchedule, StepTable
from fastdiff.schedulers.dpmsolver import dpmsolver_table

EVALUATION_SEED = 1_000_000
CALIBRATION_SEED = 2_000_000
EVALUATION_SIZE = 500
CALIBRATION_SIZE = 256
#: Timesteps between the reference's nodes (1: every timestep; the check doubles it above DENSE_BELOW).
REFERENCE_STRIDE = 1
#: Below this timestep every solve visits every timestep.
DENSE_BELOW = 100
#: x_T the convergence check solves twice (the first of the set).
CHECK_SIZE = 8
#: The most the reference may change (RMS) when its step is halved.
CONVERGENCE_TOLERANCE = 1e-4
CHUNK = 256


def draw_x_T(shape, size: int, seed: int) -> torch.Tensor:
    """``size`` float32 x_T of image ``shape`` (C, H, W) from one seeded generator."""
    return torch.randn((size, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes and values): which model a cache belongs to."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def reference_timesteps(schedule: NoiseSchedule, stride: int = REFERENCE_STRIDE) -> torch.Tensor:
    """Descending timesteps: every ``stride``-th from T - 1 down to DENSE_BELOW, then every one below it."""
    top = schedule.num_timesteps - 1
    sparse = torch.arange(top, DENSE_BELOW - 1, -stride)
    return torch.cat([sparse, torch.arange(min(DENSE_BELOW, int(sparse[-1])) - 1, -1, -1)])


@torch.no_grad()
def solve_ode(model, schedule: NoiseSchedule, x_T: torch.Tensor, stride: int = REFERENCE_STRIDE,
              chunk: int = CHUNK) -> torch.Tensor:
    """x_0 (float64) of the probability-flow ODE from ``x_T``: DPM-Solver++(3M) over
    :func:`reference_timesteps`, float64 state and update, the model evaluated in float32."""
    table = dpmsolver_table(schedule, order=3, timesteps=reference_timesteps(schedule, stride),
                            dtype=torch.float64)
    parts = []
    for x in x_T.double().split(chunk):
        def step(x, step_index, _z, history):
            t = table.timesteps[step_index].expand(x.shape[0])
            eps = model(x.float(), t).double()
            return reference.sampler_step(x, eps, step_index, table.coefs, history=history,
                                          compute_dtype=torch.float64)[0]

        parts.append(run_steps(table, x, step, lambda i: None))
    return torch.cat(parts)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


@dataclass(frozen=True)
class ODEReference:
    """The exact solution from ``x_T`` and how it was checked."""

    x_T: torch.Tensor  # float32
    solution: torch.Tensor  # float64
    stride: int
    change_at_double_step: float  # RMS(solve(stride) - solve(2 stride)) on the first CHECK_SIZE x_T
    fingerprint: str  # weights_fingerprint of the model
    seed: int


def reference_solution(model, schedule: NoiseSchedule, shape, size: int, seed: int, cache_dir: Path | None = None,
                       stride: int = REFERENCE_STRIDE, tolerance: float = CONVERGENCE_TOLERANCE,
                       chunk: int = CHUNK) -> ODEReference:
    """The converged ODE solution for ``size`` x_T drawn with ``seed``: read from ``cache_dir``
    when it holds one for the same model, x_T and stride, else solved, checked (ValueError when
    halving the step changes it by ``tolerance`` or more) and written there atomically."""
    x_T = draw_x_T(shape, size, seed)
    fingerprint = weights_fingerprint(model)
    name = f"ode-{fingerprint[:16]}-seed{seed}-n{size}-stride{stride}.pt"
    cache = None if cache_dir is None else Path(cache_dir) / name
    if cache is not None and cache.exists():
        cached = ODEReference(**torch.load(cache))
        if (cached.fingerprint == fingerprint and cached.stride == stride and cached.seed == seed
                and torch.equal(cached.x_T, x_T) and cached.solution.shape == x_T.shape
                and cached.change_at_double_step < tolerance):
            return cached
    check = x_T[:CHECK_SIZE]
    checked = solve_ode(model, schedule, check, stride, chunk)
    change = rms(checked, solve_ode(model, schedule, check, 2 * stride, chunk))
    if not change < tolerance:
        raise ValueError(f"the ODE reference is not converged: halving its step from {2 * stride} to {stride} "
                         f"timesteps changes it by {change:.2e} RMS (tolerance {tolerance:.0e})")
    rest = solve_ode(model, schedule, x_T[CHECK_SIZE:], stride, chunk) if size > CHECK_SIZE else checked[:0]
    solution = torch.cat([checked, rest])
    result = ODEReference(x_T, solution, stride, change, fingerprint, seed)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda tmp: torch.save(asdict(result), tmp))
    return result


def deterministic_images(model, table: StepTable, x_T: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """The images a deterministic ``table`` (no noise column) draws from ``x_T``, eager reference loop."""
    if bool(table.coefs[:, 5].ne(0).any()):
        raise ValueError(f"ode_error needs a deterministic sampler; this {table.method} table adds noise")
    parts = []
    for x in x_T.split(chunk):
        zeros = torch.zeros((table.num_steps, *x.shape), dtype=torch.float32)
        parts.append(sample_reference(model, table, noise=ExternalNoise(x, zeros)))
    return torch.cat(parts)


def ode_error(model, table: StepTable, ode: ODEReference, chunk: int = CHUNK) -> float:
    """RMS over the set (all pixels of all images) of the sampler's images minus the exact ODE solution."""
    return rms(deterministic_images(model, table, ode.x_T, chunk), ode.solution)
