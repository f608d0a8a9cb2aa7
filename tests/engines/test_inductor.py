"""fastdiff.engines.inductor: the accelerated UNet and the whole sampling step trace as one graph, and
the inductor settings (freezing) apply to fastdiff's compile only."""
import pytest
import torch
from helpers import assert_within_2x_of_torch, tiny_diffusers_unet
from torch._inductor.utils import run_and_get_code

from fastdiff.engines.inductor import compile_for, inductor_options
from fastdiff.integrations.diffusers.accelerate import accelerate
from fastdiff.models.unet import UNet, UNetConfig
from fastdiff.sampling.step import DenoiseStep, DiffusersEps
from fastdiff.schedulers import ddpm_table, linear_schedule

TABLE = ddpm_table(linear_schedule(), steps=20, clip_sample=True)


def tiny_unet():
    torch.manual_seed(0)
    return UNet(UNetConfig.tiny()).eval()


def test_inductor_options_per_device():
    assert inductor_options("cpu") == {"freezing": True}
    cuda = inductor_options("cuda")
    assert cuda["freezing"] and cuda["max_autotune"] and cuda["triton.cudagraphs"] is False  # graphs are ours
    quick = inductor_options(torch.device("cuda", 0), autotune=False)
    assert quick["freezing"] and "max_autotune" not in quick and quick["triton.cudagraphs"] is False
    inductor_options("cpu")["freezing"] = False  # a fresh dict each time: callers cannot change the defaults
    assert inductor_options("cpu") == {"freezing": True}


def test_accelerated_unet_and_step_have_no_graph_breaks():
    model = accelerate(tiny_unet())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 999])
    explained = torch._dynamo.explain(model)(x, t)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    step = DenoiseStep(model, TABLE, torch.float32, channels_last=False)
    explained = torch._dynamo.explain(step)(x, torch.tensor(3), torch.randn_like(x))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_accelerated_diffusers_unet_has_no_graph_breaks():
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = tiny_diffusers_unet(num_class_embeds=10).eval()
    model = accelerate(DiffusersEps(unet))
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 8, 8), torch.tensor([5, 6]), torch.tensor([1, 2]))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_bf16_step_matches_eager_is_frozen_and_leaves_config_alone():
    fp32_model = accelerate(tiny_unet())
    model = accelerate(tiny_unet()).to(torch.bfloat16, memory_format=torch.channels_last)
    step = DenoiseStep(model, TABLE, torch.bfloat16, channels_last=True)
    compiled = compile_for(step, "cpu")
    x, index, z = torch.randn(2, 3, 16, 16), torch.tensor(4), torch.randn(2, 3, 16, 16)
    freezing_before = torch._inductor.config.freezing
    with torch.no_grad():
        truth = DenoiseStep(fp32_model, TABLE, torch.float32, channels_last=False)(x, index, z)
        eager = step(x, index, z)
        actual, code = run_and_get_code(compiled, x, index, z)
    assert actual.dtype == torch.float32  # x_t stays float32; only the model runs in bf16
    assert_within_2x_of_torch(actual, eager, truth, "compiled bf16 step")
    # Frozen: the weights are constants of the generated code, not inputs of it.
    assert "_frozen_param" in "".join(code)
    assert torch._inductor.config.freezing == freezing_before  # a per-call patch, not a global setting
