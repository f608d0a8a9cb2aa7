"""Training data: scikit-learn's bundled handwritten digits, or a user's folder of PNG images.

Every loader returns float32 images shaped (N, C, H, W) scaled to [-1, 1], the range the
DDPM prior and the samplers' clipping assume.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

#: Size the 8x8 digits are upsampled to: the smallest that a three-level UNet (16, 8, 4) fits.
DIGITS_IMAGE_SIZE = 16
#: Fraction of the digits held out (never trained on) for evaluation.
HELDOUT_FRACTION = 0.2
#: Seed of the fixed train / held-out permutation.
SPLIT_SEED = 0
_DIGITS_MAX_VALUE = 16.0  # load_digits pixels are integer ink counts in [0, 16]


@dataclass(frozen=True)
class LabelledImages:
    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64


def load_digits_dataset(split: str = "train", image_size: int = DIGITS_IMAGE_SIZE) -> LabelledImages:
    """sklearn's 1,797 8x8 digits, upsampled to ``image_size``, as (N, 1, S, S) in [-1, 1].

    ``split``: "train" (80%), "heldout" (the fixed 20% never trained on) or "all".
    Upsampling is bilinear: a convex combination of neighbours, so values stay in [-1, 1], and
    strokes come out smooth instead of as 2x2 blocks a model would have to learn to reproduce.
    """
    # scikit-learn is optional (fastdiff[train])
    from sklearn.datasets import load_digits

    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1) / _DIGITS_MAX_VALUE * 2.0 - 1.0
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    if split != "all":
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
        n_heldout = round(HELDOUT_FRACTION * len(labels))
        chosen = order[:n_heldout] if split == "heldout" else order[n_heldout:]
        images, labels = images[chosen], labels[chosen]
    return LabelledImages(images.contiguous(), labels)


def load_image_folder(folder) -> torch.Tensor:
    """Every ``*.png`` in ``folder`` (sorted by name) as (N, C, H, W) float32 in [-1, 1].

    All images must share one size. C is 1 when every image is grayscale, else 3 (grayscale
    images are then repeated to RGB; alpha is dropped).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"data folder {str(folder)!r} does not exist or is not a directory")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not paths:
        raise ValueError(f"data folder {str(folder)!r} holds no .png images")

    pictures = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                pictures.append((path, image.copy()))
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"cannot read image {str(path)!r}: {error}") from error

    first_path, first = pictures[0]
    for path, image in pictures[1:]:
        if image.size != first.size:
            raise ValueError(
                f"images in {str(folder)!r} have mixed sizes: {path.name} is {image.size[0]}x{image.size[1]}, "
                f"{first_path.name} is {first.size[0]}x{first.size[1]} (width x height)"
            )
    mode = "L" if all(image.mode in ("1", "L", "LA", "I;16", "I") for _, image in pictures) else "RGB"
    arrays = [np.asarray(_to_8bit(image, mode), dtype=np.float32) for _, image in pictures]
    batch = torch.from_numpy(np.stack(arrays))
    batch = batch.unsqueeze(1) if mode == "L" else batch.permute(0, 3, 1, 2)
    return (batch / 255.0 * 2.0 - 1.0).contiguous()


def _to_8bit(image, mode: str):
    if image.mode in ("I;16", "I"):  # 16-bit grayscale: rescale rather than let PIL clip it
        array = np.asarray(image, dtype=np.float32) / 257.0

        image = Image.fromarray(array.clip(0, 255).astype(np.uint8), mode="L")
    return image.convert(mode)


def load_training_images(data: str) -> torch.Tensor:
    """``"digits"`` (the training split of sklearn's digits) or a folder of PNG images."""
    if data == "digits":
        return load_digits_dataset("train").images
    return load_image_folder(data)
