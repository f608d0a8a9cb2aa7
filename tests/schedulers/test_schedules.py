"""Schedules and step tables vs the closed forms (Ho et al., Nichol & Dhariwal, Song et al.)
and vs diffusers' DDPMScheduler / DDIMScheduler, down to full sampling loops."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, assert_within_2x_of_torch

from fastdiff.commands.verify import fp64_trajectory
from fastdiff.models.unet import UNet, UNetConfig
from fastdiff.ops import reference
from fastdiff.sampling import draw_noise, sample_reference
from fastdiff.schedulers import (
    STEP_COLUMNS,
    cosine_schedule,
    ddim_table,
    ddpm_table,
    linear_schedule,
    make_schedule,
    step_table,
)

# where diffusers is absent (the GPU image) the module skips rather than failing pytest's collection
pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler

T = 1000
LOOP_STEPS = 10
LOOP_SHAPE = (2, 3, 8, 8)


@pytest.fixture(scope="module")
def linear():
    return linear_schedule()


# ---------------------------------------------------------------- closed forms


def test_linear_betas_are_ho_et_al(linear):
    assert linear.num_timesteps == T
    expected = torch.tensor([1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)], dtype=torch.float64)
    # built in float32 (as diffusers does), so equal to float32 precision
    torch.testing.assert_close(linear.betas, expected, rtol=1e-6, atol=0)
    assert linear.betas.dtype == torch.float64


def test_alphas_cumprod_and_posterior_closed_forms(linear):
    betas = linear.betas.tolist()
    abar, running = [], 1.0
    for beta in betas:
        running *= 1.0 - beta
        abar.append(running)
    abar_prev = [1.0] + abar[:-1]
    torch.testing.assert_close(linear.alphas, torch.tensor([1 - b for b in betas], dtype=torch.float64))
    torch.testing.assert_close(linear.alphas_cumprod, torch.tensor(abar, dtype=torch.float64), rtol=1e-12, atol=0)
    beta_tilde = [(1 - ap) / (1 - a) * b for a, ap, b in zip(abar, abar_prev, betas)]
    torch.testing.assert_close(linear.posterior_variance, torch.tensor(beta_tilde, dtype=torch.float64))
    assert linear.posterior_variance[0] == 0.0  # beta_tilde_1 = 0: x_0 given x_1 and x_0 is certain
    coef_x0, coef_xt = linear.posterior_mean_coefs
    for t in (0, 1, 499, 998, 999):
        assert coef_x0[t].item() == pytest.approx(math.sqrt(abar_prev[t]) * betas[t] / (1 - abar[t]), rel=1e-12)
        expected_xt = math.sqrt(1 - betas[t]) * (1 - abar_prev[t]) / (1 - abar[t])
        assert coef_xt[t].item() == pytest.approx(expected_xt, rel=1e-12)


def test_q_sample_table(linear):
    table = linear.q_sample_table()
    assert table.shape == (T, 2) and table.dtype == torch.float32
    torch.testing.assert_close(table[:, 0] ** 2 + table[:, 1] ** 2, torch.ones(T), rtol=0, atol=1e-6)
    torch.testing.assert_close(table[:, 0].double(), linear.alphas_cumprod.sqrt(), rtol=1e-7, atol=0)


def test_cosine_schedule_sanity():
    cosine = cosine_schedule()
    s = 0.008

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    abar = cosine.alphas_cumprod
    assert (abar[1:] < abar[:-1]).all(), "alphas_cumprod must decrease"
    assert (cosine.betas > 0).all() and (cosine.betas <= 0.999).all()
    uncapped = cosine.betas < 0.999
    expected = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    first_capped = int((~uncapped).nonzero()[0]) if (~uncapped).any() else T
    torch.testing.assert_close(abar[:first_capped], expected[:first_capped], rtol=1e-9, atol=1e-12)
    assert abar[0] > 0.9999 and abar[-1] < 1e-4


@pytest.mark.parametrize("bad", [("unknown", 1000), ("linear", 1), ("cosine", 0), ("linear", 10.0)])
def test_bad_schedule_arguments(bad):
    with pytest.raises(ValueError, match="schedule|num_timesteps"):
        make_schedule(*bad)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s: step_table(s, "heun"), "sampler"),
        (lambda s: step_table(s, "ddim", steps=0), "steps"),
        (lambda s: step_table(s, "ddpm", steps=T + 1), "steps"),
        (lambda s: step_table(s, "ddim", eta=-0.1), "eta"),
        (lambda s: ddpm_table(s, variance="learned"), "variance"),
        (lambda s: ddpm_table(s, form="other"), "form"),
    ],
    ids=["unknown sampler", "steps 0", "steps > T", "negative eta", "unknown variance", "unknown form"],
)
def test_bad_table_arguments(linear, call, match):
    with pytest.raises(ValueError, match=match):
        call(linear)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_ddpm_ho_table_is_algorithm_2(linear, variance):
    """x_{t-1} = (x_t - beta/sqrt(1-abar) eps)/sqrt(alpha) + sigma z, sigma = 0 at the last step."""
    table = ddpm_table(linear, variance=variance)
    assert table.coefs.shape == (T, len(STEP_COLUMNS)) and table.coefs.dtype == torch.float32
    assert table.clip is None
    torch.testing.assert_close(table.timesteps, torch.arange(T - 1, -1, -1))
    gen = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    betas, abar = linear.betas, linear.alphas_cumprod
    sigma2 = betas if variance == "fixed_large" else linear.posterior_variance
    for i in (0, 1, 500, T - 2, T - 1):
        t = int(table.timesteps[i])
        expected = (x - betas[t] / (1 - abar[t]).sqrt() * eps) / (1 - betas[t]).sqrt()
        if t > 0:
            expected = expected + sigma2[t].sqrt() * z
        out, _ = reference.sampler_step(x.float(), eps.float(), torch.tensor(i), table.coefs, noise=z.float())
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert table.coefs[-1, 5] == 0


def test_ho_and_diffusers_forms_agree_without_clipping(linear):
    """Algorithm 2's eps form and the predict-x0 posterior form are the same math."""
    gen = torch.Generator().manual_seed(1)
    x, eps, z = (torch.randn(3, 3, 8, 8, generator=gen) for _ in range(3))
    for steps in (T, 10):
        ho = ddpm_table(linear, steps=steps, form="ho")
        posterior = ddpm_table(linear, steps=steps, form="diffusers", clip_sample=False)
        assert ho.clip is None and posterior.clip is None
        torch.testing.assert_close(ho.coefs[:, 5], posterior.coefs[:, 5], rtol=0, atol=0)
        for i in range(steps):
            a, _ = reference.sampler_step(x, eps, torch.tensor(i), ho.coefs, noise=z)
            b, _ = reference.sampler_step(x, eps, torch.tensor(i), posterior.coefs, noise=z)
            assert_close(a, b, msg=f"steps={steps}, step {i}")


