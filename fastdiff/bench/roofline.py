"""How much work a sampling run does, and how much the device can do, both measured in the run.

The roof is the best of a large matmul and a large 3x3 convolution in the benchmark's dtype:
on CPUs the convolution (oneDNN) can beat the matmul (MKL on AMD), and a UNet is mostly
convolutions, so a matmul-only roof would let "% of roof" pass 100%.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from fastdiff.models.unet import SpatialSelfAttention

#: Vendor datasheet peaks (dense; HBM bytes/s, FLOP/s by dtype name): leads to put measured figures in
#: context, never measurements themselves.
DATASHEET = {
    "h100": {"bytes_per_s": 3.35e12, "float32": 67e12, "bfloat16": 989e12, "float16": 989e12},
    "h200": {"bytes_per_s": 4.8e12, "float32": 67e12, "bfloat16": 989e12, "float16": 989e12},
}

#: Problem sizes of the probes: large enough to reach the device's steady throughput.
#: "quick" keeps the CI smoke test fast; its roof is lower and the JSON records the sizes used.
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192, "quick": 512}
CONV_SHAPE = {"cpu": (8, 256, 32, 32), "cuda": (64, 512, 64, 64), "quick": (2, 64, 32, 32)}  # (B, C, H, W)
PROBE_REPEATS = {"cpu": 10, "cuda": 20, "quick": 3}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up call: a roof is a best case."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def measure_roof(device, dtype: torch.dtype, quick: bool = False) -> dict:
    """Achievable TFLOP/s of ``device`` in ``dtype``: matmul and conv probes, roof = the better."""
    device = torch.device(device)
    kind = "quick" if quick else ("cuda" if device.type == "cuda" else "cpu")
    gen = torch.Generator().manual_seed(0)
    n = MATMUL_SIZE[kind]
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    matmul_s = _best_seconds(lambda: a @ b, device, PROBE_REPEATS[kind])
    matmul_flops = 2 * n**3

    batch, channels, height, width = CONV_SHAPE[kind]
    x = torch.randn(batch, channels, height, width, generator=gen).to(device, dtype)
    w = torch.randn(channels, channels, 3, 3, generator=gen).to(device, dtype)
    conv_s = _best_seconds(lambda: F.conv2d(x, w, padding=1), device, PROBE_REPEATS[kind])
    conv_flops = 2 * batch * channels * channels * 9 * height * width

    matmul_tflops = matmul_flops / matmul_s / 1e12
    conv_tflops = conv_flops / conv_s / 1e12
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "matmul": {"shape": [n, n, n], "seconds": matmul_s, "tflops": matmul_tflops},
        "conv3x3": {"shape": [batch, channels, height, width], "seconds": conv_s, "tflops": conv_tflops},
        "roof_tflops": max(matmul_tflops, conv_tflops),
        "tf32_matmul": device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32,
    }


#: Bytes each side of the copy probe: well past any cache (the H200's L2 is 60 MB).
COPY_BYTES = {"cpu": 2**28, "cuda": 2**31, "quick": 2**23}


@torch.no_grad()
def measure_bandwidth(device, quick: bool = False) -> dict:
    """Achievable memory bandwidth of ``device``: the best device-to-device copy, bytes read + written."""
    device = torch.device(device)
    kind = "quick" if quick else ("cuda" if device.type == "cuda" else "cpu")
    source = torch.ones(COPY_BYTES[kind], dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = _best_seconds(lambda: target.copy_(source), device, PROBE_REPEATS[kind])
    return {"bytes_each_way": source.numel(), "seconds": seconds, "bytes_per_s": 2 * source.numel() / seconds}


def best_roof(before: dict, after: dict) -> dict:
    """One roof from the probes taken before and after the timed calls: the better of the two."""
    best = max((before, after), key=lambda probe: probe["roof_tflops"])
    return {**best, "probes_tflops": {"before": before["roof_tflops"], "after": after["roof_tflops"]}}


def attention_flops(channels: int, positions: int, batch: int) -> int:
    """QK^T and PV: 4 N^2 D per head, and heads x D = channels."""
    return 4 * batch * positions**2 * channels


@torch.no_grad()
def count_forward_flops(model: torch.nn.Module, example: tuple) -> dict:
    """FLOPs of one ``model(*example)`` forward: torch's counter, with attention counted by hand.

    ``torch.utils.flop_counter`` counts 0 for CPU's fused SDPA kernel, so whatever it attributes
    to SDPA ops is replaced by 4 N^2 D per head for every SpatialSelfAttention call.
    """
    # only when FLOPs are counted
    from torch.utils.flop_counter import FlopCounterMode

    own_attention = 0

    def count_attention(module, inputs, output):
        nonlocal own_attention
        b, c, h, w = inputs[0].shape
        own_attention += attention_flops(c, h * w, b)

    hooks = [m.register_forward_hook(count_attention) for m in model.modules() if isinstance(m, SpatialSelfAttention)]
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(*example)
    finally:
        for hook in hooks:
            hook.remove()
    counted = counter.get_total_flops()
    global_counts = counter.get_flop_counts().get("Global", {})
    counted_sdpa = sum(n for op, n in global_counts.items() if "scaled_dot_product" in str(op))
    return {
        "total": counted - counted_sdpa + own_attention,
        "flop_counter_total": counted,
        "flop_counter_sdpa": counted_sdpa,
        "attention_by_hand": own_attention,
    }
