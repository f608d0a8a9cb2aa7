"""Fidelity check: the Fréchet distance, the digits feature space, the verdict, the quick CLI run."""
import json

import numpy as np
import pytest
import torch

from fastdiff.bench.fidelity import (
    DigitsFeatures,
    compare,
    draw_in_chunks,
    frechet_distance,
    permutation_noise,
    precision_recall,
)
from fastdiff.training.data import load_digits_dataset


@pytest.fixture(scope="module")
def features():
    return DigitsFeatures.fit()


def _scipy_frechet(a, b):
    from scipy import linalg

    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))  # correlated features
    b = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 0.5
    assert frechet_distance(a, b) == pytest.approx(_scipy_frechet(a, b), rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_known_gaussians():
    # Diagonal covariances: FD = |mu_a - mu_b|^2 + sum (sd_a - sd_b)^2, here 4 + (2 - 1)^2 = 5.
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200_000, 2)) * [1.0, 1.0]
    b = rng.normal(size=(200_000, 2)) * [1.0, 2.0] + [2.0, 0.0]
    assert frechet_distance(a, b) == pytest.approx(5.0, abs=0.05)


def test_frechet_distance_bad_input():
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_feature_space(features):
    assert features.heldout_accuracy > 0.9
    heldout = load_digits_dataset("heldout")
    f = features.features(heldout.images)
    assert f.shape == (359, 32) and (f >= 0).all()
    assert sum(features.label_histogram(heldout.images)) == 359
    with pytest.raises(ValueError, match=r"\(N, 1, 16, 16\)"):
        features.features(torch.zeros(3, 1, 8, 8))


def test_verdict_passes_same_distribution_and_fails_a_skewed_sampler(features):
    digits = load_digits_dataset("all").images[torch.randperm(1797, generator=torch.Generator().manual_seed(0))]
    ref, ref_again, same = digits[:300], digits[300:600], digits[600:900]
    report = compare(features, ref, ref_again, same, method="ddim", steps=1, accelerated_path="test", seconds={})
    assert report.passed, report
    assert report.fd_ref_ref <= report.noise_threshold
    faded = compare(features, ref, ref_again, same * 0.7, method="ddim", steps=1, accelerated_path="test", seconds={})
    assert not faded.passed and faded.fd_accel_ref > 2 * faded.noise_threshold
    assert faded.to_dict()["passed"] is False


def test_permutation_noise_needs_two_sets():
    with pytest.raises(ValueError, match="at least 20"):
        permutation_noise(np.zeros((15, 2)), 10)


def test_draw_in_chunks_seeds_each_chunk():
    calls = []

    def sample(batch, seed):
        calls.append((batch, seed))
        return torch.full((batch, 1, 2, 2), float(seed))

    out = draw_in_chunks(sample, 7, 3, seed=10)
    assert calls == [(3, 10), (3, 11), (1, 12)]
    assert out.shape == (7, 1, 2, 2) and out[-1].eq(12).all()


def test_quick_cli_run(tmp_path, capsys):
    from fastdiff.cli import main
    from fastdiff.models.folders import random_init_model, save_model
    from fastdiff.models.unet import UNetConfig

    config = UNetConfig(image_size=16, in_channels=1, out_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                        attn_resolutions=(8,), num_groups=4, dropout=0.0)
    save_model(random_init_model(config)[0], tmp_path / "model")
    out = tmp_path / "fidelity.json"
    argv = ["fidelity", "--model", str(tmp_path / "model"), "--quick", "--steps", "2", "-n", "24", "--chunk", "12",
            "--no-compile", "--device", "cpu", "--json", str(out), "--no-progress"]
    code = main(argv)
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert code == (0 if figures["passed"] else 1)
    assert figures["num_samples"] == 24 and figures["steps"] == 2 and figures["method"] == "ddim"
    assert sum(figures["histogram_accel"]) == 24 and sum(figures["histogram_ref"]) == 24
    for line in ("FD(accelerated, reference)", "FD(reference, reference')", "FD(reference, held-out real)"):
        assert line in printed
    assert ("PASS" if figures["passed"] else "FAIL") in printed


def test_cli_refuses_a_model_of_other_images(tmp_path):
    from fastdiff.cli import main
    from fastdiff.models.folders import random_init_model, save_model
    from fastdiff.models.unet import UNetConfig

    save_model(random_init_model(UNetConfig.tiny(image_size=8, in_channels=3))[0], tmp_path / "rgb")
    assert main(["fidelity", "--model", str(tmp_path / "rgb"), "--quick", "--no-compile", "--device", "cpu"]) == 2


def test_precision_recall_k3():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 4))
    assert precision_recall(real, rng.normal(size=(200, 4))) > (0.8, 0.8)
    precision, recall = precision_recall(real, rng.normal(size=(200, 4)) * 0.1)  # collapsed to the centre
    assert precision == 1.0 and recall < 0.3
    precision, recall = precision_recall(real, rng.normal(size=(200, 4)) + 10.0)  # elsewhere
    assert precision == 0.0 and recall == 0.0
    with pytest.raises(ValueError, match="N > k = 3"):
        precision_recall(real, real[:3])


def test_precision_recall_resample_keeps_each_points_radius():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(100, 4)), rng.normal(size=(100, 4))
    assert precision_recall(real, fake, rows=np.arange(100)) == precision_recall(real, fake)
    doubled = np.repeat(np.arange(50), 2)  # every point twice: still its own radius, not 0
    assert precision_recall(real, fake, rows=doubled)[1] > 0.5
