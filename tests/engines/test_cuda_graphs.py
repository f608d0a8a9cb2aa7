"""The CUDA-graph sampling loop (GPU only): a replayed graph gives what the eager fast path
gives for the same noise, a new shape is captured anew (and logged), seed mode draws its z in
the kernel, and nothing inside the loop synchronises with the host."""
import logging

import pytest
import torch

from fastdiff.commands.verify import psnr
from fastdiff.engines.cuda_graphs import CapturedStep, GraphKey
from fastdiff.models.unet import UNet, UNetConfig
from fastdiff.ops import reference
from fastdiff.sampling import ExternalNoise, draw_noise, sample_reference
from fastdiff.sampling.sampler import Sampler
from fastdiff.schedulers import ddim_table, ddpm_table, linear_schedule

pytestmark = pytest.mark.gpu

SHAPE = (2, 3, 16, 16)
TABLE = ddpm_table(linear_schedule(), steps=20, clip_sample=True)
#: GPU fp32 against the CPU reference: cuDNN and the Triton kernels order sums differently
#: (and the attention kernel's tl.dot may run in TF32), so not the CPU's 1e-4.
GPU_FP32 = dict(rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UNet(UNetConfig.tiny()).eval()  # on the CPU: samplers copy it to the GPU


def test_captured_step_advances_its_device_step_index():
    device = torch.device("cuda")
    table = torch.arange(5.0, device=device)

    def step(x, step_index, noise, rng, class_labels):
        return x + table.index_select(0, step_index.reshape(1)) + noise

    captured = CapturedStep(step, GraphKey(2, (1, 2, 2), torch.float32, False, "given"), device)
    z = torch.ones(5, 2, 1, 2, 2, device=device)
    out = captured.run(torch.zeros(2, 1, 2, 2, device=device), 5, z)
    assert torch.equal(out, torch.full_like(out, 0 + 1 + 2 + 3 + 4 + 5.0))
    assert captured.step_index.item() == 5


def test_graph_replay_equals_the_eager_fast_path(model):
    noise = draw_noise(TABLE, SHAPE, seed=0, device="cuda")
    graphs = Sampler(model, TABLE, device="cuda", compile=False, cuda_graphs=True)
    eager = Sampler(model, TABLE, device="cuda", compile=False, cuda_graphs=False)
    assert graphs.describe()["cuda_graphs"] and graphs.describe()["kernels"] == "triton"
    torch.testing.assert_close(graphs.sample(noise=noise), eager.sample(noise=noise), rtol=1e-5, atol=1e-5)


def test_compiled_graphs_match_the_reference(model):
    noise = draw_noise(TABLE, SHAPE, seed=1)
    sampler = Sampler(model, TABLE, device="cuda", autotune=False)
    info = sampler.describe()
    assert info["compiled"] and info["cuda_graphs"]
    expected = sample_reference(model, TABLE, noise=noise)
    torch.testing.assert_close(sampler.sample(noise=noise).cpu(), expected, **GPU_FP32)


def test_bf16_graphs_hold_30_db(model):
    table = ddpm_table(linear_schedule(), steps=50, clip_sample=True)
    noise = draw_noise(table, SHAPE, seed=2)
    sampler = Sampler(model, table, device="cuda", dtype=torch.bfloat16, autotune=False)
    assert psnr(sampler.sample(noise=noise).cpu(), sample_reference(model, table, noise=noise)) >= 30.0
    # The tiny model's attention has one head of D=64: FlashAttention-2 takes it (recorded at capture).
    assert sampler.describe()["attention"] == ["sdpa-flash (D=64, bfloat16)"]


def test_seed_mode_draws_philox_noise_in_the_kernel(model):
    sampler = Sampler(model, TABLE, device="cuda", compile=False)
    out = sampler.sample(batch=SHAPE[0], seed=7)
    # The same run on the CPU: x_T from the seeded CPU generator, each z Philox keyed by
    # (element, sample, offset 0, step) under key seed.
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    z = torch.stack([reference.philox_noise_like(x_T, 7, 0, i) for i in range(TABLE.num_steps)])
    expected = sample_reference(model, TABLE, noise=ExternalNoise(x_T, z))
    torch.testing.assert_close(out.cpu(), expected, **GPU_FP32)
    assert torch.equal(sampler.sample(batch=SHAPE[0], seed=7), out)  # replays are deterministic
    assert not torch.allclose(sampler.sample(batch=SHAPE[0], seed=8), out)  # a new seed reaches the kernel


def test_new_shape_is_captured_anew_and_logged(model, caplog):
    sampler = Sampler(model, ddim_table(linear_schedule(), steps=3, eta=1.0), device="cuda", compile=False)
    with caplog.at_level(logging.INFO, logger="fastdiff.engines.cuda_graphs"):
        two = sampler.sample(batch=2, seed=0)
        three = sampler.sample(batch=3, seed=0)
        again = sampler.sample(batch=2, seed=0)
    captures = [r.getMessage() for r in caplog.records if "capturing a CUDA graph" in r.getMessage()]
    assert len(captures) == 2 and "new shape" in captures[1] and "batch 3" in captures[1]
    assert [key.batch for key in sampler._steps.graphs.keys] == [2, 3]
    assert torch.equal(again, two)
    # x_T is drawn in order and z is keyed by sample index: sample i is the same in any batch.
    torch.testing.assert_close(three[:2], two, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager loop"])
def test_no_host_sync_inside_the_loop(model, cuda_graphs):
    sampler = Sampler(model, TABLE, device="cuda", compile=False, cuda_graphs=cuda_graphs)
    noise = draw_noise(TABLE, SHAPE, seed=0, device="cuda")
    sampler.warmup(SHAPE[0], external_noise=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler.sample(noise=noise)  # every input already on the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


def test_default_path_is_compiled_autotuned_and_captured(model):
    """The sampler as a user gets it on a GPU: compile="auto" (max-autotune), graphs "auto"."""
    noise = draw_noise(TABLE, SHAPE, seed=3)
    sampler = Sampler(model, TABLE, device="cuda")
    info = sampler.describe()
    assert info["compiled"] and info["cuda_graphs"] and info["kernels"] == "triton" and "max-autotune" in info["path"]
    out = sampler.sample(noise=noise)
    assert not sampler.notes  # nothing stepped back to a slower path
    torch.testing.assert_close(out.cpu(), sample_reference(model, TABLE, noise=noise), **GPU_FP32)


def test_fp16_end_to_end_holds_30_db(model):
    table = ddpm_table(linear_schedule(), steps=50, clip_sample=True)
    noise = draw_noise(table, SHAPE, seed=4)
    sampler = Sampler(model, table, device="cuda", dtype=torch.float16, autotune=False)
    out = sampler.sample(noise=noise)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and not sampler.notes
    assert psnr(out.cpu(), sample_reference(model, table, noise=noise)) >= 30.0


def test_diffusers_model_on_the_gpu():
    from helpers import tiny_diffusers_unet

    torch.manual_seed(0)
    unet = tiny_diffusers_unet().eval()
    noise = draw_noise(TABLE, (2, 3, 8, 8), seed=5)
    sampler = Sampler(unet, TABLE, device="cuda", autotune=False)
    assert sampler.report.counts and sampler.describe()["kernels"] == "triton"
    expected = sample_reference(lambda x, t: unet(x, t, return_dict=False)[0], TABLE, noise=noise)
    torch.testing.assert_close(sampler.sample(noise=noise).cpu(), expected, **GPU_FP32)


def test_fastdiff_verify_passes_on_the_gpu(capsys):
    from fastdiff.cli import main

    code = main(["verify", "--device", "cuda", "--steps", "100", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS" in out
