"""Samples to image files: uint8 conversion, a PNG grid and an ``.npz`` array, written atomically."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastdiff.files import atomic_write

#: Key of the image array in the ``.npz`` files fastdiff writes.
NPZ_KEY = "images"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [-1, 1] -> (B, H, W, C) uint8 in [0, 255] (clamped, rounded)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError("images must be a floating-point tensor of shape (B, C, H, W)")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[1]}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values (did sampling diverge?)")
    scaled = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(images, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile (B, H, W, C) uint8 images (or what :func:`to_uint8` takes) into one (H', W', C) grid."""
    array = _as_uint8_nhwc(images)
    b, h, w, c = array.shape
    if nrow is not None and (not isinstance(nrow, int) or nrow < 1):
        raise ValueError(f"nrow must be a positive integer, got {nrow!r}")
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.zeros((padding + rows * (h + padding), padding + nrow * (w + padding), c), dtype=np.uint8)
    for i, image in enumerate(array):
        row, col = divmod(i, nrow)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


#: Small images are scaled up in the PNG grid until each tile is at least this many pixels a side.
MIN_TILE_PIXELS = 64


def grid_scale(height: int, width: int) -> int:
    """The whole-number nearest-neighbour scale that makes a (height, width) tile at least
    :data:`MIN_TILE_PIXELS` a side (1 for tiles that already are): 16x16 digits -> 4."""
    return max(1, -(-MIN_TILE_PIXELS // max(height, width)))


def save_grid_png(images, path, nrow: int | None = None, scale: int | None = None) -> Path:
    """Write the images as one PNG grid (``nrow`` per row, default about square), atomically,
    scaled up ``scale`` times by nearest neighbour (default :func:`grid_scale`: small images
    become visible at a glance; the .npz keeps the true pixels)."""
    array = _as_uint8_nhwc(images)
    scale = grid_scale(*array.shape[1:3]) if scale is None else scale
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    grid = make_grid(array, nrow).repeat(scale, axis=0).repeat(scale, axis=1)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def save_npz(images, path) -> Path:
    """Write the images as a (B, H, W, C) uint8 array under key ``"images"``, atomically."""
    array = _as_uint8_nhwc(images)
    return atomic_write(path, lambda tmp: np.savez_compressed(tmp, **{NPZ_KEY: array}))


def _as_uint8_nhwc(images) -> np.ndarray:
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        array = to_uint8(images)
    else:
        array = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(
            "images must be a float tensor (B, C, H, W) in [-1, 1] or uint8 (B, H, W, C) with 1 or 3 channels"
        )
    if array.shape[0] < 1:
        raise ValueError("images is empty: nothing to write")
    return array