# ---------------------------------------------------------------- vs diffusers


def test_alphas_cumprod_match_diffusers(linear):
    linear_ref = DDPMScheduler(num_train_timesteps=T)
    assert torch.equal(linear.betas.float(), linear_ref.betas)
    # diffusers takes the cumulative product in float32, fastdiff in float64
    torch.testing.assert_close(linear.alphas_cumprod.float(), linear_ref.alphas_cumprod, rtol=2e-6, atol=0)
    cosine_ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(cosine_schedule().betas.float(), cosine_ref.betas, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cosine_schedule().alphas_cumprod.float(), cosine_ref.alphas_cumprod, rtol=5e-5, atol=0)


@pytest.mark.parametrize("steps", [10, 50, 1000])
def test_timesteps_match_diffusers(linear, steps):
    ddpm, ddim = DDPMScheduler(num_train_timesteps=T), DDIMScheduler(num_train_timesteps=T)
    ddpm.set_timesteps(steps)
    ddim.set_timesteps(steps)
    assert torch.equal(ddpm_table(linear, steps=steps).timesteps, ddpm.timesteps)
    assert torch.equal(ddim_table(linear, steps=steps).timesteps, ddim.timesteps)


SPACINGS = [("leading", 0), ("leading", 1), ("linspace", 0), ("trailing", 0)]


@pytest.mark.parametrize("spacing, offset", SPACINGS)
@pytest.mark.parametrize("steps", [7, 10, 50, 1000])
def test_spaced_timesteps_match_diffusers(linear, spacing, offset, steps):
    config = dict(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    ddpm, ddim = DDPMScheduler(**config), DDIMScheduler(**config)
    ddpm.set_timesteps(steps)
    ddim.set_timesteps(steps)
    if steps == T and offset:  # diffusers would index alphas_cumprod[T]; fastdiff refuses it
        with pytest.raises(ValueError, match="steps_offset"):
            ddpm_table(linear, steps=steps, spacing=spacing, steps_offset=offset)
        return
    assert torch.equal(ddpm_table(linear, steps=steps, spacing=spacing, steps_offset=offset).timesteps, ddpm.timesteps)
    assert torch.equal(ddim_table(linear, steps=steps, spacing=spacing, steps_offset=offset).timesteps, ddim.timesteps)


@pytest.fixture(scope="module")
def eps_model():
    """A small random fastdiff UNet: a realistic, nonlinear eps(x, t)."""
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny(image_size=LOOP_SHAPE[-1])).eval()
    return model


class FedNoise:
    """Stands in for diffusers' ``randn_tensor`` in ``DDPMScheduler.step``, which takes no noise
    argument: it returns the z the test loop set for the current step."""

    def __init__(self):
        self.next = None

    def __call__(self, shape, generator=None, device=None, dtype=None, **_):
        assert self.next is not None and tuple(self.next.shape) == tuple(shape)
        return self.next.to(device=device, dtype=dtype)


