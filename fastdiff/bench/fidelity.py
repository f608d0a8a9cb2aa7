"""Does the accelerated sampler draw the same distribution as the reference one?

Samples are compared in a fixed feature space: the hidden layer of a small MLP digits
classifier trained, deterministically, on the training split of sklearn's digits (the same
16x16 [-1, 1] images the shipped model learned). Between two sets of features we take the
Fréchet distance of their Gaussians (the FID formula). The check: FD(accelerated, reference)
must lie within the noise of FD between two reference draws, estimated by a permutation test
on the pooled reference samples (random equal splits of ref + ref').
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from fastdiff.training.data import load_digits_dataset

#: Hidden units of the feature classifier (the feature dimension).
FEATURE_DIM = 32
#: Random equal splits of the pooled reference samples used to estimate the ref-vs-ref noise.
PERMUTATIONS = 200
#: Quantile of that noise FD(accelerated, reference) must not exceed.
NOISE_QUANTILE = 0.99
FEATURE_IMAGE_SHAPE = (1, 16, 16)


@dataclass(frozen=True)
class DigitsFeatures:
    """A digits classifier whose hidden ReLU layer is the feature space."""

    classifier: object  # sklearn MLPClassifier
    heldout_accuracy: float

    @classmethod
    def fit(cls) -> "DigitsFeatures":
        # scikit-learn is optional (fastdiff[train])
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier
        from threadpoolctl import threadpool_limits

        train, heldout = load_digits_dataset("train"), load_digits_dataset("heldout")
        classifier = MLPClassifier(hidden_layer_sizes=(FEATURE_DIM,), alpha=1e-3, max_iter=400, random_state=0)
        # One BLAS thread: deterministic sums, and no spinning threads on a busy machine.
        with warnings.catch_warnings(), threadpool_limits(limits=1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            classifier.fit(_flatten(train.images), train.labels.numpy())
        accuracy = float((classifier.predict(_flatten(heldout.images)) == heldout.labels.numpy()).mean())
        return cls(classifier, accuracy)

    def features(self, images: torch.Tensor) -> np.ndarray:
        """(N, 1, 16, 16) images in [-1, 1] -> (N, FEATURE_DIM) hidden activations (float64)."""
        _check_images(images)
        hidden = _flatten(images) @ self.classifier.coefs_[0] + self.classifier.intercepts_[0]
        return np.maximum(hidden, 0.0)

    def label_histogram(self, images: torch.Tensor) -> list[int]:
        """How many of ``images`` the classifier assigns to each digit 0..9."""
        _check_images(images)
        labels = self.classifier.predict(_flatten(images))
        return np.bincount(labels, minlength=10).tolist()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) between two (N, D) feature sets.

    The trace of the matrix square root of S_a S_b equals that of the symmetric PSD
    S_a^1/2 S_b S_a^1/2, whose square root an eigendecomposition gives exactly (no scipy).
    """
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"{name} must be (N, D) features with N >= 2, got shape {x.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _psd_sqrt(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_sqrt = np.sqrt(np.clip(cross, 0.0, None)).sum()
    fd = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
    return float(max(fd, 0.0))


def permutation_noise(pooled: np.ndarray, size: int, permutations: int = PERMUTATIONS, seed: int = 0) -> np.ndarray:
    """FDs between random disjoint pairs of ``size``-sample subsets of ``pooled`` (2*size rows):
    the spread FD shows between two draws from one distribution."""
    if pooled.shape[0] < 2 * size:
        raise ValueError(f"need at least {2 * size} pooled samples, got {pooled.shape[0]}")
    rng = np.random.default_rng(seed)
    out = np.empty(permutations)
    for i in range(permutations):
        order = rng.permutation(pooled.shape[0])
        out[i] = frechet_distance(pooled[order[:size]], pooled[order[size:2 * size]])
    return out


@dataclass(frozen=True)
class FidelityReport:
    method: str
    steps: int
    num_samples: int
    fd_accel_ref: float
    fd_ref_ref: float
    noise_mean: float
    noise_threshold: float  # NOISE_QUANTILE of the ref-vs-ref permutation noise
    fd_ref_heldout: float
    fd_accel_heldout: float
    fd_heldout_train: float  # the floor: real vs real
    histogram_ref: list
    histogram_accel: list
    histogram_heldout: list
    classifier_accuracy: float
    accelerated_path: str
    seconds: dict

    @property
    def passed(self) -> bool:
        return self.fd_accel_ref <= self.noise_threshold

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "noise_quantile": NOISE_QUANTILE, "permutations": PERMUTATIONS}


