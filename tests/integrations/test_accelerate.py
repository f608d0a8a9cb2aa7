"""fastdiff.accelerate: what it replaces in fastdiff and diffusers models, pipelines and
schedulers, that the result computes the same thing through fastdiff.ops, and that it shares
(never copies) the caller's weights and leaves the caller's object as it was."""
import collections
import inspect

import pytest
import torch
import torch.nn as nn
from helpers import tiny_diffusers_unet

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from fastdiff import ops
from fastdiff.integrations.diffusers.accelerate import AccelerationReport, accelerate
from fastdiff.integrations.diffusers.modules import FusedAttnProcessor, FusedGroupNorm
from fastdiff.integrations.diffusers.schedulers import FusedSchedulerStep
from fastdiff.models.unet import GroupNormAct, UNet, UNetConfig

FP32 = dict(rtol=1e-4, atol=1e-4)  # the bar for an accelerated forward vs the original


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls of the public fastdiff ops, so a test sees that the swap took effect."""
    calls = collections.Counter()
    for name in ("group_norm_silu", "attention", "sampler_step"):
        real = getattr(ops, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, counting)
    return calls


def seeded(factory, seed=0):
    torch.manual_seed(seed)
    return factory().eval()


def cifar10_diffusers_unet():
    """google/ddpm-cifar10-32's architecture (random init): 35.7M parameters, one head of D=256."""
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, norm_eps=1e-6,
    )


def digits_diffusers_unet():
    """28x28, one channel, class-conditioned (10 classes), two attention levels of 8 heads."""
    return UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, num_class_embeds=10,
    )


def assert_shares_weights(fast: nn.Module, original: nn.Module):
    fast_tensors = dict(fast.state_dict(keep_vars=True))
    original_tensors = dict(original.state_dict(keep_vars=True))
    assert fast_tensors.keys() == original_tensors.keys()
    for name, tensor in original_tensors.items():
        assert fast_tensors[name].data_ptr() == tensor.data_ptr(), f"{name} was copied"


# ---------------------------------------------------------------- fastdiff's UNet


def test_fastdiff_unet_replacements_and_forward(op_calls):
    model = seeded(lambda: UNet(UNetConfig.tiny()))
    fast = accelerate(model)
    # 8 ResBlocks x 2 + norm_out fuse with SiLU; the 4 attention blocks' norms are lone.
    assert fast.fastdiff_report.counts == {"group_norm_silu": 17, "group_norm": 4, "attention": 4, "scheduler_step": 0}
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    with torch.no_grad():
        expected = model(x, t)
        assert op_calls["group_norm_silu"] == 0 and op_calls["attention"] == 0
        actual = fast(x, t)
    assert op_calls["group_norm_silu"] == 21 and op_calls["attention"] == 4
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert_shares_weights(fast, model)


def test_caller_model_is_untouched_unless_inplace():
    model = seeded(lambda: UNet(UNetConfig.tiny()))
    kinds = [type(m) for m in model.modules()]
    fast = accelerate(model)
    assert fast is not model and [type(m) for m in model.modules()] == kinds
    assert not any(isinstance(m, FusedGroupNorm) for m in model.modules())
    same = accelerate(model, inplace=True)
    assert same is model and any(isinstance(m, FusedGroupNorm) for m in model.modules())


def test_accelerating_twice_replaces_nothing_more():
    fast = accelerate(seeded(lambda: UNet(UNetConfig.tiny())))
    again = accelerate(fast)
    assert again.fastdiff_report.total == 0
    assert [type(m) for m in again.modules()] == [type(m) for m in fast.modules()]


def test_group_norm_act_keeps_its_silu_switch():
    model = UNet(UNetConfig.tiny())
    fast = accelerate(model)
    pairs = zip((m for m in model.modules() if isinstance(m, GroupNormAct)),
                (m for m in fast.modules() if isinstance(m, FusedGroupNorm)))
    assert all(norm.act == fused.act and norm.eps == fused.eps for norm, fused in pairs)


# ---------------------------------------------------------------- diffusers UNet2DModel


