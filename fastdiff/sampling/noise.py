"""All the randomness of one sampling run: :class:`ExternalNoise` (x_T and one z per step) and
:func:`draw_noise`, which draws it from a seed a step at a time, bit for bit as one
``torch.randn((S, *shape))`` would. The accelerated sampler can be fed the very same numbers
as the reference loop and compared with it."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fastdiff.sampling.inputs import check_shape
from fastdiff.schedulers import StepTable


class ExternalNoise:
    """Every random number one sampling run uses.

    ``x_T``: (B, C, H, W), the starting noise; ``z``: (S, B, C, H, W), the noise added at step
    ``i`` (multiplied by that step's sigma, which is 0 at the last DDPM step); ``step_noise(i)``
    is ``z[i]`` alone. Noise from :func:`draw_noise` is drawn a step at a time when asked for,
    so a run holds one step's z, not S of them (reading ``z`` draws and keeps them all).
    """

    def __init__(self, x_T: torch.Tensor, z: torch.Tensor | None = None, *, _stream: _NoiseStream | None = None,
                 _device=None, _dtype: torch.dtype | None = None):
        if not isinstance(x_T, torch.Tensor) or x_T.dim() != 4:
            raise ValueError(f"noise.x_T must be (B, C, H, W), got {_shape_text(x_T)}")
        if (z is None) == (_stream is None):
            raise ValueError("noise.z must be given: a (steps, B, C, H, W) tensor")
        if z is not None and (not isinstance(z, torch.Tensor) or z.dim() != 5 or z.shape[1:] != x_T.shape):
            raise ValueError(
                f"noise.z must be (steps, *x_T.shape) = (S, {', '.join(map(str, x_T.shape))}), got {_shape_text(z)}"
            )
        self.x_T, self._z, self._stream = x_T, z, _stream
        self._device, self._dtype = _device, _dtype

    @classmethod
    def drawn_per_step(cls, x_T: torch.Tensor, num_steps: int, draw_step: Callable[[int], torch.Tensor]) -> ExternalNoise:
        """Noise whose ``z[i]`` is ``draw_step(i)`` (shaped like x_T), called when a sampler asks
        for step i: a run holds one step's z at a time, however many steps it has."""
        return cls(x_T, _stream=_StepFunction(num_steps, draw_step))

    @property
    def num_steps(self) -> int:
        return self._z.shape[0] if self._z is not None else self._stream.num_steps

    @property
    def z(self) -> torch.Tensor:
        if self._z is None:
            self._z = self._stream.all().to(device=self._device, dtype=self._dtype)
        return self._z

    def step_noise(self, i: int) -> torch.Tensor:
        """z[i], (B, C, H, W); drawn now (in step order, that costs nothing extra) unless ``z`` is held."""
        if self._z is not None:
            return self._z[i]
        return self._stream.step(i).to(device=self._device, dtype=self._dtype)

    @property
    def per_step(self) -> _PerStep:
        """``z`` as loops index it (``per_step[i]``), each step drawn when asked for."""
        return _PerStep(self)

    def to(self, device=None, dtype=None) -> ExternalNoise:
        x_T = self.x_T.to(device=device, dtype=dtype)
        if self._z is not None:
            return ExternalNoise(x_T, self._z.to(device=device, dtype=dtype))
        return ExternalNoise(x_T, _stream=self._stream, _device=device if device is not None else self._device,
                             _dtype=dtype if dtype is not None else self._dtype)


class _PerStep:
    def __init__(self, noise: ExternalNoise):
        self._noise = noise

    def __len__(self) -> int:
        return self._noise.num_steps

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._noise.step_noise(i)


def _shape_text(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


class _StepFunction:
    """A stream whose step i is ``draw(i)`` (see :meth:`ExternalNoise.drawn_per_step`)."""

    def __init__(self, num_steps: int, draw: Callable[[int], torch.Tensor]):
        self.num_steps, self._draw = num_steps, draw

    def step(self, i: int) -> torch.Tensor:
        return self._draw(i)

    def all(self) -> torch.Tensor:
        return torch.stack([self._draw(i) for i in range(self.num_steps)])


class _NoiseStream:
    """``torch.randn((S, *shape), generator)`` handed out one step at a time, bit for bit.

    torch's CPU normal sampler (tensors of >= 16 floats) draws one uniform per element, turns
    each aligned block of 16 into normals (Box-Muller on pairs i, i+8) and, when the size is
    not a multiple of 16, draws 16 more uniforms and rewrites the last 16 values. Drawing the
    blocks a step needs with ``randn(k * 16)`` consumes and transforms the same uniforms, so
    the values equal the slice of the whole tensor; the tail is redrawn the same way at the end.
    """

    BLOCK = 16

    def __init__(self, generator: torch.Generator, num_steps: int, shape: tuple[int, ...]):
        self.num_steps, self.shape = num_steps, tuple(shape)
        self.per_step = math.prod(shape)
        self.total = num_steps * self.per_step
        self._start_state = generator.get_state()
        self._restart()

    def all(self) -> torch.Tensor:
        return torch.randn((self.num_steps, *self.shape), generator=self._fresh_generator())

    def step(self, i: int) -> torch.Tensor:
        if self._whole is not None:
            return self._whole[i]
        if i < self._next_step:  # out of order: draw again from the start
            self._restart()
        while self._next_step < i:
            self._draw_next()
        return self._draw_next()

    def _fresh_generator(self) -> torch.Generator:
        return torch.Generator(device="cpu").set_state(self._start_state)

    def _restart(self) -> None:
        self._generator = self._fresh_generator()
        self._next_step, self._blocks_drawn, self._last_block = 0, 0, None
        # Fewer than 16 floats a step: drawn whole as before (the elementwise path, a few KB).
        self._whole = self.all() if self.per_step < self.BLOCK else None

    def _draw_next(self) -> torch.Tensor:
        block, i = self.BLOCK, self._next_step
        start, end = i * self.per_step, (i + 1) * self.per_step
        full_blocks = self.total // block
        first_block, last_block = start // block, min((end - 1) // block, full_blocks - 1)
        parts, first_needed = [], first_block
        if self._last_block is not None and first_block == self._blocks_drawn - 1:
            parts.append(self._last_block)  # the block this step shares with the one before
            first_needed = self._blocks_drawn
        if last_block + 1 > first_needed:
            fresh = torch.randn((last_block + 1 - first_needed) * block, generator=self._generator)
            parts.append(fresh)
            self._blocks_drawn, self._last_block = last_block + 1, fresh[-block:]
        values = torch.cat(parts)[start - first_block * block:]
        if i == self.num_steps - 1 and self.total % block:
            covered = full_blocks * block
            torch.rand(self.total - covered, generator=self._generator)  # the partial block's uniforms
            values = torch.cat([values[: covered - start], torch.empty(self.total - covered)])
            values[-block:] = torch.randn(block, generator=self._generator)  # torch's redrawn last 16
        self._next_step += 1
        return values[: end - start].reshape(self.shape)


def draw_noise(
    table: StepTable, shape, seed: int, device="cpu", dtype: torch.dtype = torch.float32
) -> ExternalNoise:
    """x_T and the per-step z for ``table``, from a CPU ``torch.Generator`` seeded with ``seed``.

    Drawn on the CPU and then moved, so the same seed gives the same numbers on every device.
    x_T is drawn now, each z when a sampler asks for it (:meth:`ExternalNoise.step_noise`): the
    values are those of ``torch.randn((S, *shape))`` after x_T, without holding all S at once.
    """
    shape = check_shape(shape)
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if not -(2**63) <= int(seed) < 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"seed must be in [-2**63, 2**64), got {int(seed)}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    x_T = torch.randn(shape, generator=generator, dtype=torch.float32)
    stream = _NoiseStream(generator, table.num_steps, shape)
    return ExternalNoise(x_T.to(device=device, dtype=dtype), _stream=stream, _device=device, _dtype=dtype)
