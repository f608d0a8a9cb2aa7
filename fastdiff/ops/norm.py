"""``fastdiff::group_norm_silu``: GroupNorm over (C/G, H, W) per (sample, group), optional affine,
optional SiLU, in the input's dtype and memory format (NCHW or channels_last). Differentiable:
where an input requires grad the training op runs, whose backward is a Triton kernel too."""
from __future__ import annotations

import torch

from fastdiff.ops import backend, reference
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


# flexible_layout: inductor hands over x in the layout it has (channels_last next to channels_last
# convolutions) instead of copying it to its eager strides; the output follows x's layout.
@torch.library.custom_op("fastdiff::group_norm_silu", mutates_args=(), tags=(torch.Tag.flexible_layout,))
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
    return _kernel(x, weight, bias, num_groups, eps, apply_silu)


def _kernel(x, weight, bias, num_groups, eps, apply_silu, stats=None) -> torch.Tensor:
    """The Triton forward on x in its output layout, under x's device (``stats``: see the launcher)."""
    # the kernels need triton, which is optional: imported when a kernel runs
    from fastdiff.kernels.group_norm import group_norm_silu as launch

    x = x.contiguous(memory_format=output_memory_format(x))
    with backend.on_device(x.device):
        return launch(x, weight, bias, num_groups, eps, apply_silu, stats=stats)


@_group_norm_silu_op.register_fake
def _(x, weight, bias, num_groups, eps, apply_silu):
    return torch.empty_like(x, memory_format=output_memory_format(x))


# ---------------------------------------------------------------- training: autograd
# Where an input needs a gradient, the wrapper below calls ``group_norm_silu_train``, which also
# returns each group's statistics [mean of x - pivot, rstd] (pivot: the group's first element, as
# in the kernel) for the backward op: the Triton backward kernel recomputes x-hat from them.


def _group_stats(x, num_groups, eps) -> torch.Tensor:
    """(N * G, 2) float32 [mean of x - pivot, rstd], as the forward kernel stores them."""
    groups = x.float().reshape(x.shape[0], num_groups, -1)
    shifted = groups - groups[:, :, :1]
    mean = shifted.mean(-1)
    rstd = torch.rsqrt((shifted - mean[..., None]).pow(2).mean(-1) + eps)
    return torch.stack([mean, rstd], -1).reshape(-1, 2)


@torch.library.custom_op("fastdiff::group_norm_silu_train", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _group_norm_silu_train_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    apply_silu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.numel() == 0:
        stats = torch.zeros((x.shape[0] * num_groups, 2), dtype=torch.float32, device=x.device)
        return _reference(x, weight, bias, num_groups, eps, apply_silu), stats
    if backend.kernel_path(x.device) == "reference":
        return _reference(x, weight, bias, num_groups, eps, apply_silu), _group_stats(x, num_groups, eps)
    stats = torch.empty((x.shape[0] * num_groups, 2), dtype=torch.float32, device=x.device)
    return _kernel(x, weight, bias, num_groups, eps, apply_silu, stats=stats), stats


@_group_norm_silu_train_op.register_fake
def _(x, weight, bias, num_groups, eps, apply_silu):
    stats = x.new_empty((x.shape[0] * num_groups, 2), dtype=torch.float32)
    return torch.empty_like(x, memory_format=output_memory_format(x)), stats


@torch.library.custom_op("fastdiff::group_norm_silu_backward", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _group_norm_silu_backward_op(
    x: torch.Tensor,
    grad: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: torch.Tensor,
    num_groups: int,
    eps: float,
    apply_silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); dweight/dbias are zeros of shape (C,) when there is no weight/bias."""
    if backend.kernel_path(x.device) == "reference" or x.numel() == 0:
        dx, dweight, dbias = _reference_backward(x, grad, weight, bias, num_groups, eps, apply_silu)
    else:
        # the kernels need triton, which is optional: imported when a kernel runs
        from fastdiff.kernels.group_norm import group_norm_silu_backward as launch

        with backend.on_device(x.device):
            dx, dweight, dbias = launch(x, grad, weight, bias, stats, num_groups, apply_silu)
    dx = dx.contiguous(memory_format=output_memory_format(x))
    return dx, _grad_or_zeros(dweight, x), _grad_or_zeros(dbias, x)


@_group_norm_silu_backward_op.register_fake
def _(x, grad, weight, bias, stats, num_groups, eps, apply_silu):
    channels = x.shape[1]
    return (torch.empty_like(x, memory_format=output_memory_format(x)),
            x.new_empty(channels, dtype=weight.dtype if weight is not None else x.dtype),
            x.new_empty(channels, dtype=bias.dtype if bias is not None else x.dtype))


def _grad_or_zeros(grad, x) -> torch.Tensor:
    return grad if grad is not None else x.new_zeros(x.shape[1])


def _reference_backward(x, grad, weight, bias, num_groups, eps, apply_silu):
    """(dx, dweight, dbias) in closed form with torch ops, in x's dtype (float64 included); the
    math the Triton backward kernel implements. (A custom op's body runs below autograd, so
    autograd of the reference cannot be used here.)"""
    n, c = x.shape[:2]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    groups = x.to(compute).reshape(n, num_groups, -1)
    mean = groups.mean(-1, keepdim=True)
    rstd = torch.rsqrt((groups - mean).pow(2).mean(-1, keepdim=True) + eps)
    xhat = ((groups - mean) * rstd).reshape(x.shape)
    channel = (1, c, 1, 1)
    w = weight.to(compute).reshape(channel) if weight is not None else torch.ones(channel, dtype=compute, device=x.device)
    b = bias.to(compute).reshape(channel) if bias is not None else torch.zeros(channel, dtype=compute, device=x.device)
    g = grad.to(compute)
    if apply_silu:
        sig = torch.sigmoid(xhat * w + b)
        g = g * sig * (1 + (xhat * w + b) * (1 - sig))
    dxhat = (g * w).reshape(n, num_groups, -1)
    xhat_groups = xhat.reshape(n, num_groups, -1)
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat_groups * (dxhat * xhat_groups).mean(-1, keepdim=True))
    dweight = (g * xhat).sum((0, 2, 3)).to(weight.dtype) if weight is not None else None
    dbias = g.sum((0, 2, 3)).to(bias.dtype) if bias is not None else None
    return dx.reshape(x.shape).to(x.dtype), dweight, dbias


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, apply_silu = inputs
    ctx.save_for_backward(x, weight, bias, output[1])
    ctx.num_groups, ctx.eps, ctx.apply_silu = num_groups, eps, apply_silu


def _backward(ctx, grad_y, grad_stats):
    x, weight, bias, stats = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.fastdiff.group_norm_silu_backward(
        x, grad_y, weight, bias, stats, ctx.num_groups, ctx.eps, ctx.apply_silu
    )
    return dx, dweight if weight is not None else None, dbias if bias is not None else None, None, None, None


_group_norm_silu_train_op.register_autograd(_backward, setup_context=_setup_context)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
    if _needs_grad(x, weight, bias):
        return torch.ops.fastdiff.group_norm_silu_train(x, weight, bias, num_groups, float(eps), bool(apply_silu))[0]
    return torch.ops.fastdiff.group_norm_silu(x, weight, bias, num_groups, float(eps), bool(apply_silu))
