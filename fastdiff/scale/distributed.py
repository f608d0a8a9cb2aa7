"""The process group fastdiff runs in: PyTorch's own ``torch.distributed``, as ``torchrun`` sets it up.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` in the environment) :func:`join`
initialises the default group: NCCL when the process samples or trains on CUDA, Gloo on CPU.
A group the caller already initialised (any init method, e.g. ``file://`` in tests) is used as
it is. Without either, the run is one process of a world of one and nothing is initialised.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes (``local_rank`` on its node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that shows progress, writes logs, checkpoints and manifests."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def join(device: str | torch.device = "cpu") -> World:
    """The current :class:`World`: the initialised default group, or the one torchrun's
    environment describes (initialised here with NCCL for a CUDA ``device``, else Gloo), or a
    world of one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return World()
    if not dist.is_available():
        raise RuntimeError("launched by torchrun, but this torch build has no torch.distributed")
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def leave() -> None:
    """Destroy the default process group if there is one (at the end of a torchrun command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str):
    """For a command: yields (this process's device, its World); the group is left at the end."""
    device = rank_device(device)
    world = join(device)
    try:
        yield device, world
    finally:
        leave()


def rank_device(device: str) -> str:
    """``"cuda"`` -> this process's GPU (``cuda:LOCAL_RANK``) under torchrun; other names as given."""
    if device == "cuda" and launched_by_torchrun():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


__all__ = ["World", "join", "leave", "launched_by_torchrun", "process_group", "rank_device"]