@pytest.fixture
def fed_noise(monkeypatch):
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    feeder = FedNoise()
    monkeypatch.setattr(ddpm_module, "randn_tensor", feeder)
    return feeder


def _diffusers_loop(scheduler, model, noise, fed_noise=None, **step_kwargs):
    """x_T -> x_0 with ``scheduler.step``, giving it noise.z[i] at step i (through ``fed_noise``
    for DDPM, as ``variance_noise`` for DDIM)."""
    scheduler.set_timesteps(LOOP_STEPS)
    x = noise.x_T.clone()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            eps = model(x, t.expand(x.shape[0]))
            if fed_noise is None:
                step_kwargs["variance_noise"] = noise.z[i]
            else:
                fed_noise.next = noise.z[i]
            x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize(
    "variance, clip", [("fixed_large", True), ("fixed_small", True), ("fixed_small", False)],
    ids=["fixed_large+clip", "fixed_small+clip", "fixed_small"],
)
def test_ddpm_loop_matches_diffusers(linear, eps_model, fed_noise, variance, clip):
    table = ddpm_table(linear, steps=LOOP_STEPS, variance=variance, form="diffusers", clip_sample=clip)
    noise = draw_noise(table, LOOP_SHAPE, seed=3)
    ours = sample_reference(eps_model, table, noise=noise)
    scheduler = DDPMScheduler(num_train_timesteps=T, variance_type=variance, clip_sample=clip)
    theirs = _diffusers_loop(scheduler, eps_model, noise, fed_noise=fed_noise)
    assert_close(ours, theirs)
    assert not torch.equal(ours, noise.x_T)


@pytest.mark.parametrize("spacing, offset", SPACINGS[1:])
def test_spaced_loops_match_diffusers(linear, eps_model, fed_noise, spacing, offset):
    """Other spacings and steps_offset: the last step may start at t > 0 (DDPM still draws z
    there) and DDIM steps to t - T // steps whatever the spacing. Trailing starts at t = 999,
    where 1/sqrt(abar) ~ 150 amplifies float32 rounding: both are held to the float64 truth
    by the 2x rule."""
    spaced = dict(spacing=spacing, steps_offset=offset)
    config = dict(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    table = ddpm_table(linear, steps=LOOP_STEPS, variance="fixed_small", form="diffusers", **spaced)
    noise = draw_noise(table, LOOP_SHAPE, seed=3)
    theirs = _diffusers_loop(DDPMScheduler(**config), eps_model, noise, fed_noise=fed_noise)
    ours = sample_reference(eps_model, table, noise=noise)
    assert_within_2x_of_torch(ours, theirs, fp64_trajectory(eps_model, table, noise), "ddpm")
    table = ddim_table(linear, steps=LOOP_STEPS, eta=0.5, set_alpha_to_one=False, **spaced)
    scheduler = DDIMScheduler(set_alpha_to_one=False, clip_sample=False, **config)
    theirs = _diffusers_loop(scheduler, eps_model, noise, eta=0.5)
    ours = sample_reference(eps_model, table, noise=noise)
    assert_within_2x_of_torch(ours, theirs, fp64_trajectory(eps_model, table, noise), "ddim")


@pytest.mark.parametrize(
    "eta, clip, use_clipped", [(0.0, False, False), (0.5, False, False), (0.5, True, True)],
    ids=["eta0", "eta0.5", "eta0.5+clip+clipped-eps"],
)
def test_ddim_loop_matches_diffusers(linear, eps_model, eta, clip, use_clipped):
    table = ddim_table(linear, steps=LOOP_STEPS, eta=eta, clip_sample=clip, use_clipped_model_output=use_clipped)
    noise = draw_noise(table, LOOP_SHAPE, seed=4)
    ours = sample_reference(eps_model, table, noise=noise)
    scheduler = DDIMScheduler(num_train_timesteps=T, clip_sample=clip, set_alpha_to_one=True)
    theirs = _diffusers_loop(scheduler, eps_model, noise, eta=eta, use_clipped_model_output=use_clipped)
    assert_close(ours, theirs)


def test_noise_enters_the_loops(linear):
    """Guards the loop tests above: z must change DDPM and eta > 0 DDIM samples, not eta = 0 DDIM."""

    def eps_model(x, t):
        return 0.1 * x

    noise = draw_noise(ddim_table(linear, steps=LOOP_STEPS), LOOP_SHAPE, seed=4)
    silent = type(noise)(noise.x_T, torch.zeros_like(noise.z))
    for table, noise_matters in [
        (ddim_table(linear, steps=LOOP_STEPS, eta=0.0), False),
        (ddim_table(linear, steps=LOOP_STEPS, eta=0.5), True),
        (ddpm_table(linear, steps=LOOP_STEPS, form="diffusers"), True),
    ]:
        difference = sample_reference(eps_model, table, noise=noise) - sample_reference(eps_model, table, noise=silent)
        assert (difference.abs().max() > 1e-2) == noise_matters, table.method
