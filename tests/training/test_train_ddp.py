"""Data-parallel training: 2 Gloo processes (DistributedDataParallel, the global batch split by
rank) give the weights of 1 process with the same global batch, and resume exactly."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fastdiff.models.unet import UNetConfig
from fastdiff.scale.distributed import World, join, leave
from fastdiff.training.trainer import TrainConfig, Trainer, read_checkpoint

STEPS = 4


def _trainer(world: World) -> Trainer:
    data = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    config = TrainConfig(steps=STEPS, batch_size=4, lr=1e-3, lr_warmup_steps=0, seed=3)
    return Trainer(UNetConfig.tiny(image_size=8, in_channels=1), config, data, world=world)


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {**{f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()},
            **{f"ema.{k}": v.clone() for k, v in trainer.ema.state_dict().items()}}


def _ddp_worker(rank: int, world_size: int, port: int, out: str):
    # The environment torchrun sets: fastdiff.scale.distributed.join() initialises the Gloo group from it.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = join()
    try:
        whole = _trainer(world)
        whole.train()
        torch.save(_weights(whole), f"{out}/whole-rank{rank}.pt")

        first = _trainer(world)
        first.train(until=STEPS // 2, checkpoint_dir=f"{out}/checkpoint")
        world.barrier()  # rank 0's checkpoint is on disk before anyone reads it
        resumed = _trainer(world)
        resumed.load_checkpoint(f"{out}/checkpoint")
        resumed.train()
        torch.save(_weights(resumed), f"{out}/resumed-rank{rank}.pt")
    finally:
        leave()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_and_resume_exactly(tmp_path):
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    two = [torch.load(tmp_path / f"whole-rank{r}.pt") for r in range(2)]
    resumed = torch.load(tmp_path / "resumed-rank0.pt")
    one = _trainer(World())
    one.train()
    expected = _weights(one)

    for name, value in expected.items():
        assert torch.equal(two[0][name], two[1][name]), f"{name}: the replicas drifted apart"
        # Same global batch, same noise; only the all-reduce's fp32 summation order differs, and
        # AdamW's g / sqrt(v) amplifies that for near-zero gradients: allow a tenth of one step
        # (lr 1e-3). A wrong split or unsynchronised gradients move most weights by ~lr.
        torch.testing.assert_close(two[0][name], value, rtol=0, atol=1e-4, msg=name)
        assert (two[0][name] - value).abs().mean() < 1e-5, f"{name}: more than reduction-order noise"
        assert torch.equal(resumed[name], two[0][name]), f"{name}: resumed run differs from the uninterrupted one"
    assert not torch.equal(expected["model.conv_in.weight"], _weights(_trainer(World()))["model.conv_in.weight"])

    # Only rank 0 wrote the checkpoint, and it records the world size.
    _, metadata = read_checkpoint(tmp_path / "checkpoint")
    assert (metadata["step"], metadata["world_size"]) == (str(STEPS // 2), "2")
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["checkpoint.safetensors"]


def test_global_batch_must_split_evenly():
    with pytest.raises(ValueError, match="batch_size 4 must be a multiple of the 3 processes"):
        _trainer(World(rank=0, size=3))
