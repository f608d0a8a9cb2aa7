"""Which update fastdiff.Sampler runs: a diffusers scheduler's own (settings and all), the model
folder's schedule by default, and a clear refusal or warning where it cannot know or reproduce it."""
import pytest
import torch
from helpers import assert_within_2x_of_torch, tiny_diffusers_unet

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler

from fastdiff.commands.verify import fp64_trajectory
from fastdiff.models.folders import load_model, save_model
from fastdiff.models.unet import UNet, UNetConfig
from fastdiff.sampling import draw_noise, sample_reference
from fastdiff.sampling.sampler import Sampler
from fastdiff.sampling.step import DiffusersEps
from fastdiff.schedulers import cosine_schedule, ddpm_table, step_table

STEPS = 8


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return tiny_diffusers_unet().eval()


def diffusers_loop(unet, scheduler, noise, eta):
    """What a diffusers DDIM pipeline computes, with the given noise as variance_noise."""
    scheduler.set_timesteps(STEPS)
    x = noise.x_T.clone()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            eps = unet(x, t).sample
            x = scheduler.step(eps, t, x, eta=eta, variance_noise=noise.z[i]).prev_sample
    return x


@pytest.mark.parametrize(
    "config, eta",
    [
        (dict(clip_sample=True, timestep_spacing="trailing", set_alpha_to_one=False), 0.0),
        (dict(clip_sample=True, clip_sample_range=0.5, timestep_spacing="linspace"), 0.5),
        (dict(clip_sample=False, steps_offset=1), 0.0),
    ],
    ids=["trailing-clip", "linspace-range-eta", "offset"],
)
def test_sampler_samples_as_the_diffusers_scheduler_does(unet, config, eta):
    scheduler = DDIMScheduler(**config)
    sampler = Sampler(unet, schedule=scheduler, steps=STEPS, eta=eta, compile=False)
    scheduler.set_timesteps(STEPS)
    assert sampler.table.method == "ddim" and torch.equal(sampler.table.timesteps, scheduler.timesteps)
    noise = draw_noise(sampler.table, (2, 3, 8, 8), seed=0)
    theirs = diffusers_loop(unet, DDIMScheduler(**config), noise, eta)
    truth = fp64_trajectory(DiffusersEps(unet), sampler.table, noise)
    assert_within_2x_of_torch(sampler.sample(noise=noise), theirs, truth, "sampler vs the diffusers scheduler")


def test_ddpm_scheduler_sets_method_steps_and_variance(unet):
    scheduler = DDPMScheduler(variance_type="fixed_small", clip_sample=True, timestep_spacing="trailing")
    scheduler.set_timesteps(10)
    sampler = Sampler(unet, schedule=scheduler, compile=False)  # steps: the scheduler's num_inference_steps
    assert sampler.table.method == "ddpm" and torch.equal(sampler.table.timesteps, scheduler.timesteps)
    assert sampler.table.clip == 1.0
    with pytest.raises(ValueError, match="method 'ddim' does not match the DDPMScheduler"):
        Sampler(unet, schedule=scheduler, method="ddim", compile=False)


@pytest.mark.parametrize(
    "scheduler, reason",
    [
        (DDPMScheduler(prediction_type="v_prediction"), "prediction_type 'v_prediction'"),
        (DDIMScheduler(thresholding=True), "dynamic thresholding"),
        (DDPMScheduler(variance_type="learned_range"), "variance_type 'learned_range'"),
    ],
)
def test_settings_no_table_reproduces_are_refused(unet, scheduler, reason):
    with pytest.raises(ValueError, match=f"cannot reproduce this scheduler's step: {reason}"):
        Sampler(unet, schedule=scheduler, compile=False)


def test_diffusers_unet_without_a_scheduler_warns(unet):
    with pytest.warns(RuntimeWarning, match="no schedule given for a diffusers UNet.*pass schedule="):
        sampler = Sampler(unet, method="ddim", steps=4, compile=False)
    assert any("no schedule given" in note for note in sampler.describe()["notes"])


def test_model_folder_schedule_is_the_default(tmp_path):
    torch.manual_seed(0)
    save_model(UNet(UNetConfig.tiny(image_size=8)), tmp_path / "cosine", schedule="cosine", num_timesteps=200)
    model, info = load_model(tmp_path / "cosine")
    table = step_table(info.noise_schedule(), "ddim", steps=5)
    sampler = Sampler(model, method="ddim", steps=5, compile=False)
    assert torch.equal(sampler.table.coefs, table.coefs) and torch.equal(sampler.table.timesteps, table.timesteps)
    assert torch.equal(table.coefs, step_table(cosine_schedule(200), "ddim", steps=5).coefs)
    noise = draw_noise(table, (1, 3, 8, 8), seed=0)
    assert torch.equal(sampler.sample(noise=noise), sample_reference(model, table, noise=noise))
    assert Sampler(model, compile=False).table.num_steps == 200  # DDPM over the folder's T
    assert torch.equal(Sampler(model, compile=False).table.coefs, ddpm_table(cosine_schedule(200)).coefs)
