"""``accelerate`` on a diffusers UniPCMultistepScheduler: the fused step in an img2img-shaped loop
(a run that starts part-way, ``set_begin_index``), and the settings it leaves to diffusers, by name."""
import copy

import pytest
import torch
from helpers import tiny_diffusers_unet

diffusers = pytest.importorskip("diffusers")
from diffusers import UniPCMultistepScheduler

from fastdiff import accelerate


def img2img(unet, scheduler, strength: float, steps: int = 10) -> torch.Tensor:
    """StableDiffusionImg2ImgPipeline's loop shape: noise the image to the strength's timestep,
    ``set_begin_index(t_start)``, then step over ``timesteps[t_start:]``."""
    g = torch.Generator().manual_seed(0)
    image, noise = torch.rand((2, 3, 8, 8), generator=g) * 2 - 1, torch.randn((2, 3, 8, 8), generator=g)
    scheduler.set_timesteps(steps)
    t_start = steps - int(steps * strength)
    timesteps = scheduler.timesteps[t_start:]
    scheduler.set_begin_index(t_start)
    x = scheduler.add_noise(image, noise, timesteps[:1])
    with torch.no_grad():
        for t in timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize("order", [1, 2, 3])
def test_img2img_loop_matches_diffusers(order):
    torch.manual_seed(0)
    unet = tiny_diffusers_unet().eval()
    scheduler = UniPCMultistepScheduler(solver_order=order)
    fast = accelerate(copy.deepcopy(scheduler))
    assert fast.fastdiff_report.counts["scheduler_step"] == 1
    for strength in (0.3, 0.5, 0.8, 1.0):
        before = fast.step.fused_calls
        expected, actual = img2img(unet, scheduler, strength), img2img(unet, fast, strength)
        assert fast.step.fused_calls - before == int(10 * strength) and fast.step.fallback_calls == 0
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-5, msg=f"strength {strength}")


@pytest.mark.parametrize(
    "config, reason",
    [
        (dict(predict_x0=False), "predict_x0=False"),
        (dict(solver_type="bh1"), "solver_type 'bh1' with final_sigmas 'zero'"),
        (dict(lower_order_final=False), "order 2 without lower_order_final"),
        (dict(thresholding=True), "thresholding"),
        (dict(use_exponential_sigmas=True), "use_exponential_sigmas"),
        (dict(use_karras_sigmas=True, sigma_max=10.0), "sigma_max"),
        (dict(prediction_type="flow_prediction", use_flow_sigmas=True), "prediction_type 'flow_prediction'"),
        (dict(solver_p=diffusers.DDIMScheduler()), "solver_p"),
    ],
)
def test_unfusable_settings_are_left_to_diffusers_by_name(config, reason):
    fast = accelerate(UniPCMultistepScheduler(**config))
    assert fast.fastdiff_report.counts["scheduler_step"] == 0
    assert [(path, reason in why) for path, why in fast.fastdiff_report.left_alone] == [("scheduler", True)]
    assert "step" not in vars(fast)  # diffusers' own step runs


def test_v_prediction_bh1_sigma_min_is_fused():
    config = dict(prediction_type="v_prediction", solver_type="bh1", final_sigmas_type="sigma_min", solver_order=3)
    torch.manual_seed(0)
    unet = tiny_diffusers_unet().eval()
    scheduler = UniPCMultistepScheduler(**config)
    fast = accelerate(copy.deepcopy(scheduler))
    torch.testing.assert_close(img2img(unet, fast, 1.0), img2img(unet, scheduler, 1.0), rtol=1e-5, atol=2e-5)
    assert fast.step.fused_calls == 10