def test_diffusers_cifar10_unet_forward_matches(op_calls):
    model = seeded(cifar10_diffusers_unet)
    fast = accelerate(model)
    # 51 GroupNorms: 45 followed by SiLU (22 ResnetBlock2D x 2 + conv_norm_out), 6 in attention.
    assert fast.fastdiff_report.counts == {"group_norm_silu": 45, "group_norm": 6, "attention": 6, "scheduler_step": 0}
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([500])
    with torch.no_grad():
        expected = model(x, t).sample
        actual = fast(x, t).sample
    assert op_calls["group_norm_silu"] == 51 and op_calls["attention"] == 6
    torch.testing.assert_close(actual, expected, **FP32)
    assert_shares_weights(fast, model)


def test_diffusers_class_conditioned_unet_forward_matches(op_calls):
    model = seeded(digits_diffusers_unet)
    fast = accelerate(model)
    counts = fast.fastdiff_report.counts
    assert counts["attention"] == 2 + 1 + 4 and counts["group_norm"] == 7  # down, mid, up
    x, t, labels = torch.randn(2, 1, 28, 28), torch.tensor([10, 700]), torch.tensor([3, 7])
    with torch.no_grad():
        expected = model(x, t, class_labels=labels).sample
        actual = fast(x, t, class_labels=labels).sample
    assert op_calls["attention"] == 7
    torch.testing.assert_close(actual, expected, **FP32)
    assert_shares_weights(fast, model)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(resnet_time_scale_shift="scale_shift"), id="scale-shift resnets"),  # norm2 stays lone
        pytest.param(dict(act_fn="mish"), id="mish activation"),  # no SiLU: resnet norms lone, forward unchanged
    ],
)
def test_diffusers_resnet_variants_match(overrides):
    model = seeded(lambda: tiny_diffusers_unet(**overrides))
    fast = accelerate(model)
    counts = fast.fastdiff_report.counts
    if "act_fn" in overrides:
        assert counts["group_norm_silu"] == 1 and counts["group_norm"] > 0  # UNet2DModel's conv_act is always SiLU
    else:
        assert counts["group_norm"] > counts["attention"]  # lone norm2s besides the attention norms
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 999])
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t).sample, model(x, t).sample, **FP32)


def test_attention_processors():
    torch.manual_seed(0)
    classic = Attention(32, heads=2, dim_head=16, norm_num_groups=8, residual_connection=True,
                        processor=AttnProcessor())
    custom = Attention(32, heads=2, dim_head=16, processor=AttnProcessor2_0())
    custom.set_processor(lambda attn, hidden_states, *a, **k: hidden_states)  # a processor fastdiff does not know
    model = nn.ModuleDict({"classic": classic, "custom": custom}).eval()
    fast = accelerate(model)
    assert isinstance(fast["classic"].processor, FusedAttnProcessor)
    assert fast["custom"].processor is custom.processor
    assert [path for path, _ in fast.fastdiff_report.left_alone] == ["custom"]
    spatial, sequence = torch.randn(2, 32, 4, 4), torch.randn(2, 10, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast["classic"](spatial), classic(spatial), **FP32)
        torch.testing.assert_close(fast["classic"](sequence), classic(sequence), **FP32)  # the norm on (B, C, N)


def test_cross_attention_goes_to_diffusers_processor():
    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=24, heads=2, dim_head=16).eval()
    fast = accelerate(attn)
    x, context = torch.randn(2, 10, 32), torch.randn(2, 5, 24)
    with torch.no_grad():
        expected = attn(x, encoder_hidden_states=context)
        torch.testing.assert_close(fast(x, encoder_hidden_states=context), expected, **FP32)


