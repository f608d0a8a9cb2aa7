"""CUDA-graph replay of the sampling loop (GPU only).

One graph holds a whole sampling step -- the timestep gather, the UNet forward and the fused
step op -- and ends by writing x_{t-1} into its static input and adding 1 to the device step
index. Replaying it S times runs the sampler with no Python, no allocation and no host sync per
step: the only per-step host work is one device-to-device copy of the given noise z (external
noise mode); in Philox mode the kernel draws z keyed by the device step index and the device
``rng`` = [seed, offset], so a new seed is one in-place ``copy_`` before the loop.

Graphs are static in shape, so :class:`GraphCache` keeps one :class:`CapturedStep` per
:class:`GraphKey` (batch, image shape, model dtype, class conditioning, noise mode) and
captures a new one -- logging that it does -- when a call brings a new key. All graphs share
one memory pool: each graph's intermediates are scratch (the results live in static buffers
allocated outside the pool) and graphs never replay concurrently, so reuse between them is safe.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastdiff.ops import backend

logger = logging.getLogger(__name__)

NOISE_MODES = ("given", "philox")
#: Eager runs on a side stream before capture: the first compiles (torch.compile, Triton) and
#: lets the allocator and cuDNN/cuBLAS pick their workspaces, so nothing of that is captured.
WARMUP_RUNS = 2

#: ``step(x_t, step_index, noise, rng, class_labels[, history]) -> x_prev``: the step a graph
#: captures (``history`` only for multistep solvers).
StepFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class GraphKey:
    batch: int
    image_shape: tuple[int, ...]  # (C, H, W)
    dtype: torch.dtype  # the model's dtype (x_t stays float32)
    class_conditioned: bool
    noise: str  # "given" (z copied in per step) or "philox" (z drawn in-kernel)
    history: int = 0  # previous data predictions the step keeps (multistep solvers)

    def __str__(self) -> str:
        labels = ", class-conditioned" if self.class_conditioned else ""
        shape = "x".join(map(str, self.image_shape))
        return f"batch {self.batch} of {shape}, {str(self.dtype).removeprefix('torch.')}{labels}, {self.noise} noise"


class CapturedStep:
    """One captured step with its static buffers: ``x`` (B, C, H, W) float32, ``step_index``
    (int64, 0-dim), ``noise`` (like x, given mode), ``rng`` (int64 [seed, offset], Philox mode),
    ``class_labels`` (B,) int64 when class-conditioned, ``history`` (K, B, C, H, W) float32 when
    the step is multistep (zeroed before each run, updated in place by the step)."""

    def __init__(self, step: StepFn, key: GraphKey, device: torch.device, pool=None):
        if key.noise not in NOISE_MODES:
            raise ValueError(f"noise mode must be one of {NOISE_MODES}, got {key.noise!r}")
        self.key, self._step = key, step
        self.x = torch.zeros((key.batch, *key.image_shape), dtype=torch.float32, device=device)
        self.step_index = torch.zeros((), dtype=torch.int64, device=device)
        self.noise = torch.zeros_like(self.x) if key.noise == "given" else None
        self.rng = torch.zeros(2, dtype=torch.int64, device=device) if key.noise == "philox" else None
        self.class_labels = torch.zeros(key.batch, dtype=torch.int64, device=device) if key.class_conditioned else None
        self.history = torch.zeros((key.history, *self.x.shape), device=device) if key.history else None

        self.device = device
        # Warm-up and capture on one side stream *of this device*: torch.cuda.graph's default
        # capture stream is created once, on whichever device was current at the first capture.
        with backend.on_device(device):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self._body()
                    self.step_index.zero_()  # stay in range however short the table is
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool, stream=side):
                self._body()

    def _body(self) -> None:
        history = () if self.history is None else (self.history,)
        x_prev = self._step(self.x, self.step_index, self.noise, self.rng, self.class_labels, *history)
        self.x.copy_(x_prev)
        self.step_index.add_(1)

    def run(self, x_T: torch.Tensor, num_steps: int, z: torch.Tensor | None = None, rng: torch.Tensor | None = None,
            class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Replay ``num_steps`` steps from ``x_T``; every argument already on the device.
        ``z``: (num_steps, B, C, H, W) in given mode; ``rng``: [seed, offset] in Philox mode."""
        with backend.on_device(self.device):
            return self._run(x_T, num_steps, z, rng, class_labels)

    def _run(self, x_T, num_steps, z, rng, class_labels) -> torch.Tensor:
        self.x.copy_(x_T)
        self.step_index.zero_()
        if self.history is not None:
            self.history.zero_()
        if self.rng is not None:
            self.rng.copy_(rng)
        if self.class_labels is not None:
            self.class_labels.copy_(class_labels)
        for i in range(num_steps):
            if self.noise is not None:
                self.noise.copy_(z[i])
            self.graph.replay()
        return self.x.clone()


class GraphCache:
    """Captured steps by :class:`GraphKey`; a new key is captured on first use (and logged)."""

    def __init__(self, step: StepFn, device: torch.device | str):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self._step, self.device = step, device
        self._graphs: dict[GraphKey, CapturedStep] = {}
        self._pool = None

    @property
    def keys(self) -> list[GraphKey]:
        """The keys captured so far, in capture order."""
        return list(self._graphs)

    def get(self, key: GraphKey) -> CapturedStep:
        if key not in self._graphs:
            reason = "first capture" if not self._graphs else f"new shape (cached: {', '.join(map(str, self._graphs))})"
            logger.info("capturing a CUDA graph of the sampling step for %s (%s)", key, reason)
            captured = CapturedStep(self._step, key, self.device, self._pool)
            self._pool = self._pool or captured.graph.pool()
            self._graphs[key] = captured
        return self._graphs[key]
