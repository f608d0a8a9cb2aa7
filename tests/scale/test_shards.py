"""Large-N sharded sampling (fastdiff.scale.shards): per-image noise, 2 Gloo processes == 1 process,
a killed rank resumed, corrupt shards redone, bad input refused."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastdiff.cli import main
from fastdiff.models.folders import random_init_model
from fastdiff.models.unet import UNetConfig
from fastdiff.scale import shards
from fastdiff.scale.distributed import World, join
from fastdiff.schedulers import make_schedule, step_table

NUM_IMAGES, SHARD_SIZE, SEED = 10, 2, 7  # 5 shards: rank 0 of 2 owns 0, 2, 4; rank 1 owns 1, 3


def _model_and_table():
    model, _ = random_init_model(UNetConfig.tiny(image_size=8, in_channels=1))
    # DDIM with eta 1 adds z at every step but the last, so the per-step noise matters.
    return model, step_table(make_schedule("linear", 1000), "ddim", steps=3, eta=1.0)


def _sample(out, world=None, **options):
    model, table = _model_and_table()
    options = {"shard_size": SHARD_SIZE, "seed": SEED, "progress": False, **options}
    with _one_thread():
        return shards.sample_model(model, table, out, NUM_IMAGES, world=world, **options)


class _one_thread:
    """Every process of these tests runs one torch thread, as torchrun's default does."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def _rank_worker(rank: int, world_size: int, rendezvous: str, out: str, kill_at_shard: int | None):
    if kill_at_shard is not None and rank == 1:
        os.environ[shards.KILL_ENV] = str(kill_at_shard)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        _sample(out, world=join(), merge=True)
    finally:
        dist.destroy_process_group()


def _run_two_ranks(tmp_path: Path, out: Path, kill_at_shard: int | None = None) -> None:
    rendezvous = tmp_path / f"rendezvous-{out.name}"
    mp.start_processes(_rank_worker, args=(2, str(rendezvous), str(out), kill_at_shard), nprocs=2,
                       start_method="spawn")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One process, all shards: the set every other run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("one-process") / "run"
    result = _sample(out, merge=True)
    assert (result.shards_sampled, result.shards_skipped, result.world_size) == (5, 0, 1)
    return out, shards.load_images(out)


def test_image_noise_depends_only_on_seed_and_index():
    _, table = _model_and_table()
    whole = shards.image_noise(table, 0, 6, (1, 8, 8), seed=3)
    part = shards.image_noise(table, 4, 2, (1, 8, 8), seed=3)
    torch.testing.assert_close(part.x_T, whole.x_T[4:6], rtol=0, atol=0)
    torch.testing.assert_close(part.z, whole.z[:, 4:6], rtol=0, atol=0)
    other_seed = shards.image_noise(table, 4, 2, (1, 8, 8), seed=4)
    assert not torch.equal(other_seed.x_T, part.x_T)
    # x_T and the z of every step are distinct draws.
    draws = torch.cat([whole.x_T[None], whole.z]).flatten(1)
    assert torch.corrcoef(draws).fill_diagonal_(0).abs().max() < 0.2
    # Each step's z is drawn when asked for, the same as the whole draw.
    torch.testing.assert_close(part.step_noise(2), whole.z[2, 4:6], rtol=0, atol=0)


def test_per_step_noise_is_drawn_only_when_a_step_asks():
    from fastdiff.sampling import ExternalNoise

    calls = []

    def draw(step):
        calls.append(step)
        return torch.full((2, 1, 4, 4), float(step))

    noise = ExternalNoise.drawn_per_step(torch.zeros(2, 1, 4, 4), 1000, draw)
    assert calls == [] and noise.num_steps == 1000
    assert torch.equal(noise.step_noise(7), torch.full((2, 1, 4, 4), 7.0)) and calls == [7]
    assert torch.equal(noise.to(dtype=torch.float64).step_noise(3), torch.full((2, 1, 4, 4), 3.0, dtype=torch.float64))


