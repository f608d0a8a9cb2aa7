"""``fastdiff::group_norm_silu``: GroupNorm over (C/G, H, W) per (sample, group), optional affine,
optional SiLU, in the input's dtype and memory format (NCHW or channels_last)."""
from __future__ import annotations

import torch

from fastdiff import backend, reference
from fastdiff.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when channels are x's innermost dimension (even if sliced), else NCHW."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last) or x.stride(1) < x.stride(3):
        return torch.channels_last
    return torch.contiguous_format


def _reference(x, weight, bias, num_groups, eps, apply_silu) -> torch.Tensor:
    y = reference.group_norm_silu(x, weight, bias, num_groups, eps, apply_silu)
    return y.contiguous(memory_format=output_memory_format(x))


@torch.library.custom_op("fastdiff::group_norm_silu", mutates_args=())
def _group_norm_silu_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    apply_silu: bool,
) -> torch.Tensor:
    if backend.kernel_path(x.device) == "reference":
        return _reference(x, weight, bias, num_groups, eps, apply_silu)
    from fastdiff.kernels.group_norm import group_norm_silu as launch

    x = x.contiguous(memory_format=output_memory_format(x))
    with backend.on_device(x.device):
        return launch(x, weight, bias, num_groups, eps, apply_silu)


@_group_norm_silu_op.register_fake
def _(x, weight, bias, num_groups, eps, apply_silu):
    return torch.empty_like(x, memory_format=output_memory_format(x))


def _check_args(x, weight, bias, num_groups) -> None:
    check_tensor("x", x, rank=4)
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        check_tensor(name, param, dtypes=FLOAT_DTYPES, rank=1)
        if param.dtype not in (x.dtype, torch.float32):  # what PyTorch's GroupNorm takes, on every route
            raise TypeError(f"{name} must have x's dtype ({x.dtype}) or float32, got {param.dtype}")
        if param.shape[0] != x.shape[1]:
            raise ValueError(f"{name} must have shape ({x.shape[1]},) to match x's channels, got {tuple(param.shape)}")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"bias has dtype {bias.dtype} but weight has {weight.dtype}")
    check_same_device("x", x, weight=weight, bias=bias)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    if num_groups < 1 or x.shape[1] % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must be >= 1 and divide the channel count C={x.shape[1]}")


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float = 1e-5,
    apply_silu: bool = True,
) -> torch.Tensor:
    """GroupNorm (+ SiLU) of an (N, C, H, W) tensor; statistics in fp32, result in x's dtype and layout.

    The same answer on every route (eager reference, compiled, Triton kernel) for the edge cases:
    weight/bias must have x's dtype or float32 (PyTorch's rule; TypeError otherwise); NaN in a
    group propagates to that group; a group whose fp32 sum of squared deviations overflows
    (|x - mean| from about 1e19) comes out NaN rather than a constant.
    """
    _check_args(x, weight, bias, num_groups)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=output_memory_format(x))
    if backend.kernel_path(x.device) == "reference":
        return _reference(x, weight, bias, num_groups, eps, apply_silu)  # plain torch: inductor can fuse it
    return torch.ops.fastdiff.group_norm_silu(x, weight, bias, num_groups, float(eps), bool(apply_silu))