def compare(
    features: DigitsFeatures,
    reference: torch.Tensor,
    reference_again: torch.Tensor,
    accelerated: torch.Tensor,
    **info,
) -> FidelityReport:
    """The report for three equal-size sample sets: two reference draws and one accelerated."""
    if not reference.shape == reference_again.shape == accelerated.shape:
        raise ValueError("the three sample sets must have the same shape")

    f_ref, f_ref2, f_acc = (features.features(x) for x in (reference, reference_again, accelerated))
    heldout, train = load_digits_dataset("heldout").images, load_digits_dataset("train").images
    f_heldout = features.features(heldout)
    noise = permutation_noise(np.concatenate([f_ref, f_ref2]), f_ref.shape[0])
    return FidelityReport(
        num_samples=reference.shape[0],
        fd_accel_ref=frechet_distance(f_acc, f_ref),
        fd_ref_ref=frechet_distance(f_ref2, f_ref),
        noise_mean=float(noise.mean()),
        noise_threshold=float(np.quantile(noise, NOISE_QUANTILE)),
        fd_ref_heldout=frechet_distance(f_ref, f_heldout),
        fd_accel_heldout=frechet_distance(f_acc, f_heldout),
        fd_heldout_train=frechet_distance(features.features(train), f_heldout),
        histogram_ref=features.label_histogram(reference),
        histogram_accel=features.label_histogram(accelerated),
        histogram_heldout=features.label_histogram(heldout),
        classifier_accuracy=features.heldout_accuracy,
        **info,
    )


def draw_in_chunks(sample: Callable[[int, int], torch.Tensor], total: int, chunk: int, seed: int) -> torch.Tensor:
    """``total`` samples as ``sample(batch, seed)`` calls of at most ``chunk``, chunk i seeded
    ``seed + i`` (callers space their base seeds so runs never share a chunk seed)."""
    parts, done, index = [], 0, 0
    while done < total:
        batch = min(chunk, total - done)
        parts.append(sample(batch, seed + index).detach().float().cpu())
        done, index = done + batch, index + 1
    return torch.cat(parts)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix (eigenvalues rounded below zero are clipped)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def _flatten(images: torch.Tensor) -> np.ndarray:
    # Samples are images: judge them as saved, clamped to [-1, 1].
    return images.detach().float().cpu().clamp(-1.0, 1.0).reshape(images.shape[0], -1).numpy().astype(np.float64)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != FEATURE_IMAGE_SHAPE:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"the digits feature space takes (N, 1, 16, 16) images, got {got}")


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3,
                     rows: np.ndarray | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` against ``real``
    features: each set's manifold is the union of balls reaching every point's k-th nearest
    neighbour in its own set; precision is the share of fake points inside the real manifold,
    recall the share of real points inside the fake one. ``rows``: a bootstrap resample of the
    fake points, each keeping the radius it has in the whole set (a repeated point would
    otherwise be its own neighbour and shrink the manifold)."""
    for name, x in (("real", real), ("fake", fake)):
        if x.ndim != 2 or x.shape[0] <= k:
            raise ValueError(f"{name} must be (N, D) features with N > k = {k}, got shape {x.shape}")
    real, fake = real.astype(np.float64), fake.astype(np.float64)

    def radii(x):
        distances = _pairwise_distances(x, x)
        return np.sort(distances, axis=1)[:, k]  # column 0 is the point itself

    fake_radii = radii(fake)
    if rows is not None:
        fake, fake_radii = fake[rows], fake_radii[rows]
    cross = _pairwise_distances(fake, real)  # (fake, real)
    precision = float((cross <= radii(real)[None, :]).any(axis=1).mean())
    recall = float((cross.T <= fake_radii[None, :]).any(axis=1).mean())
    return precision, recall


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.clip(squared, 0.0, None))


__all__ = ["DigitsFeatures", "frechet_distance", "permutation_noise", "compare", "FidelityReport", "draw_in_chunks",
           "precision_recall"]
