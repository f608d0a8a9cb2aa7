"""The traffic report (fastdiff.bench.traffic): inductor's kernels for one sampling step with the
CUDA-style lowering on this CPU. The bar: fastdiff's non-convolution bytes per step at most plain
torch.compile's, with no layout copies around the fused ops."""
import pickle
import subprocess
import sys

import pytest
import torch

from fastdiff.bench.traffic import H100_BYTES_PER_S, Kernel, Traffic, format_kernels, format_table

TINY_TRAFFIC = """
import pickle, sys, torch
from fastdiff.bench.traffic import step_traffic
from fastdiff.models.unet import UNet, UNetConfig
torch.manual_seed(0)
model = UNet(UNetConfig.tiny(image_size=8)).eval()
sys.stdout.buffer.write(pickle.dumps({route: step_traffic(model, route, batch=1) for route in ("torch.compile", "fastdiff")}))
"""


@pytest.fixture(scope="module")
def tiny_traffic():
    # A fresh process, as the report command runs: inductor registers its freezing patterns once
    # per process (fx_passes/freezing_patterns.py lazy_init), the oneDNN ones only if oneDNN is on
    # at that first freezing compile, and a later compile with oneDNN off still runs them. One plain Conv2d+SiLU freezing compile beforehand (no
    # fastdiff code) moves this tiny model's counts from 3 to 7 copies (torch.compile) and 3 to 8
    # (fastdiff); inside the suite, tests/engines/test_inductor.py's bf16 step did that.
    done = subprocess.run([sys.executable, "-c", TINY_TRAFFIC], capture_output=True, check=True, timeout=600)
    return pickle.loads(done.stdout)


def test_fastdiff_moves_no_more_non_convolution_bytes_than_plain_inductor(tiny_traffic):
    plain, fast = tiny_traffic["torch.compile"], tiny_traffic["fastdiff"]
    assert fast.non_conv_bytes <= plain.non_conv_bytes
    assert fast.copies <= plain.copies and len(fast.kernels) < len(plain.kernels)
    names = {k.name for k in fast.kernels}
    assert {"torch.ops.fastdiff.group_norm_silu.default", "torch.ops.fastdiff.attention.default"} <= names
    assert any(k.convolution for k in plain.kernels) and all(k.bytes >= 0 for k in fast.kernels)


def test_tables_list_every_kernel(tiny_traffic):
    fast = tiny_traffic["fastdiff"]
    table = format_table(list(tiny_traffic.values()), torch.bfloat16)
    assert "roofline model" in table and table.count("\n") == 3
    assert format_kernels(fast).count("\n") == len(fast.kernels) + 2


def test_roofline_model_takes_each_kernel_at_its_bound():
    memory_bound = Kernel("fused", int(H100_BYTES_PER_S * 1e-3), 0, False)  # 1 ms of bytes
    compute_bound = Kernel("extern_kernels.convolution", 0, int(989e12 * 2e-3), False)  # 2 ms of bf16 FLOPs
    traffic = Traffic("fastdiff", 1, [memory_bound, compute_bound])
    assert traffic.h100_ms(torch.bfloat16) == pytest.approx(3.0)
    assert traffic.non_conv_bytes == memory_bound.bytes and traffic.copies == 0
