"""``fastdiff::attention``: softmax(q k^T * scale) v for (B, heads, N, D) tensors, flash-style on GPU."""
from __future__ import annotations

import torch

from fastdiff import backend, reference
from fastdiff.ops._checks import check_same_device, check_tensor

MAX_HEAD_DIM = 512  # the largest head dim the kernel's tiles are sized (and checked) for


@torch.library.custom_op("fastdiff::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    if backend.kernel_path(q.device) == "reference":
        return reference.attention(q, k, v, scale).contiguous()
    from fastdiff.kernels.attention import attention as launch

    with backend.on_device(q.device):
        return launch(q, k, v, scale)


@_attention_op.register_fake
def _(q, k, v, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


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
    a different sequence length than q. Returns a contiguous (B, heads, N_q, D) tensor.

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