def test_two_processes_equal_one_process_bit_for_bit(tmp_path, uninterrupted):
    reference_out, reference = uninterrupted
    out = tmp_path / "two"
    _run_two_ranks(tmp_path, out)
    np.testing.assert_array_equal(shards.load_images(out), reference)
    manifest, reference_manifest = (json.loads((d / "manifest.json").read_text()) for d in (out, reference_out))
    assert manifest["world_size"] == 2
    assert manifest["images_sha256_of_shards"] == reference_manifest["images_sha256_of_shards"]
    with np.load(out / "images.npz") as merged:
        np.testing.assert_array_equal(merged["images"], reference)
    pngs = sorted(p.name for p in (out / "shards").glob("*/*.png"))
    assert pngs == [f"{i:07d}.png" for i in range(NUM_IMAGES)]


def test_killed_rank_is_resumed_with_nothing_lost_or_doubled(tmp_path, uninterrupted):
    _, reference = uninterrupted
    out = tmp_path / "killed"
    with pytest.raises(mp.ProcessExitedException):
        _run_two_ranks(tmp_path, out, kill_at_shard=3)  # rank 1 dies writing its second shard
    assert not (out / "manifest.json").exists(), "an interrupted run must not look finished"
    done = {p.name for p in (out / "shards").iterdir() if p.name.isdigit()}
    assert "00001" in done and "00003" not in done
    assert list((out / "shards").glob(".00003.*.tmp")), "the kill should leave shard 3 half-written"
    kept = {name: (out / "shards" / name / "shard.json").stat().st_mtime_ns for name in done}

    result = _sample(out, merge=True)  # resumed with another world size: one process
    assert result.shards_skipped == len(done) and result.shards_sampled == 5 - len(done)
    assert result.shards_redone == 0
    for name, mtime in kept.items():  # verified shards are kept, not rewritten
        assert (out / "shards" / name / "shard.json").stat().st_mtime_ns == mtime
    assert not list((out / "shards").glob(".*.tmp"))
    np.testing.assert_array_equal(shards.load_images(out), reference)
    manifest = json.loads((out / "manifest.json").read_text())
    indices = [i for entry in manifest["shards"] for i in range(entry["start"], entry["stop"])]
    assert indices == list(range(NUM_IMAGES))


def test_corrupt_shards_are_detected_and_redone(tmp_path, uninterrupted):
    _, reference = uninterrupted
    out = tmp_path / "corrupt"
    _sample(out)
    png = out / "shards" / "00001" / "0000002.png"
    png.write_bytes(png.read_bytes()[:-1] + bytes([png.read_bytes()[-1] ^ 1]))
    (out / "shards" / "00002" / "images.npz").write_bytes(b"truncated")
    (out / "shards" / "00004" / "0000009.png").unlink()
    assert shards.verify_shard(out / "shards" / "00001", 2, 4, "ignored") is not None

    result = _sample(out)
    assert (result.shards_redone, result.shards_sampled, result.shards_skipped) == (3, 3, 2)
    np.testing.assert_array_equal(shards.load_images(out), reference)


def test_a_folder_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "run"
    _sample(out)
    for change in ({"seed": SEED + 1}, {"shard_size": 3}):
        with pytest.raises(ValueError, match="other settings.*" + next(iter(change))):
            _sample(out, **change)
    assert json.loads((out / "run.json").read_text())["seed"] == SEED


@pytest.mark.parametrize(
    ("num_images", "shard_size", "message"),
    [(0, 2, "num_images must be an integer >= 1"), (4, 0, "shard_size must be an integer >= 1")],
)
def test_bad_sizes_are_refused(tmp_path, num_images, shard_size, message):
    model, table = _model_and_table()
    with pytest.raises(ValueError, match=message):
        shards.sample_model(model, table, tmp_path / "x", num_images, shard_size=shard_size, world=World())
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-images", "0"], "--num-images: must be >= 1"),
        (["--num-images", "4", "--shard-size", "0"], "--shard-size: must be >= 1"),
        (["--num-images", "4", "--seed", "1"], "other settings"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    common = ["sample", "--config", "tiny", "--steps", "1", "--no-progress", "--out", str(out)]
    assert main(common + ["--num-images", "4", "--shard-size", "3"]) == 0
    assert main(common + argv) == 2
    assert message in capsys.readouterr().err