def test_sequential_group_norm_silu_pair_is_fused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 8, 1), nn.GroupNorm(4, 8)).eval()
    fast = accelerate(model)
    assert fast.fastdiff_report.counts["group_norm_silu"] == 1 and fast.fastdiff_report.counts["group_norm"] == 1
    assert isinstance(fast[1], nn.Identity) and isinstance(model[1], nn.SiLU)
    x = torch.randn(2, 8, 5, 3)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_fused_group_norm_takes_any_rank():
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 8)
    nn.init.normal_(norm.weight)
    fused = FusedGroupNorm(norm, act=False)
    assert fused.weight is norm.weight and fused.bias is norm.bias
    x = torch.randn(3, 8, 10)
    torch.testing.assert_close(fused(x), norm(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- schedulers and pipelines


SCHEDULERS = [
    pytest.param(lambda: DDPMScheduler(variance_type="fixed_large", clip_sample=True), 1000, {}, id="ddpm-cifar10"),
    pytest.param(lambda: DDPMScheduler(), 10, {}, id="ddpm-fixed_small-10-steps"),
    pytest.param(lambda: DDPMScheduler(variance_type="fixed_small_log", clip_sample=False), 50, {}, id="ddpm-log"),
    pytest.param(lambda: DDIMScheduler(), 10, {"eta": 0.0}, id="ddim"),
    pytest.param(lambda: DDIMScheduler(set_alpha_to_one=False), 20, {"eta": 0.7}, id="ddim-eta"),
    pytest.param(DDIMScheduler, 10, {"eta": 1.0, "use_clipped_model_output": True}, id="ddim-clipped-eps"),
    pytest.param(lambda: DDPMScheduler(timestep_spacing="trailing"), 10, {}, id="ddpm-trailing"),
    pytest.param(lambda: DDPMScheduler(timestep_spacing="linspace"), 7, {}, id="ddpm-linspace"),
    pytest.param(lambda: DDPMScheduler(steps_offset=1), 10, {}, id="ddpm-offset"),
    pytest.param(lambda: DDIMScheduler(timestep_spacing="trailing"), 10, {"eta": 0.5}, id="ddim-trailing"),
    pytest.param(lambda: DDIMScheduler(timestep_spacing="linspace"), 7, {}, id="ddim-linspace"),
    pytest.param(lambda: DDIMScheduler(steps_offset=1, set_alpha_to_one=False), 10, {}, id="ddim-offset"),
]


@pytest.mark.parametrize("make, steps, kwargs", SCHEDULERS)
def test_scheduler_step_equals_diffusers(make, steps, kwargs, op_calls):
    original = make()
    fast = accelerate(original)
    assert isinstance(fast.step, FusedSchedulerStep) and fast.fastdiff_report.counts["scheduler_step"] == 1
    original.set_timesteps(steps)
    fast.set_timesteps(steps)
    torch.manual_seed(0)
    x, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    for t in (original.timesteps[0], original.timesteps[steps // 2], original.timesteps[-1]):
        expected = original.step(eps, t, x, generator=torch.Generator().manual_seed(1), **kwargs)
        actual = fast.step(eps, t, x, generator=torch.Generator().manual_seed(1), **kwargs)
        assert type(actual) is type(expected)
        torch.testing.assert_close(actual.prev_sample, expected.prev_sample, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(actual.pred_original_sample, expected.pred_original_sample, rtol=1e-5, atol=2e-5)
    assert op_calls["sampler_step"] == 3 and (fast.step.fused_calls, fast.step.fallback_calls) == (3, 0)
    as_tuple = fast.step(eps, original.timesteps[1], x, return_dict=False, **kwargs)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2


def test_ddim_step_with_given_variance_noise():
    original, fast = DDIMScheduler(), accelerate(DDIMScheduler())
    original.set_timesteps(10)
    fast.set_timesteps(10)
    x, eps, z = torch.randn(3, 2, 4, 4).unbind(0)
    expected = original.step(eps, 500, x, eta=0.5, variance_noise=z).prev_sample
    actual = fast.step(eps, 500, x, eta=0.5, variance_noise=z).prev_sample
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_timesteps_outside_the_table_fall_back_to_diffusers():
    original = DDPMScheduler()
    fast = accelerate(original)
    original.set_timesteps(timesteps=[900, 500, 17, 0])  # custom timesteps: no table covers them
    fast.set_timesteps(timesteps=[900, 500, 17, 0])
    x, eps = torch.randn(2, 1, 4, 4).unbind(0)
    t = original.timesteps[2]
    actual = fast.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.equal(actual, original.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample)
    assert (fast.step.fused_calls, fast.step.fallback_calls) == (0, 1)


@pytest.mark.parametrize(
    "scheduler, reason",
    [
        (DDPMScheduler(prediction_type="v_prediction"), "prediction_type"),
        (DDPMScheduler(variance_type="learned_range"), "variance_type"),
        (DDIMScheduler(thresholding=True), "thresholding"),
    ],
)
def test_unsupported_schedulers_are_left_alone(scheduler, reason):
    fast = accelerate(scheduler)
    assert "step" not in vars(fast)
    ((path, why),) = fast.fastdiff_report.left_alone
    assert path == "scheduler" and reason in why


@pytest.mark.parametrize(
    "pipeline_type, variance_type",
    # DDIMPipeline turns any scheduler into a DDIMScheduler: no variance type to vary there.
    [(DDPMPipeline, "fixed_large"), (DDPMPipeline, "fixed_small"), (DDIMPipeline, "fixed_small")],
)
def test_pipeline_output_matches(pipeline_type, variance_type):
    unet = seeded(tiny_diffusers_unet)
    pipe = pipeline_type(unet=unet, scheduler=DDPMScheduler(variance_type=variance_type, clip_sample=True))
    pipe.set_progress_bar_config(disable=True)
    fast = accelerate(pipe)
    assert type(fast) is pipeline_type and fast.unet is not pipe.unet and fast.scheduler is not pipe.scheduler
    assert fast.fastdiff_report.counts["scheduler_step"] == 1 and fast.fastdiff_report.counts["attention"] == 1 + 1 + 2
    assert_shares_weights(fast.unet, pipe.unet)
    kwargs = dict(batch_size=2, num_inference_steps=10, output_type="np")
    if pipeline_type is DDIMPipeline:
        kwargs["eta"] = 0.5
    expected = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    actual = fast(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(actual - expected).max() < 1e-4


# ---------------------------------------------------------------- DPM-Solver++ and unfusable schedulers


def _pipe(scheduler):
    pipe = DDPMPipeline(unet=seeded(tiny_diffusers_unet), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "config, steps",
    [
        (dict(solver_order=2), 6),
        (dict(solver_order=3, algorithm_type="sde-dpmsolver++", timestep_spacing="trailing"), 7),
        (dict(solver_order=2, use_karras_sigmas=True, prediction_type="v_prediction"), 5),
    ],
)
def test_dpmsolver_pipeline_is_fused_and_matches(config, steps, op_calls):
    pipe = _pipe(diffusers.DPMSolverMultistepScheduler(**config))
    fast = accelerate(pipe)
    assert fast.fastdiff_report.counts["scheduler_step"] == 1 and not fast.fastdiff_report.left_alone
    kwargs = dict(batch_size=2, num_inference_steps=steps, output_type="np")
    expected = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    for _ in range(2):  # the second run starts from a zeroed history
        before = op_calls["sampler_step"]
        actual = fast(generator=torch.Generator().manual_seed(0), **kwargs).images
        assert op_calls["sampler_step"] - before == steps
        assert abs(actual - expected).max() < 1e-4


def test_dpmsolver_with_fewer_steps_than_its_order_is_fused(op_calls):
    """diffusers lowers the order (its lower_order_nums rule): the table follows it."""
    pipe = _pipe(diffusers.DPMSolverMultistepScheduler(solver_order=3))
    fast = accelerate(pipe)
    kwargs = dict(batch_size=1, num_inference_steps=2, output_type="np")
    expected = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(fast(generator=torch.Generator().manual_seed(0), **kwargs).images - expected).max() < 1e-4
    assert op_calls["sampler_step"] == 2 and fast.scheduler.step.fallback_calls == 0


@pytest.mark.parametrize(
    "scheduler, reason",
    [
        (diffusers.DPMSolverMultistepScheduler(thresholding=True), "thresholding"),
        (diffusers.DPMSolverMultistepScheduler(use_lu_lambdas=True), "use_lu_lambdas"),
        (diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
         "algorithm_type 'dpmsolver'"),
        (diffusers.EulerDiscreteScheduler(prediction_type="original_sample"), "prediction_type 'original_sample'"),
        (diffusers.UniPCMultistepScheduler(predict_x0=False), "predict_x0=False"),
    ],
)
def test_unfusable_pipeline_schedulers_are_left_alone_and_still_work(scheduler, reason, op_calls):
    pipe = _pipe(scheduler)
    fast = accelerate(pipe)
    assert fast.fastdiff_report.counts["scheduler_step"] == 0
    assert [(path, reason in why) for path, why in fast.fastdiff_report.left_alone] == [("scheduler", True)]
    assert "left alone: scheduler" in str(fast.fastdiff_report)
    assert "step" not in vars(fast.scheduler)  # the class's own step, unchanged
    if "generator" not in inspect.signature(scheduler.step).parameters:
        return  # DDPMPipeline passes a generator: this scheduler cannot run in it, fused or not
    kwargs = dict(batch_size=1, num_inference_steps=3, output_type="np")
    expected = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    actual = fast(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(actual - expected).max() < 1e-4  # the unet is fused; the scheduler is diffusers' own
    assert op_calls["sampler_step"] == 0


# ---------------------------------------------------------------- bad input and reports


@pytest.mark.parametrize("obj", ["unet", 3, DDPMScheduler, diffusers.PNDMScheduler()])
def test_bad_input_lists_what_is_accepted(obj):
    accepted = "accepts a torch.nn.Module .* DPMSolverMultistepScheduler, EulerDiscreteScheduler.*UniPCMultistepScheduler.* pipeline"
    with pytest.raises(TypeError, match=accepted):
        accelerate(obj)


def test_report_summary():
    report = AccelerationReport(replaced=[("a", "attention"), ("b", "group_norm")], left_alone=[("c", "why")])
    assert report.total == 2 and report.counts["attention"] == 1
    assert str(report) == "fastdiff.accelerate replaced 1 group_norm, 1 attention\n  left alone: c: why"


# ---------------------------------------------------------------- through the Triton kernels


def test_accelerated_models_run_the_interpreted_kernels(interpreted, monkeypatch):
    import fastdiff.kernels.attention
    import fastdiff.kernels.group_norm

    launches = collections.Counter()
    for module, name in ((fastdiff.kernels.group_norm, "group_norm_silu"), (fastdiff.kernels.attention, "attention")):
        real = getattr(module, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            launches[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)

    torch.manual_seed(0)
    native = UNet(UNetConfig(image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                             num_groups=4, dropout=0.0)).eval()
    wrapped = tiny_diffusers_unet(block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=16,
                                  sample_size=4).eval()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([250])
    with torch.no_grad():
        torch.testing.assert_close(accelerate(native)(x, t), native(x, t), **FP32)
        assert launches == {"group_norm_silu": 21, "attention": 4}
        x = x[..., :4, :4]
        torch.testing.assert_close(accelerate(wrapped)(x, t).sample, wrapped(x, t).sample, **FP32)
    assert launches == {"group_norm_silu": 21 + 21, "attention": 4 + 1 + 1 + 2}


# ---------------------------------------------------------------- the public name, saving


def test_package_accelerate_is_the_function_whatever_was_imported():
    import fastdiff.sampling.sampler  # noqa: F401  (imports the acceleration module, as any user code may)
    from fastdiff import accelerate as public

    assert public is accelerate


def test_readme_accelerate_example_runs(capsys):
    import textwrap
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = [b.split("```")[0] for b in readme.split("```python\n")[1:] if "fast = accelerate(model)" in b]
    assert len(blocks) == 1, "the README's accelerate() example is missing"
    exec(compile(textwrap.dedent(blocks[0]), "README.md", "exec"), {})
    assert capsys.readouterr().out.startswith("fastdiff.accelerate replaced ")


@pytest.mark.parametrize(
    "make", [tiny_diffusers_unet, lambda: UNet(UNetConfig.tiny(image_size=8))], ids=["diffusers", "fastdiff"]
)
def test_torch_save_and_load_an_accelerated_unet(make, tmp_path):
    fast = accelerate(seeded(make))
    torch.save(fast, tmp_path / "unet.pt")
    loaded = torch.load(tmp_path / "unet.pt", weights_only=False)
    assert type(loaded) is type(fast) and loaded.fastdiff_report.replaced == fast.fastdiff_report.replaced
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    kwargs = {"return_dict": False} if isinstance(fast, UNet2DModel) else {}
    with torch.no_grad():
        assert torch.equal(torch.as_tensor(loaded(x, t, **kwargs)[0]), torch.as_tensor(fast(x, t, **kwargs)[0]))
