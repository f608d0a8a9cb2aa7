"""Checks of what a caller passes to a sampler: the sample shape and the class labels."""
from __future__ import annotations

import torch


def check_shape(shape) -> tuple[int, int, int, int]:
    shape = tuple(shape)
    if len(shape) != 4 or not all(hasattr(s, "__index__") and not isinstance(s, bool) for s in shape):
        raise ValueError(f"shape must be four integers (batch, channels, height, width), got {shape!r}")
    shape = tuple(int(s) for s in shape)
    if shape[0] < 1:
        raise ValueError(f"batch size must be >= 1, got {shape[0]}")
    if min(shape[1:]) < 1:
        raise ValueError(f"channels, height and width must be >= 1, got {shape[1:]}")
    return shape


def check_class_labels(class_labels, batch: int, device):
    if class_labels is None:
        return None
    if not isinstance(class_labels, torch.Tensor) or class_labels.dtype != torch.int64:
        raise TypeError("class_labels must be an int64 tensor of shape (batch,)")
    if class_labels.shape != (batch,):
        raise ValueError(f"class_labels must have shape ({batch},), got {tuple(class_labels.shape)}")
    return class_labels.to(device)
