"""Kill tests: a subprocess paused at a chosen point between writes (fastdiff.models.folders.pause_point,
switched on by an environment variable) is killed there; no mixed or half output may survive,
and the next run cleans up what the killed one left.

The matrix (point x signal -> what must hold) is the parametrisation of each test below.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from fastdiff import pause
from fastdiff.cli import main
from fastdiff.engines.cache import ArtifactCache
from fastdiff.images import NPZ_KEY, grid_scale
from fastdiff.models import folders
from fastdiff.training.trainer import CHECKPOINT_FILE, read_checkpoint

TINY = ["sample", "--config", "tiny", "--steps", "1", "--no-progress"]
SAMPLE = [sys.executable, "-m", "fastdiff.cli", *TINY]


def run_until(point: str, command: list[str], tmp_path, sig=signal.SIGKILL) -> tuple[int, str]:
    """Run ``command`` until it pauses at ``point``, send it ``sig``; returns (exit code, stderr)."""
    pause_file = tmp_path / f"paused-at-{point}"
    env = {**os.environ, pause.PAUSE_AT_ENV: point, pause.PAUSE_FILE_ENV: str(pause_file)}
    # Ctrl-C as in a terminal: a job started in the background (a CI runner, `cmd &`) inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not pause_file.exists():
        if process.poll() is not None:
            pytest.fail(f"exited with {process.returncode} before pausing at {point}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"never paused at {point}")
        time.sleep(0.02)
    pause_file.unlink()
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    return process.returncode, err


def _output_set(out) -> tuple[int, int]:
    """(images in samples.npz, images the PNG grid holds): equal when the pair is one set."""
    with np.load(out / "samples.npz") as data:
        in_npz = data[NPZ_KEY].shape[0]
    with Image.open(out / "samples.png") as picture:
        scale = grid_scale(16, 16)
        columns = (picture.size[0] // scale - 2) // 18  # 16x16 tiles with 2-pixel padding, scaled up
        rows = (picture.size[1] // scale - 2) // 18
    return in_npz, columns * rows


def _temps(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


@pytest.mark.parametrize("point", ["atomic-write", "sample-between-files", "folder-staged"])
def test_killed_sample_leaves_the_old_output_set(tmp_path, point):
    out = tmp_path / "out"
    assert main([*TINY, "--batch", "4", "--out", str(out)]) == 0
    assert _output_set(out) == (4, 4)
    code, _ = run_until(point, [*SAMPLE, "--batch", "1", "--out", str(out)], tmp_path)
    assert code == -signal.SIGKILL
    assert _output_set(out) == (4, 4)  # the whole old set: no new PNG beside an old npz
    assert _temps(tmp_path) or _temps(out)  # the killed run left its staging behind...
    assert main([*TINY, "--batch", "1", "--out", str(out)]) == 0
    assert _output_set(out) == (1, 1)
    assert _temps(tmp_path) == [] and _temps(out) == []  # ...which the next run removed


def test_ctrl_c_during_sample_exits_130_and_leaves_no_temp_files(tmp_path):
    out = tmp_path / "out"
    assert main([*TINY, "--batch", "4", "--out", str(out)]) == 0
    code, err = run_until("sample-between-files", [*SAMPLE, "--batch", "1", "--out", str(out)], tmp_path,
                          sig=signal.SIGINT)
    assert code == 130 and err.strip().splitlines()[-1] == "fastdiff sample: interrupted"
    assert "Traceback" not in err
    assert _output_set(out) == (4, 4)
    assert _temps(tmp_path) == [] and _temps(out) == []


SAVE_MODEL = """
import sys, torch
from fastdiff import pause
from fastdiff.models import folders
from fastdiff.cli import main
from fastdiff.engines.cache import ArtifactCache
from fastdiff.models.unet import UNet, UNetConfig
torch.manual_seed(1)
folders.save_model(UNet(UNetConfig.tiny(image_size=8, in_channels=1)), sys.argv[1], schedule="cosine", num_timesteps=500)
"""
TINY_MODEL = dict(image_size=8, in_channels=1)


@pytest.mark.parametrize("point", ["atomic-write", "model-weights-written", "folder-staged"])
def test_killed_save_model_leaves_the_old_folder(tmp_path, point):
    from fastdiff.models.unet import UNet, UNetConfig

    folder = folders.save_model(UNet(UNetConfig.tiny(**TINY_MODEL)), tmp_path / "model")
    old_weights = (folder / folders.WEIGHTS_FILE).read_bytes()
    code, _ = run_until(point, [sys.executable, "-c", SAVE_MODEL, str(folder)], tmp_path)
    assert code == -signal.SIGKILL
    _, info = folders.load_model(folder)  # loads, with its own schedule
    assert (info.schedule, info.num_timesteps) == ("linear", 1000)
    assert (folder / folders.WEIGHTS_FILE).read_bytes() == old_weights
    folders.save_model(UNet(UNetConfig.tiny(**TINY_MODEL)), folder, schedule="cosine", num_timesteps=500)
    _, info = folders.load_model(folder)
    assert (info.schedule, info.num_timesteps) == ("cosine", 500)
    assert _temps(tmp_path) == [] and _temps(folder) == []


TRAIN = """
import sys, torch
from fastdiff.training.trainer import TrainConfig, Trainer
from fastdiff.models.unet import UNetConfig
trainer = Trainer(UNetConfig.tiny(image_size=8, in_channels=1), TrainConfig(steps=int(sys.argv[2]), batch_size=2),
                  torch.linspace(-1, 1, 256).reshape(4, 1, 8, 8))
