"""The execution paths the bench compares, each built lazily so a missing piece skips one path.

Every path maps the run's :class:`~fastdiff.sampling.ExternalNoise` (and class labels) to
images in [0, 1] -- the form diffusers' pipelines return -- so all paths are compared on the
same noise and the same scale.
"""
from __future__ import annotations

import atexit
import copy
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from fastdiff.engines.cache import ArtifactCache

PATHS = ("reference", "compile", "fastdiff", "fastdiff-nographs", "diffusers", "openvino")
#: What runs when no --paths are given (OpenVINO is an optional package, fastdiff-nographs the
#: Sampler without its CUDA graphs: ask for them by name).
DEFAULT_PATHS = ("reference", "compile", "fastdiff", "diffusers")


class PathSkipped(Exception):
    """A path cannot run here; the message is the reason shown in the report."""


@dataclass
class BenchContext:
    """What every path is built from: the fp32 reference model and the sampling setup."""

    model: nn.Module  # fp32, eval mode, on ``device``
    schedule: object  # fastdiff.schedulers.NoiseSchedule
    table: object  # fastdiff.schedulers.StepTable for (method, steps)
    device: torch.device
    dtype: torch.dtype  # precision of the non-reference paths
    autotune: bool = True  # on CUDA: torch.compile max-autotune and the Sampler's autotuning, else neither


@dataclass
class BenchPath:
    name: str
    label: str
    dtype: torch.dtype
    run: Callable  # (noise: ExternalNoise, class_labels: Tensor | None) -> images in [0, 1], fp32
    info: dict = field(default_factory=dict)
    describe: Callable[[], dict] | None = None  # extra facts known only after a run
    #: (noise, class_labels) -> seconds of a new instance's first call once the first call has
    #: filled the compiled-artifact cache: the warm start beside the cold one (the warm-up)
    warm_start: Callable | None = None


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space -> [0, 1] images, as diffusers' pipelines return them."""
    return (x.float() / 2 + 0.5).clamp(0, 1)


def build_path(name: str, ctx: BenchContext) -> BenchPath:
    builders = {"reference": _reference, "compile": _compiled, "fastdiff": _fastdiff,
                "fastdiff-nographs": _fastdiff_without_graphs, "diffusers": _diffusers, "openvino": _openvino}
    return builders[name](ctx)


def _reference(ctx: BenchContext) -> BenchPath:
    from fastdiff.sampling import sample_reference

    def run(noise, class_labels):
        x = sample_reference(ctx.model, ctx.table, noise=noise, class_labels=class_labels, device=ctx.device)
        return to_unit(x)

    return BenchPath("reference", "reference (eager fp32)", torch.float32, run,
                     {"loop": "fastdiff.sampling.reference.sample_reference", "model": "fastdiff UNet, eager"})


