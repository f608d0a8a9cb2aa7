"""ode_error's reference: the float64 ODE solution, its convergence check and its cache."""
import pytest
import torch

from fastdiff.bench import ode_error
from fastdiff.schedulers import linear_schedule, step_table
from tests.bench.toy_models import GaussianEps, gaussian_ode_solution

SCHEDULE = linear_schedule()
SHAPE = (1, 4, 4)


def test_reference_converges_to_the_closed_form():
    model = GaussianEps(SCHEDULE)
    ode = ode_error.reference_solution(model, SCHEDULE, SHAPE, 8, seed=3)
    assert 0 < ode.change_at_double_step < ode_error.CONVERGENCE_TOLERANCE
    assert ode.solution.dtype == torch.float64
    assert ode_error.rms(ode.solution, gaussian_ode_solution(SCHEDULE, ode.x_T)) < 1e-4


def test_a_reference_that_moves_when_the_step_halves_is_refused():
    model = GaussianEps(SCHEDULE)
    with pytest.raises(ValueError, match="not converged: halving its step from 8 to 4 timesteps"):
        ode_error.reference_solution(model, SCHEDULE, SHAPE, 4, seed=3, stride=4, tolerance=1e-12)


def test_reference_timesteps_are_every_timestep_near_zero():
    assert ode_error.reference_timesteps(SCHEDULE).tolist() == list(range(999, -1, -1))
    coarse = ode_error.reference_timesteps(SCHEDULE, 2)
    assert coarse[0] == 999 and bool((coarse[1:] < coarse[:-1]).all()) and len(coarse) == 450 + 100
    assert coarse[-ode_error.DENSE_BELOW:].tolist() == list(range(ode_error.DENSE_BELOW - 1, -1, -1))


def test_cache_is_reused_for_the_same_model_only(tmp_path):
    model = GaussianEps(SCHEDULE)
    first = ode_error.reference_solution(model, SCHEDULE, SHAPE, 4, seed=3, cache_dir=tmp_path, stride=4)
    (cache,) = tmp_path.iterdir()
    saved = torch.load(cache)
    torch.save({**saved, "solution": saved["solution"] + 1}, cache)  # marks the cached copy
    again = ode_error.reference_solution(model, SCHEDULE, SHAPE, 4, seed=3, cache_dir=tmp_path, stride=4)
    assert torch.equal(again.solution, first.solution + 1)
    other = GaussianEps(SCHEDULE, seed=1)  # other (unused) weights: another fingerprint
    fresh = ode_error.reference_solution(other, SCHEDULE, SHAPE, 4, seed=3, cache_dir=tmp_path, stride=4)
    assert not torch.equal(fresh.solution, first.solution + 1) and len(list(tmp_path.iterdir())) == 2


def test_ode_error_falls_with_more_steps_and_refuses_noise():
    model = GaussianEps(SCHEDULE)
    ode = ode_error.reference_solution(model, SCHEDULE, SHAPE, 8, seed=3)
    errors = [ode_error.ode_error(model, step_table(SCHEDULE, "dpmsolver++", steps=k, order=2), ode) for k in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2]
    with pytest.raises(ValueError, match="deterministic"):
        ode_error.ode_error(model, step_table(SCHEDULE, "ddim", steps=4, eta=1.0), ode)
