"""``fastdiff::attention``: softmax(q k^T * scale) v for (B, heads, N, D) tensors, flash-style on GPU.
Differentiable: the backward recomputes the probabilities (see ``_backward``)."""
from __future__ import annotations

import math

import torch

from fastdiff import backend, reference
from fastdiff.ops._checks import check_same_device, check_tensor

MAX_HEAD_DIM = 512  # the largest head dim the kernel's tiles are sized (and checked) for


def output_like(q: torch.Tensor) -> torch.Tensor:
    """An empty (B, heads, N_q, D) output whose dimension order follows q's strides (dense, last
    dim contiguous): q/k/v sliced out of a channels_last qkv convolution give an output laid out
    (B, N, heads, D), which the caller's transpose-and-reshape back to (B, C, H, W) reads as a
    channels_last view without a copy; a contiguous q gives a contiguous output."""
    order = sorted(range(3), key=lambda d: (-q.stride(d), d))  # outer to inner among B, heads, N
    strides = [0, 0, 0, 1]
    step = q.shape[3]
    for d in reversed(order):
        strides[d] = step
        step *= q.shape[d]
    return torch.empty_strided(q.shape, strides, dtype=q.dtype, device=q.device)


# flexible_layout: inductor passes q/k/v in the strides it has (views of the qkv convolution)
# instead of copying them to their eager strides; the kernel reads any last-dim-contiguous view.
@torch.library.custom_op("fastdiff::attention", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    if backend.kernel_path(q.device) == "reference":
        return output_like(q).copy_(reference.attention(q, k, v, scale))
    from fastdiff.kernels.attention import attention as launch

    with backend.on_device(q.device):
        return launch(q, k, v, scale)


@_attention_op.register_fake
def _(q, k, v, scale):
    return output_like(q)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _backward(ctx, grad_out):
    """Gradients by recomputing the attention probabilities in fp32 (materialises N_q x N_kv per
    head: correct, not flash-style): with p = softmax(s), s = q k^T * scale and dO the output's
    gradient, dv = p^T dO, ds = p * (dO v^T - rowsum(p * dO v^T)), dq = ds k scale, dk = ds^T q scale."""
    q, k, v = ctx.saved_tensors
    scale = 1.0 / math.sqrt(q.shape[-1]) if ctx.scale is None else ctx.scale
    qf, kf, vf, go = (t.float() for t in (q, k, v, grad_out))
    p = torch.softmax(qf @ kf.transpose(-1, -2) * scale, dim=-1)
    dv = p.transpose(-1, -2) @ go
    dp = go @ vf.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = ds @ kf * scale
    dk = ds.transpose(-1, -2) @ qf * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _check_args(q, k, v, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, rank=4)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
    check_same_device("q", q, k=k, v=v)
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"q has head dim {q.shape[3]}; supported head dims are 1..{MAX_HEAD_DIM}")
    for dim, what in ((0, "batch size"), (1, "head count"), (3, "head dim")):
        if k.shape[dim] != q.shape[dim]:
            raise ValueError(f"k has {what} {k.shape[dim]} but q has {q.shape[dim]} (k: {tuple(k.shape)})")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float, torch.SymFloat))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over (B, heads, N, D); scale defaults to 1/sqrt(D). k and v may have
    a different sequence length than q. Returns (B, heads, N_q, D): contiguous on the reference
    route, laid out as :func:`output_like` says on the kernel route.

    NaN propagates as the formula (and PyTorch's math SDPA) says, on every route: a NaN in a
    query row makes that output row NaN; a NaN in k or v makes every output row NaN."""
    _check_args(q, k, v, scale)
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if k.shape[2] == 0:  # no keys: SDPA's answer is zeros
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    if backend.kernel_path(q.device) == "reference":
        return reference.attention(q, k, v, scale).contiguous()  # plain torch: inductor can fuse it
    return torch.ops.fastdiff.attention(q, k, v, None if scale is None else float(scale))
