"""Kernel microbenchmarks: each fastdiff op vs its eager reference and its torch.compile'd
reference, at the Ho CIFAR-10 UNet's shapes, reported as GB/s (norm, step, q-sample) or
TFLOP/s (attention) in each benchmark's ``extra_info``.

    pytest benchmarks/ --benchmark-columns=median,iqr --benchmark-sort=name

Two comparisons exist to be run on the first GPU, where fastdiff picks a route by default rather
than by measurement (``-k "routes or split"``; skipped without a GPU):

- attention: the fastdiff Triton kernel against ``F.scaled_dot_product_attention`` restricted to
  its FlashAttention-2 backend, at the head dims both take (the op routes D <= 256 in fp16/bf16 to
  SDPA until this says otherwise; ``fastdiff.ops.attention.flash_takes``);
- GroupNorm at batch 1 and 8, channels_last and contiguous: one program per (sample, group) against
  the split-group path (``fastdiff.kernels.group_norm.slices_per_group`` picks it below 2 programs per SM).

The ``fastdiff`` attention rows record the route the op took in ``extra_info["route"]``.

On a GPU the fastdiff ops run their Triton kernels and are timed with
``triton.testing.do_bench`` (CUDA events, cache flushed between calls); the pytest-benchmark
row beside it times synchronized host calls. On a CPU no Triton kernel runs: fastdiff's ops
dispatch to the eager reference there, so the "fastdiff" row measures that dispatch, and
``extra_info["timed"]`` says so. CPU batch sizes are small so the file runs in about 1-2 minutes.
"""
from __future__ import annotations

import functools
import math
import os

import pytest
import torch

from fastdiff import ops
from fastdiff.ops import reference
from fastdiff.ops.attention import flash_takes, route, sdpa_flash
from fastdiff.ops.backend import kernel_path
from fastdiff.schedulers import linear_schedule, step_table

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
IMPLS = ("fastdiff", "eager", "compiled")
DTYPES = (torch.float32, torch.bfloat16) if ON_GPU else (torch.float32,)

# Batch sizes: a serving-size batch on a GPU, moderate on a CPU (the file must stay ~1-2 min).
NORM_BATCH, ATTN_BATCH, STEP_BATCH = (64, 64, 256) if ON_GPU else (4, 2, 32)

# (channels, height, width) of the Ho UNet's GroupNorms: stem level, 16x16 level, up-path concat.
NORM_SHAPES = {"C128@32x32": (128, 32, 32), "C256@16x16": (256, 16, 16), "C384@16x16": (384, 16, 16)}
# (heads, positions, head dim): attention at 16x16 (N=256) and in the 4x4 mid block, one head of 256.
ATTN_SHAPES = {"16x16-N256-D256": (1, 256, 256), "mid-4x4-N16-D256": (1, 16, 256)}


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _randn(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen()).to(DEVICE, dtype)


def _unique_bytes(tensors) -> int:
    """Bytes moved: every distinct tensor read or written, counted once."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _implementation(impl: str, op_name: str):
    if impl == "fastdiff":
        return getattr(ops, op_name)
    if impl == "eager":
        return getattr(reference, op_name)
    return _compiled(getattr(reference, op_name))


def _timed_what(impl: str) -> str:
    if impl == "fastdiff":
        path = kernel_path(DEVICE)
        return "Triton kernel" if path == "triton" else f"fastdiff op dispatching to the eager reference ({path} path)"
    return {"eager": "eager PyTorch reference", "compiled": "torch.compile(reference), inductor default mode",
            "diffusers": "diffusers' own scheduler step"}[impl]


def _measure(benchmark, fn, *, bytes_moved: int | None = None, flops: int | None = None) -> None:
    """Time ``fn`` and put GB/s or TFLOP/s (median) in the benchmark's extra_info."""
    fn()  # first call compiles / autotunes: never timed
    if ON_GPU:
        import triton.testing

        median_ms, p20_ms, p80_ms = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        benchmark.extra_info.update(timer="triton.testing.do_bench", median_ms=median_ms, p20_ms=p20_ms, p80_ms=p80_ms)

        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=20, warmup_rounds=2)
        seconds = median_ms / 1000
    else:
        benchmark.pedantic(fn, rounds=15, warmup_rounds=1)
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: ran once, nothing measured
            return
        seconds = stats.stats.median
        benchmark.extra_info.update(timer="pytest-benchmark (host clock)", median_ms=seconds * 1000)
    if bytes_moved is not None:
        benchmark.extra_info["GB/s"] = bytes_moved / seconds / 1e9
    if flops is not None:
        benchmark.extra_info["TFLOP/s"] = flops / seconds / 1e12


