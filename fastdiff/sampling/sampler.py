"""``fastdiff.Sampler``: the fast DDPM/DDIM/DPM-Solver++/UniPC sampling loop, one API on CPU and GPU.

What runs:

- the model is passed through :func:`fastdiff.accelerate` (fused GroupNorm+SiLU, attention);
- one sampling step -- gather t from the device table by the step index, eps = model(x_t, t),
  the fused step op -- is one :class:`~fastdiff.sampling.step.DenoiseStep` module, compiled
  whole by :mod:`fastdiff.engines.inductor` (inductor, weight freezing) or run by OpenVINO
  (:mod:`fastdiff.sampling.engine` chooses and prepares it per shape);
- on a GPU that step is captured in a CUDA graph per shape (:mod:`fastdiff.engines.cuda_graphs`) and
  replayed S times; on a CPU it is called S times (CPUs have no graphs: asked for them, the
  sampler runs without and says so).

Precision: ``dtype`` is the model's dtype; x_t and the step maths stay float32 whatever it is
(the model's input is cast, eps is read in the step op in fp32), which is what keeps bf16
samples within 30 dB PSNR of the fp32 reference. Half dtypes also run channels_last on CPU.
float32 is the exact mode (:func:`fastdiff.ops.backend.exact_fp32`: no TF32 while the sampler
runs, as in the reference sampler). Weights are shared
with the caller's model when device and dtype already match, else converted in a copy.

Noise: ``sample(noise=ExternalNoise)`` uses exactly that noise (so results compare with
:func:`fastdiff.sampling.sample_reference`); ``sample(batch, seed)`` draws with
:func:`fastdiff.sampling.draw_noise`, the reference sampler's generator (same seed, same
samples), except with the Triton kernels (GPU): x_T still comes from that generator but each
z is drawn inside the step kernel, Philox keyed by (element, sample, 0, step) under ``seed``.

The parts: :mod:`~fastdiff.sampling.placement` (the table and the model's placement),
:mod:`~fastdiff.sampling.engine` (the engine and its per-shape preparation),
:mod:`~fastdiff.sampling.loop` (the step loop). ``describe()`` says what actually ran.
``warmup(batch)`` compiles (and captures) ahead of sampling and returns the seconds it took,
so benchmarks can report compile time apart.
"""
from __future__ import annotations

import time
import warnings

import torch
import torch.nn as nn

