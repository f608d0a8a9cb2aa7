"""Model folders, atomic writes and image files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdiff import files
from fastdiff.images import NPZ_KEY, make_grid, save_grid_png, save_npz, to_uint8
from fastdiff.models import folders
from fastdiff.models.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return UNet(UNetConfig.tiny(image_size=8)).eval()


@pytest.fixture
def saved(tmp_path, tiny_model):
    return folders.save_model(tiny_model, tmp_path / "model", extra={"trained_steps": 12})


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- save / load


def test_round_trip(saved, tiny_model):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((saved / "config.json").read_text())
    assert config["format"] == "fastdiff-unet" and config["version"] == 1
    assert config["schedule"] == "linear" and config["num_timesteps"] == 1000
    model, info = folders.load_model(saved)
    assert info.config == tiny_model.config and info.folder == saved
    assert info.extra == {"trained_steps": 12} and not info.random_init
    assert not model.training
    assert _same_weights(model, tiny_model)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    with torch.no_grad():
        assert torch.equal(model(x, t), tiny_model(x, t))


def test_load_with_dtype(saved):
    model, _ = folders.load_model(saved, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_save_into_existing_folder_replaces_files_and_keeps_others(saved, tiny_model):
    (saved / "notes.txt").write_text("keep me")
    other = UNet(UNetConfig.tiny(image_size=16))
    folders.save_model(other, saved, schedule="cosine", num_timesteps=500)
    model, info = folders.load_model(saved)
    assert info.config.image_size == 16 and info.schedule == "cosine" and info.num_timesteps == 500
    assert info.extra == {}
    assert _same_weights(model, other)
    assert (saved / "notes.txt").read_text() == "keep me"
    assert not [p for p in saved.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_save_failure_leaves_nothing(tmp_path, tiny_model):
    with pytest.raises(TypeError):
        folders.save_model(tiny_model, tmp_path / "model", extra={"bad": object()})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="schedule"):
        folders.save_model(tiny_model, tmp_path / "model", schedule="quadratic")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="fastdiff UNet"):
        folders.save_model(torch.nn.Linear(2, 2), tmp_path / "model")


def test_missing_folder_and_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        folders.load_model(tmp_path / "nowhere")
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        folders.load_model(saved)
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        folders.load_model(saved)


def _edit_config(folder, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda f: (f / "config.json").write_text("{not json"), "config.json: not valid JSON"),
        (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json: expected a JSON object"),
        (lambda f: _edit_config(f, format="other"), "config.json: format"),
        (lambda f: _edit_config(f, version=99), "config.json: unsupported version"),
        (lambda f: _edit_config(f, widht=3), "config.json: unknown UNet config keys"),
        (lambda f: _edit_config(f, image_size=9), "config.json: image_size 9 must be divisible"),
        (lambda f: _edit_config(f, num_groups=7), "config.json: channels .* num_groups"),
        (lambda f: _edit_config(f, schedule="quadratic"), "config.json: schedule"),
        (lambda f: _edit_config(f, extra=[1]), "config.json: 'extra'"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x00garbage" * 10), "model.safetensors: not a readable"),
        (lambda f: _truncate(f / "model.safetensors"), "model.safetensors: not a readable"),
        (lambda f: _edit_tensors(f, drop="conv_in.weight"), r"model.safetensors: .*missing tensors \[conv_in.weight\]"),
        (lambda f: _edit_tensors(f, add="extra.weight"), r"model.safetensors: .*unexpected tensors \[extra.weight\]"),
        (lambda f: _edit_tensors(f, reshape="conv_out.bias"), "model.safetensors: tensor 'conv_out.bias' has shape"),
        (lambda f: _edit_config(f, ch=64, num_groups=8), "model.safetensors: .*shape"),
    ],
    ids=["bad json", "json list", "format", "version", "unknown key", "image size", "groups", "schedule", "extra",
         "garbage weights", "truncated weights", "missing tensor", "unexpected tensor", "wrong shape",
         "config mismatch"],
)
def test_corrupt_folder_errors_name_the_file(saved, corrupt, match):
    corrupt(saved)
    with pytest.raises(ValueError, match=match):
        folders.load_model(saved)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def _edit_tensors(folder, drop=None, add=None, reshape=None):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.zeros(3)
    if reshape:
        tensors[reshape] = torch.zeros(tensors[reshape].numel() + 1)
    save_file(tensors, str(path))


def test_default_model_without_builtin_is_seeded_random_cifar10(monkeypatch, tmp_path):
    monkeypatch.setattr(folders, "BUILTIN_FOLDER", tmp_path / "absent")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model, info = folders.load_model()
    assert torch.equal(torch.get_rng_state(), before), "must not disturb the global RNG"
    assert info.random_init and info.folder is None and "random-init" in info.description
    assert info.config == UNetConfig.cifar10()
    again, _ = folders.load_model()
    assert _same_weights(model, again)


def test_default_model_uses_builtin_folder_when_shipped(monkeypatch, saved):
    monkeypatch.setattr(folders, "BUILTIN_FOLDER", saved)
    _, info = folders.load_model()
    assert info.folder == saved and not info.random_init


def test_loading_never_touches_the_network(monkeypatch, saved):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access while loading a model")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    folders.load_model(saved)


# ---------------------------------------------------------------- atomic_write


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "data.txt"
    target.write_text("old")

    def fail(path):
        path.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        files.atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.txt"]

    seen = []
    files.atomic_write(target, lambda path: (seen.append(path), path.write_text("new")))
    assert target.read_text() == "new"
    assert seen[0].parent == tmp_path and seen[0].suffix == ".txt" and seen[0] != target
    assert [p.name for p in tmp_path.iterdir()] == ["data.txt"]


def test_saved_files_get_the_usual_permissions(saved):
    # safetensors writes 0o600: a shipped or shared model folder must stay readable by others.
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):
        assert (saved / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# ---------------------------------------------------------------- images


def test_to_uint8_maps_the_range():
    images = torch.tensor([-1.0, -1.5, 0.0, 1.0, 2.0, 0.5]).reshape(1, 1, 2, 3)
    out = to_uint8(images)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3, 1)
    assert out.ravel().tolist() == [0, 0, 128, 255, 255, 191]


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.full((1, 3, 2, 2), float("nan")), "NaN"),
        (torch.zeros(1, 2, 2, 2), "1 or 3 channels"),
        (torch.zeros(3, 2, 2), r"\(B, C, H, W\)"),
    ],
    ids=["nan", "two channels", "3-d"],
)
def test_to_uint8_bad_input(images, match):
    with pytest.raises(ValueError, match=match):
        to_uint8(images)


def test_save_grid_png_and_npz(tmp_path):
    from PIL import Image

    images = torch.rand(5, 3, 4, 6) * 2 - 1
    png = save_grid_png(images, tmp_path / "grid.png", scale=1)
    npz = save_npz(images, tmp_path / "samples.npz")
    with Image.open(png) as picture:
        assert picture.mode == "RGB"
        # 5 images -> 3 per row, 2 rows, 2 px padding
        assert picture.size == (2 + 3 * (6 + 2), 2 + 2 * (4 + 2))
        grid = np.asarray(picture)
    np.testing.assert_array_equal(grid, make_grid(to_uint8(images)))
    np.testing.assert_array_equal(grid[2:6, 2:8], to_uint8(images)[0])
    with np.load(npz) as data:
        np.testing.assert_array_equal(data[NPZ_KEY], to_uint8(images))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "samples.npz"]


def test_grayscale_grid(tmp_path):
    from PIL import Image

    with Image.open(save_grid_png(torch.zeros(4, 1, 3, 3), tmp_path / "g.png", scale=1)) as picture:
        assert picture.mode == "L" and picture.size == (2 + 2 * 5, 2 + 2 * 5)


def test_small_images_are_scaled_up_in_the_grid_by_nearest_neighbour(tmp_path):
    from PIL import Image

    images = torch.rand(4, 1, 16, 16) * 2 - 1
    with Image.open(save_grid_png(images, tmp_path / "g.png")) as picture:
        assert picture.size == (4 * (2 + 2 * 18), 4 * (2 + 2 * 18))  # 16x16 digits: 4 times, to 64x64 tiles
        grid = np.asarray(picture)
    np.testing.assert_array_equal(grid, make_grid(to_uint8(images)).repeat(4, 0).repeat(4, 1)[..., 0])
    with Image.open(save_grid_png(torch.zeros(1, 3, 64, 80), tmp_path / "big.png")) as picture:
        assert picture.size == (2 + 80 + 2, 2 + 64 + 2)  # large enough already: as is


def test_failed_image_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        save_npz(torch.full((1, 3, 2, 2), float("inf")), tmp_path / "x.npz")
    with pytest.raises(ValueError, match="empty"):
        save_grid_png(np.zeros((0, 2, 2, 3), dtype=np.uint8), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temps_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "data.txt"
    dead = _dead_pid()
    stale = [tmp_path / f".data.txt.{dead}-0badc0de.tmp.txt", tmp_path / ".data.txt.0123456789ab.tmp.txt"]
    for path in stale:
        path.write_text("half")
    live = tmp_path / f".data.txt.{os.getpid()}-0badc0de.tmp.txt"  # this process: maybe mid-write
    live.write_text("in progress")
    other = tmp_path / f".other.txt.{dead}-0badc0de.tmp.txt"
    other.write_text("not ours")
    files.atomic_write(target, lambda path: path.write_text("new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data.txt", live.name, other.name])


def test_atomic_folder_swaps_the_whole_set_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    with files.atomic_folder(out) as staging:
        (staging / "a.txt").write_text("a1")
        (staging / "b.txt").write_text("b1")
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "deep.txt").write_text("deep")
    with files.atomic_folder(out) as staging:
        (staging / "a.txt").write_text("a2")
        assert not (out / "a.txt").read_text() == "a2"  # nothing visible before the swap
        (staging / "b.txt").write_text("b2")
    assert {p.name: p.read_text() for p in out.iterdir() if p.is_file()} == {"a.txt": "a2", "b.txt": "b2", "notes.txt": "mine"}
    assert (out / "sub" / "deep.txt").read_text() == "deep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_atomic_folder_failure_leaves_the_old_set(tmp_path, error):
    out = tmp_path / "out"
    with files.atomic_folder(out) as staging:
        (staging / "a.txt").write_text("old")
    with pytest.raises(type(error)):
        with files.atomic_folder(out) as staging:
            (staging / "a.txt").write_text("new")
            raise error
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_folder_without_an_exchange_call(tmp_path, monkeypatch):
    """Where renameat2 is missing the old folder is renamed aside first; a kill between the two
    renames is repaired by the next run, which puts the old set back before writing."""
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    for text in ("one", "two"):
        with files.atomic_folder(out) as staging:
            (staging / "a.txt").write_text(text)
    assert (out / "a.txt").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    aside = tmp_path / f".out.{_dead_pid()}-0badc0de.tmp.old"
    os.rename(out, aside)  # the state a kill between the renames leaves
    files.remove_stale_temps(out)
    assert (out / "a.txt").read_text() == "two" and not aside.exists()


def test_atomic_folder_refuses_a_file_and_an_unwritable_place(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        with files.atomic_folder(tmp_path / "file"):
            pass
    with pytest.raises(OSError, match="cannot write into"):
        with files.atomic_folder(tmp_path / "file" / "sub"):
            pass


def test_half_replaced_model_folder_is_refused(tmp_path):
    """New weights beside the old config.json (what a kill between two renames used to leave)
    fail the recorded hash instead of loading with the wrong schedule."""
    model = UNet(UNetConfig.tiny(image_size=8, in_channels=1))
    old = folders.save_model(model, tmp_path / "old", schedule="linear", num_timesteps=1000)
    new = folders.save_model(model, tmp_path / "new", schedule="cosine", num_timesteps=500)
    with torch.no_grad():
        model.conv_in.weight.add_(1.0)
    folders.save_model(model, tmp_path / "new")  # other weights, same shapes
    (old / folders.WEIGHTS_FILE).write_bytes((new / folders.WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match=r"model.safetensors: does not match config.json \(its SHA-256"):
        folders.load_model(old)


def test_builtin_model_records_its_weights_hash():
    info = folders.read_model_info(folders.BUILTIN_FOLDER)
    assert info.weights_sha256 is not None
    folders.load_model()
