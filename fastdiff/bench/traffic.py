"""Memory traffic of one compiled sampling step, kernel by kernel, without a GPU.

    python -m fastdiff.bench.traffic [--config cifar10] [--batch 1 256] [--dtype bfloat16] [--kernels]

Compiles the sampling step (:class:`fastdiff.sampling.sampler.DenoiseStep`) twice with inductor and
weight freezing -- plain ``torch.compile`` of the model with the reference ops, and fastdiff's
accelerated model with the fused ops -- and reads inductor's scheduled kernels just before code
generation (nothing is generated or run). The lowering is made CUDA-like on this CPU: oneDNN is
off (convolutions are generic extern kernels, not mkldnn ones) and inductor's layout
optimisation is forced on, as freezing turns it on for CUDA (convolutions in channels_last).
Every kernel is listed with the bytes it reads and writes and its FLOPs (inductor's estimates;
the fused ops are opaque, so their FLOPs count 0 and their bytes are their inputs and outputs),
"copy" marks a kernel that only loads and stores (a layout or dtype-free copy).

The time column is a roofline **model** of an H100 SXM (HBM3 3.35 TB/s, 989 TFLOP/s dense
bf16 / 67 TFLOP/s fp32), one kernel at a time at its roof: an estimate, not a measurement.
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import torch

from fastdiff.bench.roofline import DATASHEET
from fastdiff.integrations.diffusers.accelerate import accelerate
from fastdiff.models.unet import UNet, preset_config
from fastdiff.ops import backend
from fastdiff.presets import DTYPE_NAMES, PRESETS
from fastdiff.sampling.placement import image_shape as model_image_shape
from fastdiff.sampling.placement import placed
from fastdiff.sampling.step import DenoiseStep
from fastdiff.schedulers import ddpm_table, linear_schedule

H100_BYTES_PER_S = DATASHEET["h100"]["bytes_per_s"]
H100_FLOPS = {dtype: DATASHEET["h100"][str(dtype).removeprefix("torch.")]
              for dtype in (torch.bfloat16, torch.float16, torch.float32)}
ROUTES = ("torch.compile", "fastdiff")


@dataclass(frozen=True)
class Kernel:
    name: str  # "fused" (a generated kernel), "copy", or the extern kernel's name
    bytes: int  # read + written
    flops: int
    copy: bool

    @property
    def convolution(self) -> bool:
        return "convolution" in self.name


@dataclass(frozen=True)
class Traffic:
    route: str
    batch: int
    kernels: list[Kernel]

    @property
    def copies(self) -> int:
        return sum(k.copy for k in self.kernels)

    @property
    def bytes(self) -> int:
        return sum(k.bytes for k in self.kernels)

    @property
    def non_conv_bytes(self) -> int:
        return sum(k.bytes for k in self.kernels if not k.convolution)

    @property
    def flops(self) -> int:
        return sum(k.flops for k in self.kernels)

    def h100_ms(self, dtype: torch.dtype) -> float:
        """Roofline model: each kernel at max(bytes / bandwidth, FLOPs / peak), summed."""
        peak = H100_FLOPS[dtype]
        return 1e3 * sum(max(k.bytes / H100_BYTES_PER_S, k.flops / peak) for k in self.kernels)


class _Scheduled(Exception):
    """Raised from inside inductor once the kernels are known, to stop before code generation."""


def _kernels_of(nodes) -> list[Kernel]:
    # inductor internals: only this report reads them
    from torch._inductor import ir, scheduler

    kernels = []
    for node in nodes:
        if isinstance(node, scheduler.NopKernelSchedulerNode) or isinstance(node.node, ir.MultiOutput):
            continue  # no kernel: views, and picking one output of a multi-output op
        extern = isinstance(node, scheduler.ExternKernelSchedulerNode)
        bodies = [n._body for n in node.get_nodes() if getattr(n, "_body", None) is not None]
        copy = not extern and bool(bodies) and all(body.is_memory_copy() for body in bodies)
        name = str(getattr(node.node, "python_kernel_name", None) or type(node.node).__name__) if extern else "fused"
        kernels.append(Kernel("copy" if copy else name, int(node.get_read_write_buffers_sizes()),
                              int(node.estimate_flops() or 0), copy))
    return kernels


@contextlib.contextmanager
def _capture_schedule(found: list):
    # inductor internals: only this report reads them
    from torch._inductor import scheduler

    def capture(self, *args, **kwargs):
        found.append(_kernels_of(self.nodes))
        raise _Scheduled

    original = scheduler.Scheduler.codegen
    scheduler.Scheduler.codegen = capture
    try:
        yield
    finally:
        scheduler.Scheduler.codegen = original


def step_traffic(model: torch.nn.Module, route: str, batch: int, dtype: torch.dtype = torch.bfloat16,
                 image_shape: tuple[int, int, int] | None = None, channels_last: bool | None = None) -> Traffic:
    """The kernels of one sampling step of ``model`` (fp32 weights, CPU) on ``route``. The model
    runs in ``channels_last`` (default: as the route runs it on CUDA -- fastdiff's Sampler in
    channels_last, a plain ``torch.compile`` user's model as it is, NCHW).

    Call it in a process that has not compiled with freezing and oneDNN on before (as the command
    runs): inductor sets up its CPU freezing passes once per process, and they would then also
    rewrite this CUDA-style graph (more copies, fewer kernels)."""

    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    image_shape = image_shape or model_image_shape(model)
    fused = route == "fastdiff"
    channels_last = fused if channels_last is None else channels_last
    net = placed(accelerate(model) if fused else model, torch.device("cpu"), dtype, channels_last).eval()
    step = DenoiseStep(net, ddpm_table(linear_schedule(), steps=10), dtype, channels_last)
    x = torch.zeros((batch, *image_shape))
    index = torch.zeros((), dtype=torch.int64)
    found: list[list[Kernel]] = []
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="inductor", fullgraph=True, dynamic=False)
    kernel_route = backend.cpu_tensors_take_the_kernel_route() if fused else contextlib.nullcontext()
    options = {"freezing": True, "force_layout_optimization": True}
    with torch.no_grad(), torch._inductor.config.patch(options), torch.backends.mkldnn.flags(enabled=False), \
            kernel_route, _capture_schedule(found), contextlib.suppress(_Scheduled):
        try:
            compiled(x, index, torch.zeros_like(x))
        except Exception as e:  # dynamo wraps what the backend raised
            if not _caused_by(e, _Scheduled):
                raise
    torch._dynamo.reset()
    if not found:
        raise RuntimeError("inductor scheduled no kernels (was the step compiled?)")
    return Traffic(route, batch, found[-1])


def _caused_by(error: BaseException, kind: type) -> bool:
    while error is not None:
        if isinstance(error, kind):
            return True
        error = error.__cause__ or error.__context__
    return False


def format_table(results: list[Traffic], dtype: torch.dtype) -> str:
    lines = ["| route | batch | kernels | copies | MB / step | non-conv MB / step | GFLOP / step "
             "| H100 ms / step (roofline model) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.route} | {r.batch} | {len(r.kernels)} | {r.copies} | {r.bytes / 1e6:,.1f} "
                     f"| {r.non_conv_bytes / 1e6:,.1f} | {r.flops / 1e9:,.1f} | {r.h100_ms(dtype):.3f} |")
    return "\n".join(lines)


def format_kernels(result: Traffic) -> str:
    lines = [f"{result.route}, batch {result.batch}:", "| # | kernel | bytes | FLOPs |", "|---:|---|---:|---:|"]
    lines += [f"| {i} | {k.name} | {k.bytes:,} | {k.flops:,} |" for i, k in enumerate(result.kernels)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="python -m fastdiff.bench.traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=PRESETS, default="cifar10")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16")
    parser.add_argument("--kernels", action="store_true", help="also list every kernel")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = preset_config(args.config)
    model = UNet(config).eval()
    results = [step_traffic(model, route, batch, dtype) for batch in args.batch for route in ROUTES]
    print(f"{args.config} UNet + sampling step, {args.dtype}, inductor with CUDA-style lowering on this CPU")
    print(format_table(results, dtype))
    print("H100 ms: roofline model (3.35 TB/s, dense peak), not a measurement.")
    if args.kernels:
        for result in results:
            print()
            print(format_kernels(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
