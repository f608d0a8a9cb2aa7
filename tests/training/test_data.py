"""Training data: sklearn digits split and scaling; PNG folders and their errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.training.data import load_digits_dataset, load_image_folder, load_training_images


def test_digits_split_is_fixed_disjoint_and_scaled():
    train, heldout, every = (load_digits_dataset(s) for s in ("train", "heldout", "all"))
    assert train.images.shape == (1438, 1, 16, 16) and heldout.images.shape == (359, 1, 16, 16)
    assert every.images.shape[0] == 1797
    for split in (train, heldout):
        assert split.images.dtype == torch.float32
        assert split.images.min() >= -1.0 and split.images.max() <= 1.0
        assert split.images.min() == -1.0  # background ink 0 maps to -1
    # Disjoint and together the whole set: compare rows as sets of bytes.
    rows = lambda x: {r.tobytes() for r in x.images.reshape(x.images.shape[0], -1).numpy()}  # noqa: E731
    assert not rows(train) & rows(heldout)
    assert rows(train) | rows(heldout) == rows(every)
    again = load_digits_dataset("heldout")
    assert torch.equal(again.images, heldout.images) and torch.equal(again.labels, heldout.labels)
    assert set(heldout.labels.tolist()) == set(range(10))


def test_digits_native_size_is_the_raw_pixels():
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images).float()
    images = load_digits_dataset("all", image_size=8).images
    torch.testing.assert_close(images[:, 0], raw / 16 * 2 - 1, rtol=0, atol=1e-6)


@pytest.mark.parametrize("split, size", [("test", 16), ("train", 4), ("train", 16.0)])
def test_digits_bad_arguments(split, size):
    with pytest.raises(ValueError, match="split|image_size"):
        load_digits_dataset(split, image_size=size)


def _write(folder, name, array, mode):
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(folder / name)


def test_image_folder_grayscale(tmp_path):
    _write(tmp_path, "b.png", np.full((6, 5), 255), "L")
    _write(tmp_path, "a.png", np.zeros((6, 5)), "L")
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_image_folder(tmp_path)
    assert images.shape == (2, 1, 6, 5)
    assert torch.equal(images[0], torch.full((1, 6, 5), -1.0))  # sorted by name: a.png first
    assert torch.equal(images[1], torch.full((1, 6, 5), 1.0))


def test_image_folder_mixed_modes_become_rgb(tmp_path):
    rgb = np.zeros((4, 4, 3))
    rgb[..., 0] = 255
    _write(tmp_path, "a.png", rgb, "RGB")
    _write(tmp_path, "b.png", np.full((4, 4), 255), "L")
    images = load_image_folder(tmp_path)
    assert images.shape == (2, 3, 4, 4)
    assert torch.equal(images[0, 0], torch.ones(4, 4)) and torch.equal(images[0, 1], -torch.ones(4, 4))
    assert torch.equal(images[1], torch.ones(3, 4, 4))


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no .png images"):
        load_image_folder(tmp_path)

    _write(tmp_path, "a.png", np.zeros((4, 4)), "L")
    _write(tmp_path, "b.png", np.zeros((5, 4)), "L")
    with pytest.raises(ValueError, match=r"mixed sizes: b.png is 4x5, a.png is 4x4"):
        load_image_folder(tmp_path)

    (tmp_path / "b.png").unlink()
    (tmp_path / "c.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot read image .*c.png"):
        load_image_folder(tmp_path)


def test_training_images_by_name(tmp_path):
    assert torch.equal(load_training_images("digits"), load_digits_dataset("train").images)
    _write(tmp_path, "a.png", np.zeros((4, 4)), "L")
    assert load_training_images(str(tmp_path)).shape == (1, 1, 4, 4)
