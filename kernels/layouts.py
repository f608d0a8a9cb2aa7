"""Output layouts the launchers and the ops agree on (torch only: the ops' fake functions use
them where triton is not installed)."""
from __future__ import annotations

import torch


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