class CastIO(nn.Module):
    """Runs ``net`` in its own dtype inside the fp32 sampling loop (the step math stays fp32)."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, x, t, *class_labels):
        return self.net(x.to(self.dtype), t, *class_labels).float()


def _compiled(ctx: BenchContext) -> BenchPath:
    from fastdiff.sampling import sample_reference

    mode = "max-autotune" if ctx.device.type == "cuda" and ctx.autotune else None  # CPU: inductor's default mode
    net = ctx.model if ctx.dtype == torch.float32 else copy.deepcopy(ctx.model).to(ctx.dtype)
    # eval() up front: the sampling loop would otherwise flip the shared model back to train mode after each call
    model = CastIO(torch.compile(net, mode=mode, dynamic=False), ctx.dtype).eval()

    def run(noise, class_labels):
        return to_unit(sample_reference(model, ctx.table, noise=noise, class_labels=class_labels, device=ctx.device))

    dtype_name = str(ctx.dtype).removeprefix("torch.")
    return BenchPath("compile", f"torch.compile ({mode or 'default'}, {dtype_name})", ctx.dtype, run,
                     {"loop": "fastdiff.sampling.reference.sample_reference", "torch_compile_mode": mode or "default",
                      "dynamic": False, "inductor_freezing": bool(torch._inductor.config.freezing)})


def _fastdiff(ctx: BenchContext, name: str = "fastdiff", cuda_graphs: bool | str = "auto") -> BenchPath:
    try:
        from fastdiff.sampling.sampler import Sampler
    except ImportError as e:
        raise PathSkipped(f"fastdiff.sampling.sampler is not available ({e})") from None

    # The run's own StepTable, so the sampler computes exactly the reference's update; the model is
    # copied because acceleration may swap its modules in place. An empty cache of the bench's own:
    # each batch's warm-up is a cold start (compile and store), which warm_start then loads.
    cache = ArtifactCache(tempfile.mkdtemp(prefix="fastdiff-bench-cache-"))
    atexit.register(shutil.rmtree, cache.root, True)

    def new_sampler():
        return Sampler(copy.deepcopy(ctx.model), ctx.table, dtype=ctx.dtype, device=ctx.device,
                       autotune=ctx.autotune, cuda_graphs=cuda_graphs, cache=cache)

    sampler = new_sampler()

    def run(noise, class_labels):
        return to_unit(sampler.sample(noise=noise, class_labels=class_labels))

    def warm_start(noise, class_labels):
        start = time.perf_counter()
        new_sampler().sample(noise=noise, class_labels=class_labels)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        return time.perf_counter() - start

    return BenchPath(name, "fastdiff Sampler", ctx.dtype, run, {"sampler": sampler.describe()},
                     describe=sampler.describe, warm_start=warm_start)


def _fastdiff_without_graphs(ctx: BenchContext) -> BenchPath:
    """The Sampler with its CUDA graphs off: what the graphs themselves save (same as fastdiff on a CPU)."""
    return _fastdiff(ctx, "fastdiff-nographs", cuda_graphs=False)


def fastdiff_label(described: dict) -> str:
    """Short table label from ``Sampler.describe()``; the full sentence goes in the JSON."""
    engine = described.get("engine")
    if engine == "openvino":
        parts = ["model on OpenVINO, step in torch fp32"]
    else:
        parts = ["compiled" if described.get("compiled") else "eager", f"ops: {described.get('kernels', '?')}"]
    if described.get("cuda_graphs"):
        parts.append("CUDA graphs")
    routes = sorted({label.split(" (")[0] for label in described.get("attention", [])})
    if routes:
        parts.append(f"attention: {'+'.join(routes)}")
    parts.append(str(described.get("dtype", "")))
    return f"fastdiff Sampler ({', '.join(parts)})"


def _diffusers(ctx: BenchContext) -> BenchPath:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; nothing may download
    try:
        # diffusers is optional
        import diffusers
    except ImportError as e:
        raise PathSkipped(f"diffusers is not installed ({e})") from None
    from fastdiff.bench.diffusers_peer import (
        ConversionError,
        conversion_error,
        injected_class_labels,
        make_pipeline,
        replayed_noise,
        to_unet2d,
    )

    diffusers.utils.logging.set_verbosity_error()
    try:
        unet2d = to_unet2d(ctx.model)
    except ConversionError as e:
        raise PathSkipped(f"cannot express this UNet as a UNet2DModel: {e}") from None
    max_diff = conversion_error(ctx.model, unet2d)
    if ctx.dtype != torch.float32:
        unet2d = unet2d.to(ctx.dtype)
    try:
        pipe = make_pipeline(unet2d, ctx.table, ctx.schedule)
    except ValueError as e:
        raise PathSkipped(str(e)) from None
    call = dict(num_inference_steps=ctx.table.num_steps, output_type="pt", return_dict=False)
    if ctx.table.method == "ddim":
        call["eta"] = 0.0

    def run(noise, class_labels):
        with replayed_noise(noise), injected_class_labels(unet2d, class_labels):
            return pipe(batch_size=noise.x_T.shape[0], **call)[0].float()

    name = type(pipe).__name__
    labels_note = ", class labels by a forward pre-hook" if ctx.model.config.num_classes else ""
    return BenchPath("diffusers", f"diffusers {name} (converted weights{labels_note})", ctx.dtype, run,
                     {"pipeline": name, "diffusers": diffusers.__version__,
                      "conversion_max_abs_eps_diff": max_diff, "scheduler": type(pipe.scheduler).__name__})


def _openvino(ctx: BenchContext) -> BenchPath:
    """The plain model converted by OpenVINO and compiled for the CPU with its default settings
    (what a CPU user would run; its default inference precision is bf16 on CPUs with bf16
    support), inside the fp32 reference sampling loop."""
    from fastdiff.engines import openvino

    if ctx.device.type != "cpu":
        raise PathSkipped(f"OpenVINO runs on the CPU here, the bench runs on {ctx.device}")
    if not openvino.available():
        raise PathSkipped("openvino is not installed (pip install 'fastdiff[cpu]')")
    from fastdiff.sampling import sample_reference

    model = openvino.OpenVINOModel(ctx.model, None, threads=torch.get_num_threads()).eval()

    def run(noise, class_labels):
        return to_unit(sample_reference(model, ctx.table, noise=noise, class_labels=class_labels, device=ctx.device))

    precision = openvino.default_precision()
    return BenchPath("openvino", f"OpenVINO {openvino.version()} (default settings: {precision})",
                     ctx.dtype, run, {"loop": "fastdiff.sampling.sample_reference", "openvino": openvino.version(),
                                      "inference_precision": precision, "model": "ov.convert_model of the fp32 model"})
