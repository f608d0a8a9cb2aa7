"""fastdiff tune-steps' search: it lowers the calibration error, and its restarts are exact."""
import pytest

from fastdiff import presets, schedulers
from fastdiff.bench import ode_error, step_tuning
from fastdiff.schedulers import linear_schedule
from tests.bench.toy_models import GaussianEps

SCHEDULE = linear_schedule()


@pytest.fixture(scope="module")
def toy():
    """A tiny random net on top of an exact Gaussian eps, and its ODE on 8 calibration x_T."""
    model = GaussianEps(SCHEDULE, scale=0.5)
    return model, ode_error.reference_solution(model, SCHEDULE, (1, 8, 8), 8, seed=5, stride=4, tolerance=1.0)


@pytest.mark.parametrize("sampler", ["dpm++3m", "ddim"])
def test_tuning_lowers_the_calibration_error(toy, sampler):
    model, ode = toy
    result = step_tuning.tune_timesteps(model, SCHEDULE, sampler, 4, ode, max_evaluations=20)
    assert result.error_after < 0.8 * result.error_before and result.evaluations <= 20
    assert result.default_timesteps == schedulers.step_table(SCHEDULE, **presets.sampler_kwargs(sampler),
                                                             steps=4).timesteps.tolist()
    # the restarted runs' figure is the one a whole run of the tuned table gives
    tuned = step_tuning.sampler_table(SCHEDULE, sampler, 4, result.timesteps)
    assert ode_error.ode_error(model, tuned, ode) == result.error_after
    assert result.model_calls < 4 * result.evaluations  # restarts skipped calls


def test_only_deterministic_samplers_the_schedulers_have_are_tunable(monkeypatch):
    assert step_tuning.tunable_samplers() == ("ddim", "dpm++2m", "dpm++3m")
    assert "unipc" not in step_tuning.tunable_samplers()  # its table takes no explicit timesteps yet
    monkeypatch.setattr(step_tuning, "EXPLICIT_TIMESTEP_METHODS", (*schedulers.EXPLICIT_TIMESTEP_METHODS, "unipc"))
    assert "unipc" in step_tuning.tunable_samplers()
    with pytest.raises(ValueError, match="deterministic"):
        step_tuning.sampler_table(SCHEDULE, "dpm++2m-sde", 4)
