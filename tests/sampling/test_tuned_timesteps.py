"""Sampler and fastdiff sample run a model folder's tuned schedule only when it matches."""
import pytest
import torch

from fastdiff.cli import main
from fastdiff.models import folders
from fastdiff.models.unet import UNet, UNetConfig
from fastdiff.sampling.sampler import Sampler
from fastdiff.schedulers import tuned

TIMESTEPS = (999, 500, 100)


@pytest.fixture()
def folder(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = UNet(UNetConfig.tiny(image_size=8, in_channels=1))
    path = folders.save_model(model, tmp_path / "model")
    _, info = folders.load_model(path)
    folders.save_tuned_schedule(info, tuned.TunedSchedule("dpm++2m", TIMESTEPS, 1000, info.weights_sha256))
    return path


def _sampler(folder, **kwargs):
    model, _ = folders.load_model(folder)
    return Sampler(model, method="dpmsolver++", compile=False, **kwargs)


def test_sampler_runs_the_tuned_schedule_for_its_sampler_and_steps_only(folder):
    picked = _sampler(folder, order=2, steps=3)
    assert picked.table.timesteps.tolist() == list(TIMESTEPS)
    assert picked.describe()["timesteps"] == f"tuned ({folder / 'schedules' / 'dpm++2m-3.json'})"
    for kwargs in ({"order": 2, "steps": 4}, {"order": 3, "steps": 3},
                   {"order": 2, "steps": 3, "timesteps": "default"}):
        sampler = _sampler(folder, **kwargs)
        assert sampler.describe()["timesteps"] == "default" and sampler.table.timesteps[-1] != 100
    with pytest.raises(ValueError, match="dpm\\+\\+2m-4.json does not exist"):
        _sampler(folder, order=2, steps=4, timesteps="tuned")
    model, _ = folders.load_model(folder)
    assert Sampler(model, picked.table, compile=False).describe()["timesteps"] == "as given"  # not claimed as default


def test_unipc_runs_its_own_tuned_schedule(folder):
    model, info = folders.load_model(folder)
    folders.save_tuned_schedule(info, tuned.TunedSchedule("unipc", (990, 420, 60), 1000, info.weights_sha256))
    picked = Sampler(model, method="unipc", steps=3, compile=False)  # order 2: the "unipc" sampler
    assert picked.table.timesteps.tolist() == [990, 420, 60] and picked.table.corrector
    assert picked.describe()["timesteps"] == f"tuned ({folder / 'schedules' / 'unipc-3.json'})"
    assert Sampler(model, method="unipc", order=3, steps=3, compile=False).describe()["timesteps"] == "default"
    assert _sampler(folder, order=2, steps=3).table.timesteps.tolist() == list(TIMESTEPS)  # dpm++2m's own file


def test_a_schedule_for_other_weights_is_refused(folder):
    tuned.save_tuned(folder / "schedules" / "dpm++3m-3.json", tuned.TunedSchedule("dpm++3m", TIMESTEPS, 1000, "0" * 64))
    with pytest.warns(RuntimeWarning, match="tuned for other weights"):
        sampler = _sampler(folder, order=3, steps=3)
    assert sampler.describe()["timesteps"].startswith("default (the tuned schedule was refused")
    with pytest.raises(ValueError, match="tuned for other weights"):
        _sampler(folder, order=3, steps=3, timesteps="tuned")


def test_saving_checks_the_weights_hash(folder):
    model, info = folders.load_model(folder)
    with pytest.raises(ValueError, match="does not match the weights the schedule was tuned with"):
        folders.save_tuned_schedule(info, tuned.TunedSchedule("dpm++3m", TIMESTEPS, 1000, "0" * 64))
    weights = folder / folders.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")  # the weights changed since loading
    with pytest.raises(ValueError, match="does not match"):
        folders.save_tuned_schedule(info, tuned.TunedSchedule("dpm++3m", TIMESTEPS, 1000, info.weights_sha256))


def test_sample_command_says_which_timesteps_ran(folder, tmp_path, capsys):
    args = ["sample", "--model", str(folder), "--sampler", "dpm++2m", "--steps", "3", "--batch", "1", "--no-progress",
            "--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert f"timesteps: tuned ({folder / 'schedules' / 'dpm++2m-3.json'})" in capsys.readouterr().out
    assert main([*args, "--schedule", "default"]) == 0
    assert "timesteps: default" in capsys.readouterr().out
    assert main([*args[:5], "--steps", "4", *args[7:], "--schedule", "tuned"]) == 2
    assert "dpm++2m-4.json does not exist" in capsys.readouterr().err


def test_tune_steps_refuses_bad_arguments(folder, capsys):
    assert main(["tune-steps", "--model", str(folder), "--sampler", "euler", "--calls", "4"]) == 2
    assert "--sampler euler: its table takes no explicit timesteps yet" in capsys.readouterr().err
    weights = folder / folders.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    assert main(["tune-steps", "--model", str(folder), "--sampler", "dpm++3m", "--calls", "4"]) == 2
    assert "does not match config.json" in capsys.readouterr().err
