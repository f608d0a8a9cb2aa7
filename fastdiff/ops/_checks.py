"""Argument checks shared by the fastdiff ops: one clear error per bad input, naming the argument."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, dtypes=FLOAT_DTYPES, rank: int | tuple[int, ...] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).removeprefix('torch.')}")
    ranks = (rank,) if isinstance(rank, int) else rank
    if ranks is not None and t.dim() not in ranks:
        raise ValueError(f"{name} must have rank {' or '.join(map(str, ranks))}, got shape {tuple(t.shape)}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise RuntimeError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def check_same_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.shape != reference.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {reference_name} has {tuple(reference.shape)}")


def check_rng(name: str, rng: torch.Tensor, first_sample: bool = False) -> None:
    """rng: the int64 [seed, offset] pair that keys in-kernel Philox noise; with
    ``first_sample`` also [seed, offset, index of the batch's first sample]."""
    check_tensor(name, rng, dtypes=(torch.int64,))
    if rng.shape == (3,) and first_sample:
        return
    if rng.shape != (2,):
        words = "[seed, offset] or (3,) holding [seed, offset, first sample]" if first_sample else "[seed, offset]"
        raise ValueError(f"{name} must have shape (2,) holding {words}, got {tuple(rng.shape)}")


def check_index_values(name: str, index: torch.Tensor, size: int) -> None:
    """Indices into a table of ``size`` rows must lie in [0, size): ValueError eagerly, and under
    torch.compile (which would wrap -1 to the last row) an assertion inductor keeps, which raises
    RuntimeError. Only CPU tensors are checked: on a GPU the check would sync the host (and break
    CUDA graph capture); the kernels write NaN for an index out of range instead."""
    if index.device.type != "cpu" or index.numel() == 0:
        return
    if torch.compiler.is_compiling():
        torch._assert_async(((index >= 0) & (index < size)).all(), f"{name} must lie in [0, {size})")
        return
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= size:
        raise ValueError(f"{name} must lie in [0, {size}), got values in [{low}, {high}]")
