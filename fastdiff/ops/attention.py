"""``fastdiff::attention``: softmax(q k^T * scale) v for (B, heads, N, D) tensors, flash-style on GPU.
Differentiable: the backward recomputes the probabilities (see ``_backward``).

Routes (:func:`route`): on CPU the eager reference; on a GPU, what FlashAttention-2 takes goes to
``F.scaled_dot_product_attention`` with its flash backend, the rest (D > 256, where PyTorch has no
flash backend, fp32, head dims that are not a multiple of 8) to the fastdiff Triton kernel. That
split is a default, not a measurement: no GPU has compared the two yet, and
benchmarks/test_bench_ops.py holds the comparison to run on the first one. The routes that ran are
recorded (:func:`recording_routes`) for ``Sampler.describe()`` and the bench."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastdiff.kernels.layouts import output_like
from fastdiff.ops import backend, reference
from fastdiff.ops._checks import check_same_device, check_tensor

MAX_HEAD_DIM = 512  # the largest head dim the kernel's tiles are sized (and checked) for
#: FlashAttention-2 in PyTorch's SDPA: fp16/bf16, head dims up to 256 that are multiples of 8, sm_80+.
SDPA_FLASH_MAX_HEAD_DIM = 256
SDPA_FLASH_DTYPES = (torch.float16, torch.bfloat16)
SDPA_FLASH = "sdpa-flash"  # F.scaled_dot_product_attention, FlashAttention-2 backend
KERNEL = "fastdiff-kernel"  # kernels/attention.py (on CPU tensors: under Triton's interpreter)
REFERENCE = "reference"  # fastdiff.ops.reference.attention, eager PyTorch


def flash_takes(dtype: torch.dtype, head_dim: int, last_dims_contiguous: bool, capability: tuple[int, int]) -> bool:
    """Whether SDPA's FlashAttention-2 backend takes a call (PyTorch's own conditions, stated once)."""
    return (dtype in SDPA_FLASH_DTYPES and head_dim <= SDPA_FLASH_MAX_HEAD_DIM and head_dim % 8 == 0
            and last_dims_contiguous and capability >= (8, 0))


def route(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """What the op runs for these tensors: SDPA_FLASH, KERNEL or REFERENCE."""
    path = backend.kernel_path(q.device)
    if path == "reference":
        return REFERENCE
    if path == "triton" and flash_takes(q.dtype, q.shape[-1], all(t.stride(-1) == 1 for t in (q, k, v)),
                                        torch.cuda.get_device_capability(q.device)):
        return SDPA_FLASH
    return KERNEL


_recorders: list[set[str]] = []


@contextlib.contextmanager
def recording_routes(into: set[str]):
    """Adds to ``into`` a label per route run inside the block, e.g. "sdpa-flash (D=256, bfloat16)".
    The op's body records each call; compiled code records what its op calls run (a captured CUDA
    graph, at capture); an eager reference call records itself, one traced into a compiled graph
    does not (tracing must stay free of side effects)."""
    _recorders.append(into)
    try:
        yield into
    finally:
        _recorders.remove(into)


def _record(which: str, q: torch.Tensor) -> None:
    if not torch.compiler.is_compiling() and _recorders:  # tracing never reads the list (no guard on it)
        label = f"{which} (D={q.shape[-1]}, {str(q.dtype).removeprefix('torch.')})"
        for recorded in _recorders:
            recorded.add(label)


def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """SDPA restricted to its FlashAttention-2 backend (it raises rather than fall back to
    another backend), laid out as :func:`output_like` says. A NaN query row comes out NaN, as on
    the other routes: FlashAttention's row normalisation does not promise it, so the reference's
    own fill sets those rows (one more read of q)."""
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = reference.nan_query_rows(F.scaled_dot_product_attention(q, k, v, scale=scale), q)
    laid_out = output_like(q)
    return out if out.stride() == laid_out.stride() else laid_out.copy_(out)


# flexible_layout: inductor passes q/k/v in the strides it has (views of the qkv convolution)
# instead of copying them to their eager strides; the kernel reads any last-dim-contiguous view.
@torch.library.custom_op("fastdiff::attention", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    which = route(q, k, v)
    _record(which, q)
    if which == REFERENCE:
        return output_like(q).copy_(reference.attention(q, k, v, scale))
    with backend.on_device(q.device):
        if which == SDPA_FLASH:
            return sdpa_flash(q, k, v, scale)
        # the kernels need triton, which is optional: imported when a kernel runs
        from fastdiff.kernels.attention import attention as launch

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

    NaN propagates as the formula (and PyTorch's math SDPA) says, on every route (:func:`route`):
    a NaN in a query row makes that output row NaN; a NaN in k or v makes every output row NaN."""
    _check_args(q, k, v, scale)
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if k.shape[2] == 0:  # no keys: SDPA's answer is zeros
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    if backend.kernel_path(q.device) == "reference":
        _record(REFERENCE, q)
        return reference.attention(q, k, v, scale).contiguous()  # plain torch: inductor can fuse it
    return torch.ops.fastdiff.attention(q, k, v, None if scale is None else float(scale))