if len(sys.argv) > 3:
    trainer.load_checkpoint(sys.argv[1])
trainer.train(checkpoint_dir=sys.argv[1], checkpoint_every=1)
"""


def _train(folder, steps: int, resume: bool):
    import torch

    from fastdiff.models.unet import UNetConfig
    from fastdiff.training.trainer import TrainConfig, Trainer

    trainer = Trainer(UNetConfig.tiny(**TINY_MODEL), TrainConfig(steps=steps, batch_size=2),
                      torch.linspace(-1, 1, 256).reshape(4, 1, 8, 8))
    if resume:
        trainer.load_checkpoint(folder)
    trainer.train(checkpoint_dir=folder, checkpoint_every=1)


def test_killed_checkpoint_write_keeps_the_last_good_checkpoint(tmp_path):
    folder = tmp_path / "train"
    _train(folder, 1, resume=False)
    code, _ = run_until("atomic-write", [sys.executable, "-c", TRAIN, str(folder), "2", "resume"], tmp_path)
    assert code == -signal.SIGKILL
    _, metadata = read_checkpoint(folder / CHECKPOINT_FILE)
    assert metadata["step"] == "1"
    assert len(_temps(folder)) == 1  # the killed write's temp (a full checkpoint)...
    _train(folder, 2, resume=True)
    assert read_checkpoint(folder / CHECKPOINT_FILE)[1]["step"] == "2"
    assert _temps(folder) == []  # ...is removed by the next run that writes there


@pytest.mark.parametrize("point", ["atomic-write", "folder-staged"])
def test_killed_compile_leaves_no_cache_entry(tmp_path, point):
    pytest.importorskip("openvino")  # the engine that compiles the tiny model in seconds
    cache = tmp_path / "cache"
    compile_tiny = ["compile", "--config", "tiny", "--steps", "1", "--batch", "2", "--dtype", "bfloat16",
                    "--engine", "openvino", "--threads", "1", "--cache-dir", str(cache)]
    code, _ = run_until(point, [sys.executable, "-m", "fastdiff.cli", *compile_tiny], tmp_path)
    assert code == -signal.SIGKILL
    assert ArtifactCache(cache).entries() == []  # the manifest or the whole folder never got in place
    assert _temps(cache)  # the killed build's temp folder...
    assert main(compile_tiny) == 0
    assert [e.kind for e in ArtifactCache(cache).entries()] == ["openvino-ir", "openvino"]
    assert _temps(cache) == []  # ...went with the next build