from fastdiff.engines import openvino
from fastdiff.engines.openvino import PRECISIONS
from fastdiff.integrations.diffusers import types
from fastdiff.integrations.diffusers.accelerate import accelerate
from fastdiff.models.folders import SCHEDULE_ATTRIBUTE
from fastdiff.ops import backend
from fastdiff.ops.attention import recording_routes
from fastdiff.sampling import placement
from fastdiff.sampling.engine import AUTO, PreparedSteps, choose_engine, resolve_cache
from fastdiff.sampling.inputs import check_class_labels, check_shape
from fastdiff.sampling.loop import run_steps
from fastdiff.sampling.noise import ExternalNoise, draw_noise
from fastdiff.sampling.placement import make_table, model_device, resolve_device
from fastdiff.sampling.step import DenoiseStep, DiffusersEps
from fastdiff.schedulers import DEFAULT_SPACINGS, NoiseSchedule, StepTable

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Sampler:
    """The accelerated sampler. ``schedule`` says which update runs:

    - a diffusers ``DDPMScheduler`` / ``DDIMScheduler`` / ``DPMSolverMultistepScheduler`` /
      ``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler``: its own step, settings and
      all (clip_sample, variance_type, set_alpha_to_one, timestep_spacing, steps_offset, the
      solver's order and options); ``steps`` defaults to its ``num_inference_steps``, ``method``
      follows its type. Settings no table reproduces (thresholding, a learned variance, Euler's
      fractional timesteps, ...) raise ValueError naming them;
    - a NoiseSchedule, turned into a table by ``method``/``steps``/``eta``/``order`` as
      :func:`fastdiff.schedulers.step_table` does (``method`` default "ddpm"; "dpmsolver++" or
      "sde-dpmsolver++" with ``order`` 1-3: DPM-Solver++ multistep; "unipc" with ``order`` 1-3:
      UniPC bh2 predictor-corrector; "euler", "euler-ancestral").
      ``eta`` is DDIM's and ``order`` the multistep solvers': given for another method they raise;
    - a ready StepTable;
    - None: the schedule the model was loaded with (``fastdiff.load_model`` sets
      ``model.fastdiff_schedule``), else linear with T = 1000 -- with a warning for a diffusers
      UNet, whose scheduler the sampler cannot see.

    ``start`` (img2img, diffusers' ``set_begin_index(start)``): the run covers steps start..S-1
    of the ``steps``, multistep orders counted from its first step as diffusers counts them;
    pass the noised image at that step as ``sample(noise=ExternalNoise(x_T=..., ...))``.

    ``engine`` (when compiling): "inductor" (torch.compile), "openvino" (CPU only, the optional
    ``openvino`` package: the plain model converted and run by OpenVINO in ``dtype``'s precision,
    the step in PyTorch float32) or "auto": OpenVINO for bf16 on a CPU where it is installed
    (measured faster there), inductor otherwise. ``describe()["engine"]`` says which ran.

    ``compile``/``cuda_graphs``: True, False or "auto" (compile
    everywhere the ops are not interpreted; graphs on CUDA). ``channels_last`` "auto": on CUDA
    and for half dtypes on CPU. ``image_shape`` (C, H, W) is read from fastdiff and diffusers UNets.

    ``cache``: where compiled steps are kept for later processes (:mod:`fastdiff.engines.cache`):
    "auto" (``$FASTDIFF_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastdiff``), a folder, an
    ArtifactCache, or False (compile in this process only: inductor then runs torch.compile).
    ``timesteps``: "auto" runs the model folder's tuned schedule (``fastdiff tune-steps``) for this
    method and ``steps`` when it has one tuned for these weights, "default" never does, "tuned"
    requires it; ``describe()["timesteps"]`` says which ran. Only the table's rows change."""

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule | StepTable | None = None,
        *,
        method: str | None = None,
        steps: int | None = None,
        eta: float = 0.0,
        order: int | None = None,
        start: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        compile: bool | str = AUTO,
        cuda_graphs: bool | str = AUTO,
        channels_last: bool | str = AUTO,
        image_shape: tuple[int, int, int] | None = None,
        autotune: bool = True,
        engine: str = AUTO,
        cache=AUTO,
        timesteps: str = AUTO,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if dtype not in DTYPES:
            raise TypeError(f"dtype must be one of {', '.join(map(str, DTYPES))}, got {dtype!r}")
        for name, value in (("compile", compile), ("cuda_graphs", cuda_graphs), ("channels_last", channels_last)):
            if not (isinstance(value, bool) or value == AUTO):
                raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")
        self.device = resolve_device(device if device is not None else model_device(model))
        self.dtype = dtype
        self.notes: list[str] = []
        table, self.timesteps_source = make_table(schedule, method, steps, eta, order, model, start, timesteps)
        self.table = table.to(self.device)
        if schedule is None and types.is_unet(model) and getattr(model, SCHEDULE_ATTRIBUTE, None) is None:
            self._note(f"no schedule given for a diffusers UNet: sampling with a linear schedule, T = 1000, "
                       f"{DEFAULT_SPACINGS[self.table.method]} spacing, no clipping; pass schedule=<the pipeline's "
                       "scheduler> to sample as that pipeline does")
        self.image_shape = tuple(image_shape) if image_shape is not None else placement.image_shape(model)
        self.class_conditioned = placement.class_conditioned(model)
        self.kernels = backend.kernel_path(self.device)
        #: seed mode draws z in the step kernel (Triton on a GPU); elsewhere with draw_noise.
        self.philox_seed_mode = self.kernels == "triton"

        on_cuda = self.device.type == "cuda"
        self.autotune = autotune
        self.compiled = compile is True or (compile == AUTO and self.kernels != "triton-interpreter")
        self.cuda_graphs = on_cuda and cuda_graphs in (True, AUTO)
        if cuda_graphs is True and not on_cuda:
            self._note(f"cuda_graphs=True ignored: CUDA graphs need a CUDA device, this sampler runs on {self.device}")
        self.engine = choose_engine(engine, self.compiled, self.device, dtype)
        # channels_last "auto": on CUDA, where freezing puts the convolutions in channels_last (so
        # the fused ops between them take that layout too: no copies), and for half dtypes on CPU.
        self.channels_last = channels_last is True or (channels_last == AUTO and (on_cuda or dtype != torch.float32))

        eps_model = DiffusersEps(model) if types.is_unet(model) else model
        fast = accelerate(eps_model)
        self.report = fast.fastdiff_report
        fast = placement.placed(fast, self.device, dtype, self.channels_last).eval()
        self._steps = PreparedSteps(
            DenoiseStep(fast, self.table, dtype, self.channels_last), eps_model, self.table, self.engine,
            self.device, dtype, autotune, self.cuda_graphs, compile, cuda_graphs, self._note,
            resolve_cache(cache) if self.engine != "eager" else None,
        )
        #: attention routes the model's calls took (fastdiff.ops.attention.recording_routes)
        self._attention_routes: set[str] = set()

    # ------------------------------------------------------------ public API

    @torch.no_grad()
    def sample(self, batch: int | None = None, seed: int = 0, noise: ExternalNoise | None = None,
               class_labels: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
        """Samples (B, C, H, W) float32 from ``noise`` (external noise mode) or ``batch`` + ``seed``."""
        x_T, z, rng = self._noise(batch, seed, noise)
        class_labels = self._labels(class_labels, x_T.shape[0])
        key = self._steps.key(x_T, class_labels, "given" if rng is None else "philox")
        with backend.on_device(self.device), backend.exact_fp32(), recording_routes(self._attention_routes):
            self._steps.prepare(key)
            if self._steps.graphed(key):
                return self._steps.graphs.get(key).run(x_T, self.table.num_steps, z, rng, class_labels)
            step = self._steps.step_for(key)

            def one_step(x, step_index, z_i, history):
                return step(x, step_index, z_i, rng, class_labels, history)

            return run_steps(self.table, x_T, one_step, lambda i: None if z is None else z[i], progress)

    def warmup(self, batch: int = 1, class_labels: torch.Tensor | None = None, external_noise: bool = False) -> float:
        """Compile (and on a GPU capture) for ``batch`` ahead of sampling; returns the seconds taken.
        ``external_noise``: prepare the path ``sample(noise=...)`` takes (on a GPU seed mode differs)."""
        start = time.perf_counter()
        key = self._warmup_key(batch, class_labels, external_noise)
        with torch.no_grad(), backend.on_device(self.device), backend.exact_fp32(), \
                recording_routes(self._attention_routes):
            self._steps.prepare(key)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def loaded_from_cache(self, batch: int = 1, class_labels: torch.Tensor | None = None,
                          external_noise: bool = False) -> bool:
        """Whether the compiled step for what ``warmup`` with these arguments prepared came from
        the compiled-artifact cache (loaded, nothing compiled)."""
        return self._steps.loaded_from_cache(self._warmup_key(batch, class_labels, external_noise))

    def _warmup_key(self, batch, class_labels, external_noise):
        if self.image_shape is None:
            raise ValueError("warmup needs the image shape: pass image_shape= to Sampler")
        x = torch.zeros((batch, *self.image_shape), device=self.device)
        philox = self.philox_seed_mode and not external_noise
        return self._steps.key(x, self._labels(class_labels, batch), "philox" if philox else "given")

    def describe(self) -> dict:
        """What runs: path (in words), device, dtype, compiled, cuda_graphs, kernels, the attention
        routes taken, and notes."""
        if self.engine == "openvino":
            threads = self._steps.compiled.model.threads
            streams = (f"split into up to {threads} parallel one-thread streams where it divides evenly"
                       if threads > 1 else "one stream")
            parts = [f"model run by OpenVINO {openvino.version()} on the CPU ({PRECISIONS[self.dtype]} "
                     f"inference precision, a static-shape compile per batch, {streams})"]
        else:
            parts = [f"accelerated model ({_replaced_summary(self.report)}; ops: {self.kernels})"]
        if self.engine == "inductor":
            autotuned = self.device.type == "cuda" and self.autotune
            how = "AOTInductor" if self._steps.cache is not None else "torch.compile"
            parts.append(how + " (inductor, freezing" + (", max-autotune)" if autotuned else ")"))
        if self._steps.cache is not None:
            parts.append(f"compiled-artifact cache in {self._steps.cache.root}")
        if self._steps.eager_keys:
            parts.append(f"eager for {'; '.join(sorted(map(str, self._steps.eager_keys)))} ({self.engine} failed)")
        layout = " channels_last" if self.channels_last and self.engine != "openvino" else ""
        parts.append(f"model in {_dtype_name(self.dtype)}{layout}, step maths in float32")
        parts.append(f"CUDA graph per shape on {self.device}" if self.cuda_graphs else f"eager step loop on {self.device}")
        if self._attention_routes:
            parts.append(f"attention: {'; '.join(sorted(self._attention_routes))}")
        return {
            "path": ", ".join(parts),
            "device": str(self.device),
            "dtype": _dtype_name(self.dtype),
            "compiled": self.compiled and not self._steps.eager_keys,
            "engine": self.engine,
            "compiled_shapes": [str(k) for k in self._steps.ready if self._steps.uses_compile(k)],
            "cuda_graphs": self.cuda_graphs and not self._steps.ungraphed_keys,
            "kernels": self.kernels,
            # routes taken so far (sdpa-flash / fastdiff-kernel / reference, with D and dtype); empty
            # before the first run, or where attention ran on the reference route inside compiled code
            "attention": sorted(self._attention_routes),
            "cache": None if self._steps.cache is None else str(self._steps.cache.root),
            "noise": "seed mode: z " + ("drawn in-kernel (Philox)" if self.philox_seed_mode else "from draw_noise"),
            "timesteps": self.timesteps_source,
            "notes": list(self.notes),
        }

    # ------------------------------------------------------------ internals

    def _labels(self, class_labels, batch: int) -> torch.Tensor | None:
        if class_labels is None and self.class_conditioned:
            raise ValueError("class_labels is required: this model is class-conditioned")
        return check_class_labels(class_labels, batch, self.device)

    def _note(self, message: str, warn: bool = True) -> None:
        self.notes.append(message)
        if warn:
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _noise(self, batch, seed, noise):
        """(x_T, z or None, rng or None) on the device, x_T and z float32."""
        if noise is not None:
            if not isinstance(noise, ExternalNoise):
                raise TypeError(f"noise must be a fastdiff.sampling.ExternalNoise, got {type(noise).__name__}")
            if batch is not None and batch != noise.x_T.shape[0]:
                raise ValueError(f"batch {batch} does not match noise.x_T batch {noise.x_T.shape[0]}")
            if noise.num_steps != self.table.num_steps:
                raise ValueError(f"noise has {noise.num_steps} steps of z, the table has {self.table.num_steps} steps")
            noise = noise.to(device=self.device, dtype=torch.float32)
            return noise.x_T, noise.per_step, None
        if batch is None:
            raise ValueError("pass batch (with seed) or noise")
        if self.image_shape is None:
            raise ValueError("cannot tell the image shape of this model: pass image_shape= to Sampler, or noise=")
        shape = check_shape((batch, *self.image_shape))
        if not self.philox_seed_mode:
            drawn = draw_noise(self.table, shape, seed, device=self.device)
            return drawn.x_T, drawn.per_step, None  # z drawn a step at a time
        # x_T is draw_noise's first draw (the reference's x_T); each z comes from in-kernel Philox.
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        rng = torch.tensor([seed, 0], dtype=torch.int64)
        return x_T.to(self.device), None, rng.to(self.device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _replaced_summary(report) -> str:
    counts = [f"{n} {kind}" for kind, n in report.counts.items() if n]
    return ", ".join(counts) if counts else "nothing replaced"
