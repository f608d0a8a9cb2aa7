"""Will a sampling run fit? An estimate of its peak memory, checked before any work starts.

The estimate is deliberately simple and on the safe side: the weights, plus per image the
UNet's kept skip connections, a working set of a few of its largest feature maps, the
attention scores at the attention resolutions, and the sampler's own per-step tensors (x_t,
eps, x0, z, x_prev). Noise is drawn a step at a time (:func:`fastdiff.sampling.draw_noise`),
so the number of steps does not enter it. Scaled by :data:`SAFETY` from measured peaks.
"""
from __future__ import annotations

import math
import os

GIB = 2**30
#: Per-step tensors of the sampler loop, each one image large: x_t, eps, x0, z, x_prev, the model input.
SAMPLER_TENSORS = 6
#: Largest feature maps alive at once inside a block (input, norm, conv, residual, concatenated skip).
WORKING_MAPS = 6
#: Measured peak RSS growth / the count above, eager fp32 forward on CPU: 1.2-1.25 (digits, batch
#: 512), 1.36-1.65 (CIFAR-10, batch 8; runs vary): allocator slack, convolution workspaces.
SAFETY = 2.0


def activation_floats_per_image(config) -> int:
    """Floats one image needs at the forward pass's peak, for a :class:`fastdiff.models.unet.UNetConfig`."""
    skips, largest, attention = config.ch * config.image_size**2, 0, 0
    for level, mult in enumerate(config.ch_mult):
        size = config.image_size // 2**level
        channels = config.ch * mult
        skips += (config.num_res_blocks + 1) * channels * size**2
        largest = max(largest, 2 * channels * size**2)  # the up path concatenates a skip
        if size in config.attn_resolutions:
            attention = max(attention, config.num_heads * size**4)
    images = config.in_channels * config.image_size**2
    return math.ceil(SAFETY * (skips + WORKING_MAPS * largest + attention + SAMPLER_TENSORS * images))


def sampling_bytes(config, batch: int, parameters: int, bytes_per_float: int = 4) -> int:
    """Estimated peak bytes of sampling ``batch`` images with a model of ``parameters`` weights."""
    return bytes_per_float * (parameters + batch * activation_floats_per_image(config))


def available_bytes(device: str) -> int | None:
    """Memory free for a run on ``device`` now (None where it cannot be told)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(config, batch: int, parameters: int, device: str, flag: str = "--batch", processes: int = 1) -> None:
    """MemoryError with a hint naming ``flag`` (the option that sets the batch) when the estimate
    passes the memory available (split evenly between ``processes`` sharing it)."""
    available = available_bytes(device)
    if available is None:
        return
    available //= processes
    needed = sampling_bytes(config, batch, parameters)
    if needed <= available:
        return
    per_image = sampling_bytes(config, 1, 0)
    fitting = (available - sampling_bytes(config, 0, parameters)) // per_image
    hint = (f"try {flag} {fitting} or less" if fitting >= 1
            else f"even one {config.image_size}x{config.image_size} image needs ~{_gib(per_image)}")
    raise MemoryError(
        f"a batch of {batch} needs about {_gib(needed)} on {device} and {_gib(available)} is available: {hint}"
    )


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{math.ceil(n / 2**20)} MiB"
