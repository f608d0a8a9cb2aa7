"""Device and precision plumbing of the fast path: every CUDA entry point runs under its
tensors' device, float32 is exact float32 for the reference and the fast path alike, and the
README's sampler example picks the GPU where there is one. The CPU tests check the plumbing;
the `gpu` tests (not run without a GPU) check it on the real thing."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fastdiff.ops import backend
from fastdiff.sampling import draw_noise, sample_reference
from fastdiff.schedulers import ddpm_table, linear_schedule

README = Path(__file__).resolve().parents[2] / "README.md"
TABLE = ddpm_table(linear_schedule(), steps=3, clip_sample=True)


def test_on_device_is_a_cuda_device_guard_only_for_cuda():
    guard = backend.on_device("cuda:1")
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(backend.on_device("cpu"), torch.cuda.device)


@pytest.fixture
def lax_fp32():
    """Start from TF32-allowing settings (cuDNN's default, a common user setting for matmuls)."""
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    yield
    torch.backends.cudnn.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])


class RecordsPrecision(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t):
        self.seen.append((torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()))
        return torch.zeros_like(x)


def test_reference_sampler_runs_in_exact_fp32_and_restores_settings(lax_fp32):
    model = RecordsPrecision()
    sample_reference(model, TABLE, noise=draw_noise(TABLE, (1, 1, 2, 2), seed=0))
    assert model.seen == [(False, "highest")] * TABLE.num_steps
    assert torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "high"


def test_exact_fp32_restores_settings_after_an_error(lax_fp32):
    with pytest.raises(RuntimeError), backend.exact_fp32():
        raise RuntimeError("boom")
    assert torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "high"


def _readme_sampler_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return next(b for b in blocks if "Sampler(" in b)  # the accelerated sampler's first example


def test_readme_sampler_example_uses_the_gpu_when_present(monkeypatch):
    """Run the README's Sampler example with a stand-in Sampler, on a machine that reports a GPU."""
    import fastdiff

    made = {}

    class StandIn:
        def __init__(self, model, **kwargs):
            made.update(kwargs)

        def warmup(self, batch):
            return 0.0

        def sample(self, batch, seed):
            return torch.zeros(batch)

        def describe(self):
            return {"path": "stand-in"}

    monkeypatch.setattr(fastdiff, "Sampler", StandIn)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    exec(compile(_readme_sampler_example(), "README.md", "exec"), {})
    assert torch.device(made["device"]).type == "cuda"


# ---------------------------------------------------------------- GPU only (not run here)


@pytest.mark.gpu
def test_ops_and_sampler_run_on_a_non_default_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from fastdiff import ops
    from fastdiff.models.unet import UNet, UNetConfig
    from fastdiff.sampling.sampler import Sampler

    torch.cuda.set_device(0)
    device = torch.device("cuda:1")
    x = torch.randn(2, 32, 8, 8, device=device)
    torch.testing.assert_close(ops.group_norm_silu(x, None, None, 8), ops.group_norm_silu(x.cpu(), None, None, 8).to(device),
                               rtol=1e-5, atol=1e-5)
    q = torch.randn(1, 2, 64, 32, device=device)
    torch.testing.assert_close(ops.attention(q, q, q).cpu(), ops.attention(q.cpu(), q.cpu(), q.cpu()), rtol=1e-5, atol=1e-5)
    index, coefs = torch.tensor(2, device=device), TABLE.coefs.to(device)
    x_prev, _ = ops.sampler_step(x, x, index, coefs, noise=x)
    x_prev_cpu, _ = ops.sampler_step(x.cpu(), x.cpu(), index.cpu(), coefs.cpu(), noise=x.cpu())
    torch.testing.assert_close(x_prev.cpu(), x_prev_cpu, rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny()).eval()
    noise = draw_noise(TABLE, (2, 3, 16, 16), seed=0)
    out = Sampler(model, TABLE, device=device, autotune=False).sample(noise=noise)
    assert out.device == device and torch.cuda.current_device() == 0
    torch.testing.assert_close(out.cpu(), sample_reference(model, TABLE, noise=noise), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_readme_sampler_example_runs_on_the_gpu():
    namespace = {}
    exec(compile(_readme_sampler_example(), "README.md", "exec"), namespace)
    assert namespace["sampler"].device.type == "cuda" and namespace["images"].is_cuda
