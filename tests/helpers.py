"""One tolerance table and one verbose comparison helper for every test."""
from __future__ import annotations

import pytest
import torch

#: (rtol, atol) per dtype for elementwise ops (torch.testing's defaults, stated explicitly).
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}

#: The three kernel dtypes as labelled parameters.
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]

#: Awkward shapes for the elementwise kernels (step, q-sample), whose BLOCK is 1024.
ELEMENTWISE_SHAPES = [
    pytest.param((3, 3, 7, 5), id="B3-3x7x5"),
    pytest.param((4, 1), id="one-element-per-sample"),
    pytest.param((2, 1100), id="two-blocks-ragged-tail"),  # 1100 = 1024 + 76
]

#: Absolute floor added to the FlashAttention 2x rule, so exact-zero reference errors pass.
ERROR_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, msg: str = ""):
    """assert_close with the table's (rtol, atol) for ``dtype`` (default: actual's dtype)."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol, equal_nan=True, msg=msg or None)


def max_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    return (actual.double() - truth.double()).abs().max().item() if actual.numel() else 0.0


def assert_within_2x_of_torch(kernel_out: torch.Tensor, torch_out: torch.Tensor, truth: torch.Tensor, what: str = ""):
    """FlashAttention's rule: kernel error vs the fp64 truth <= 2x PyTorch's error in the same
    low precision, plus a small floor for the dtype."""
    assert not torch.isnan(kernel_out).any() or torch.isnan(truth).any(), f"{what}: kernel produced NaN"
    kernel_err = max_error(kernel_out, truth)
    torch_err = max_error(torch_out, truth)
    bound = 2 * torch_err + ERROR_FLOOR[kernel_out.dtype]
    assert kernel_err <= bound, f"{what}: kernel error {kernel_err:.3e} > 2 x torch error {torch_err:.3e} + floor"


def ks_statistic_normal(z: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the empirical distribution of z and N(0, 1)."""
    z = z.double().flatten().sort().values
    n = z.numel()
    cdf = torch.special.ndtr(z)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    below = cdf - torch.arange(n, dtype=torch.float64) / n
    return max(above.max().item(), below.max().item())


def count_launches(monkeypatch, kernel_module, launcher_name: str) -> list:
    """Spy on a kernel launcher (ops import it at call time): returns the list of the first
    argument's shapes, one entry per launch."""
    calls = []
    launch = getattr(kernel_module, launcher_name)

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return launch(*args, **kwargs)

    monkeypatch.setattr(kernel_module, launcher_name, spy)
    return calls


def tiny_diffusers_unet(**overrides):
    """A diffusers UNet2DModel small enough for CPU tests: 8x8, one attention level. Skips the
    calling test where diffusers is absent (the GPU image)."""
    UNet2DModel = pytest.importorskip("diffusers").UNet2DModel

    kwargs = dict(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    )
    return UNet2DModel(**{**kwargs, **overrides})