def _label(benchmark, impl: str, dtype: torch.dtype, shape) -> None:
    benchmark.extra_info.update(device=str(DEVICE), timed=_timed_what(impl), dtype=str(dtype).removeprefix("torch."),
                                shape=list(shape), torch_threads=torch.get_num_threads(),
                                loadavg_1m=os.getloadavg()[0])  # shared machines: read figures with the load
    if ON_GPU:
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES.values(), ids=NORM_SHAPES.keys())
def test_group_norm_silu(benchmark, impl, dtype, shape):
    benchmark.group = f"group_norm_silu {shape}"
    x = _randn(NORM_BATCH, *shape, dtype=dtype)
    weight, bias = _randn(shape[0], dtype=dtype), _randn(shape[0], dtype=dtype)
    fn = _implementation(impl, "group_norm_silu")
    out = fn(x, weight, bias, 32, 1e-6, True)
    _label(benchmark, impl, dtype, x.shape)
    _measure(benchmark, lambda: fn(x, weight, bias, 32, 1e-6, True), bytes_moved=_unique_bytes([x, weight, bias, out]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES.values(), ids=ATTN_SHAPES.keys())
def test_attention(benchmark, impl, dtype, shape):
    heads, n, d = shape
    benchmark.group = f"attention N={n} D={d}"
    q, k, v = (_randn(ATTN_BATCH, heads, n, d, dtype=dtype) * (i + 1) for i in range(3))
    fn = _implementation(impl, "attention")
    scale = 1.0 / math.sqrt(d)
    _label(benchmark, impl, dtype, q.shape)
    if impl == "fastdiff":
        benchmark.extra_info["route"] = route(q, k, v)
    _measure(benchmark, lambda: fn(q, k, v, scale), flops=4 * ATTN_BATCH * heads * n * n * d)


# (heads, positions, head dim) both the fastdiff kernel and FlashAttention-2 take, and D=512 (the
# 256x256 DDPMs), which only the kernel takes.
ROUTE_SHAPES = {"32x32-N1024-D64x4": (4, 1024, 64), "32x32-N1024-D128x2": (2, 1024, 128),
                "16x16-N256-D256": (1, 256, 256), "16x16-N256-D512": (1, 256, 512)}


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="compares two GPU implementations")
@pytest.mark.parametrize("impl", ("fastdiff-kernel", "sdpa-flash"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", ROUTE_SHAPES.values(), ids=ROUTE_SHAPES.keys())
def test_attention_routes(benchmark, impl, dtype, shape):
    from fastdiff.kernels.attention import attention as kernel

    heads, n, d = shape
    if impl == "sdpa-flash" and not flash_takes(dtype, d, True, torch.cuda.get_device_capability(DEVICE)):
        pytest.skip(f"FlashAttention-2 does not take D={d} {dtype} here")
    benchmark.group = f"attention routes N={n} D={d} {dtype}"
    q, k, v = (_randn(ATTN_BATCH, heads, n, d, dtype=dtype) * (i + 1) for i in range(3))
    fn = kernel if impl == "fastdiff-kernel" else sdpa_flash
    scale = 1.0 / math.sqrt(d)
    _label(benchmark, "fastdiff", dtype, q.shape)
    benchmark.extra_info["timed"] = impl
    _measure(benchmark, lambda: fn(q, k, v, scale), flops=4 * ATTN_BATCH * heads * n * n * d)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="the split-group policy depends on the GPU's SM count")
@pytest.mark.parametrize("path", ("one program per group", "split groups"))
@pytest.mark.parametrize("layout", ("channels_last", "contiguous"))
@pytest.mark.parametrize("batch", (1, 8))
@pytest.mark.parametrize("shape", NORM_SHAPES.values(), ids=NORM_SHAPES.keys())
def test_group_norm_split(benchmark, path, layout, batch, shape):
    from fastdiff.kernels import group_norm as gn

    benchmark.group = f"group_norm_silu paths ({batch}, {shape}) bf16 {layout}"
    channels_last = layout == "channels_last"
    x = _randn(batch, *shape, dtype=torch.bfloat16)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    weight, bias = _randn(shape[0], dtype=torch.bfloat16), _randn(shape[0], dtype=torch.bfloat16)
    # sm_count=1: 32 groups are >= 2 programs per SM, so one program per group; a large count
    # makes the policy split every group into as many slices as it has tiles.
    sm_count = 1 if path == "one program per group" else 10**6
    plan = gn.plan(batch, shape[0], shape[1] * shape[2], 32, 2, channels_last, sm_count)
    if path == "split groups" and plan.slices == 1:
        pytest.skip("a group of one tile is never split")
    out = gn.group_norm_silu(x, weight, bias, 32, 1e-6, True, sm_count=sm_count)
    _label(benchmark, "fastdiff", torch.bfloat16, x.shape)
    policy = gn.plan(batch, shape[0], shape[1] * shape[2], 32, 2, channels_last, gn.device_sm_count(DEVICE)).slices
    benchmark.extra_info.update(timed=path, layout=layout, slices=plan.slices, policy_slices_on_this_gpu=policy)
    _measure(benchmark, lambda: gn.group_norm_silu(x, weight, bias, 32, 1e-6, True, sm_count=sm_count),
             bytes_moved=_unique_bytes([x, weight, bias, out]))


#: Step tables timed: DDPM (clipped x0, given noise) and UniPC of order 3 (four history slots, the corrector).
STEP_TABLES = {"ddpm": dict(method="ddpm", steps=100), "unipc-3": dict(method="unipc", steps=20, order=3)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("table_name", STEP_TABLES)
def test_sampler_step(benchmark, impl, table_name):
    table = step_table(linear_schedule(), **STEP_TABLES[table_name]).to(DEVICE)
    benchmark.group = f"sampler_step {table_name} (B,3,32,32)"
    x_t, eps, noise = (_randn(STEP_BATCH, 3, 32, 32) + i for i in range(3))
    history = table.new_history(x_t.shape, DEVICE)
    args = dict(noise=None if table.history_size else noise, clip_range=table.clip, history=history)
    step_index = torch.tensor(10, dtype=torch.int64, device=DEVICE)
    fn = _implementation(impl, "sampler_step")
    x_prev, x0 = fn(x_t, eps, step_index, table.coefs, **args)
    _label(benchmark, impl, torch.float32, x_t.shape)
    _measure(benchmark, lambda: fn(x_t, eps, step_index, table.coefs, **args),
             bytes_moved=_unique_bytes([x_t, eps, args["noise"], history, x_prev, x0]))


@pytest.mark.parametrize("impl", ["fastdiff", "diffusers"])
def test_unipc_scheduler_run(benchmark, impl):
    """A 10-step UniPC run of scheduler steps alone (the model's output given): diffusers'
    ``UniPCMultistepScheduler.step`` against the one fastdiff installs with ``accelerate``."""
    diffusers = pytest.importorskip("diffusers")
    from fastdiff import accelerate

    scheduler = diffusers.UniPCMultistepScheduler(solver_order=3)
    if impl == "fastdiff":
        scheduler = accelerate(scheduler)
    benchmark.group = "UniPC order 3, 10 scheduler steps (B,3,32,32)"
    x_T, eps = _randn(STEP_BATCH, 3, 32, 32), _randn(STEP_BATCH, 3, 32, 32) * 0.1

    def run():
        scheduler.set_timesteps(10, device=DEVICE)
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(eps, t, x).prev_sample
        return x

    _label(benchmark, impl, torch.float32, x_T.shape)
    _measure(benchmark, run)


@pytest.mark.parametrize("impl", IMPLS)
def test_q_sample(benchmark, impl):
    benchmark.group = "q_sample (B,3,32,32), noise given"
    x0, noise = _randn(STEP_BATCH, 3, 32, 32), _randn(STEP_BATCH, 3, 32, 32) + 1
    t = torch.randint(0, 1000, (STEP_BATCH,), generator=_gen()).to(DEVICE)
    coefs = linear_schedule().q_sample_table(DEVICE)
    fn = _implementation(impl, "q_sample")
    x_t, eps = fn(x0, t, coefs, noise=noise)
    _label(benchmark, impl, torch.float32, x0.shape)
    _measure(benchmark, lambda: fn(x0, t, coefs, noise=noise), bytes_moved=_unique_bytes([x0, t, noise, x_t, eps]))
