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


@pytest.mark.parametrize("sampler", ["dpm++3m", "ddim", "unipc"])
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
    assert step_tuning.tunable_samplers() == ("ddim", "dpm++2m", "dpm++3m", "unipc")
    assert "euler" not in step_tuning.tunable_samplers()  # its table takes no explicit timesteps
    monkeypatch.setattr(step_tuning, "EXPLICIT_TIMESTEP_METHODS", (*schedulers.EXPLICIT_TIMESTEP_METHODS, "euler"))
    assert "euler" in step_tuning.tunable_samplers()
    with pytest.raises(ValueError, match="deterministic"):
        step_tuning.sampler_table(SCHEDULE, "dpm++2m-sde", 4)


def test_moves_take_a_fraction_of_the_gap_and_at_least_one_timestep():
    assert step_tuning._moves([999, 600, 200], 1, 1 / 4, 999) == [[999, 500, 200], [999, 700, 200]]
    assert step_tuning._moves([999, 600, 200], 2, 1 / 64, 999) == [[999, 600, 197], [999, 600, 206]]
    assert step_tuning._moves([999, 998, 997], 1, 1 / 2, 999) == []  # no room either side
    assert step_tuning._moves([999, 600, 1], 2, 1 / 64, 999) == [[999, 600, 0], [999, 600, 10]]


def test_the_command_defaults_are_the_library_ones():
    import argparse

    from fastdiff.commands import tune_steps

    parser = argparse.ArgumentParser()
    tune_steps.configure(parser)
    args = parser.parse_args(["--sampler", "dpm++3m", "--calls", "5"])
    assert args.max_evaluations == step_tuning.MAX_EVALUATIONS
    assert (args.calibration_size, args.evaluation_size) == (ode_error.CALIBRATION_SIZE, ode_error.EVALUATION_SIZE)
