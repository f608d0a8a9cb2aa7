"""``fastdiff.Sampler``: the fast DDPM/DDIM/DPM-Solver++ sampling loop, one API on CPU and GPU.

What runs:

- the model is passed through :func:`fastdiff.accelerate` (fused GroupNorm+SiLU, attention);
- one sampling step -- gather t from the device table by the step index, eps = model(x_t, t),
  the fused step op -- is one :class:`DenoiseStep` module, compiled whole by
  :mod:`fastdiff.compile` (inductor, weight freezing);
- on a GPU that step is captured in a CUDA graph per shape (:mod:`fastdiff.graphs`) and
  replayed S times; on a CPU it is called S times (CPUs have no graphs: asked for them, the
  sampler runs without and says so).

Precision: ``dtype`` is the model's dtype; x_t and the step maths stay float32 whatever it is
(the model's input is cast, eps is read in the step op in fp32), which is what keeps bf16
samples within 30 dB PSNR of the fp32 reference. Half dtypes also run channels_last on CPU.
float32 is the exact mode (:func:`fastdiff.backend.exact_fp32`: no TF32 while the sampler
runs, as in the reference sampler). Weights are shared
with the caller's model when device and dtype already match, else converted in a copy.

Noise: ``sample(noise=ExternalNoise)`` uses exactly that noise (so results compare with
:func:`fastdiff.sampling.sample_reference`); ``sample(batch, seed)`` draws with
:func:`fastdiff.sampling.draw_noise`, the reference sampler's generator (same seed, same
samples), except with the Triton kernels (GPU): x_T still comes from that generator but each
z is drawn inside the step kernel, Philox keyed by (element, sample, 0, step) under ``seed``.

``describe()`` says what actually ran. ``warmup(batch)`` compiles (and captures) ahead of
sampling and returns the seconds it took, so benchmarks can report compile time apart.
"""
from __future__ import annotations

import copy
import logging
import time
import warnings

import torch
import torch.nn as nn

from fastdiff import backend, openvino_engine, ops
from fastdiff.acceleration import accelerate
from fastdiff.compile import compile_for
from fastdiff.graphs import GraphCache, GraphKey
from fastdiff.io import SCHEDULE_ATTRIBUTE
from fastdiff.ops.attention import recording_routes
from fastdiff.openvino_engine import PRECISIONS, OpenVINOModel
from fastdiff.sampling import ExternalNoise, _check_class_labels, _check_shape, draw_noise
from fastdiff.schedule import NoiseSchedule, StepTable, linear_schedule, step_table

logger = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
AUTO = "auto"
ENGINES = (AUTO, "inductor", "openvino")
ENGINE_NAMES = {"inductor": "torch.compile", "openvino": "OpenVINO"}


class DenoiseStep(nn.Module):
    """One sampling step as one module (what is compiled and captured)::

        t = timesteps[step_index] (gathered on the device)
        eps = model(x_t in the model's dtype and layout, t[, class_labels])
        x_prev = fastdiff.ops.sampler_step(x_t, eps, step_index, coefs, noise | rng, history)  (fp32)

    ``history`` is the multistep solvers' buffer of previous data predictions, (K, *x_t.shape)
    float32, updated in place by the step (None for DDPM/DDIM).
    """

    def __init__(self, model: nn.Module, table: StepTable, model_dtype: torch.dtype, channels_last: bool):
        super().__init__()
        self.model = model
        self.register_buffer("timesteps", table.timesteps, persistent=False)
        self.register_buffer("coefs", table.coefs, persistent=False)
        self.clip = table.clip
        self.method = table.method
        self.model_dtype = model_dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x_t, step_index, noise=None, rng=None, class_labels=None, history=None) -> torch.Tensor:
        if self.method.startswith("sde") and noise is None and rng is None:
            raise ValueError(f"noise: the {self.method} step draws noise; pass noise or rng")
        t = self.timesteps.index_select(0, step_index.reshape(1)).expand(x_t.shape[0])
        x_in = x_t.to(dtype=self.model_dtype, memory_format=self.memory_format)
        eps = self.model(x_in, t) if class_labels is None else self.model(x_in, t, class_labels)
        x_prev, _ = ops.sampler_step(x_t, eps, step_index, self.coefs, noise=noise, rng=rng, clip_range=self.clip,
                                     history=history)  # fmt: skip
        return x_prev


class DiffusersEps(nn.Module):
    """A diffusers ``UNet2DModel`` as an eps model: ``forward(x, t, class_labels=None) -> eps``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, class_labels=None):
        return self.unet(x, t, class_labels=class_labels, return_dict=False)[0]


class Sampler:
    """The accelerated sampler. ``schedule`` says which update runs:

    - a diffusers ``DDPMScheduler`` / ``DDIMScheduler``: its own step, settings and all
      (clip_sample, variance_type, set_alpha_to_one, timestep_spacing, steps_offset); ``steps``
      defaults to its ``num_inference_steps``, ``method`` follows its type. Settings no table
      reproduces (another prediction_type, thresholding, learned variance) raise ValueError;
    - a NoiseSchedule, turned into a table by ``method``/``steps``/``eta``/``order`` as
      :func:`fastdiff.schedule.step_table` does (``method`` default "ddpm"; "dpmsolver++" or
      "sde-dpmsolver++" with ``order`` 1-3: DPM-Solver++ multistep);
    - a ready StepTable;
    - None: the schedule the model was loaded with (``fastdiff.load_model`` sets
      ``model.fastdiff_schedule``), else linear with T = 1000 -- with a warning for a diffusers
      UNet, whose scheduler the sampler cannot see.

    ``engine`` (when compiling): "inductor" (torch.compile), "openvino" (CPU only, the optional
    ``openvino`` package: the plain model converted and run by OpenVINO in ``dtype``'s precision,
    the step in PyTorch float32) or "auto": OpenVINO for bf16 on a CPU where it is installed
    (measured faster there), inductor otherwise. ``describe()["engine"]`` says which ran.

    ``compile``/``cuda_graphs``: True, False or "auto" (compile
    everywhere the ops are not interpreted; graphs on CUDA). ``channels_last`` "auto": on CUDA
    and for half dtypes on CPU. ``image_shape`` (C, H, W) is read from fastdiff and diffusers UNets."""

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule | StepTable | None = None,
        *,
        method: str | None = None,
        steps: int | None = None,
        eta: float = 0.0,
        order: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        compile: bool | str = AUTO,
        cuda_graphs: bool | str = AUTO,
        channels_last: bool | str = AUTO,
        image_shape: tuple[int, int, int] | None = None,
        autotune: bool = True,
        engine: str = AUTO,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if dtype not in DTYPES:
            raise TypeError(f"dtype must be one of {', '.join(map(str, DTYPES))}, got {dtype!r}")
        for name, value in (("compile", compile), ("cuda_graphs", cuda_graphs), ("channels_last", channels_last)):
            if not (isinstance(value, bool) or value == AUTO):
                raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")
        self.device = _resolve_device(device if device is not None else _model_device(model))
        self.dtype = dtype
        self.notes: list[str] = []
        if schedule is None and _is_diffusers_unet(model) and getattr(model, SCHEDULE_ATTRIBUTE, None) is None:
            self._note("no schedule given for a diffusers UNet: sampling with a linear schedule, T = 1000, "
                       "leading spacing, no clipping; pass schedule=<the pipeline's DDPMScheduler/DDIMScheduler> "
                       "to sample as that pipeline does")  # fmt: skip
        self.table = _make_table(schedule, method, steps, eta, order, model).to(self.device)
        self.image_shape = tuple(image_shape) if image_shape is not None else _image_shape(model)
        self.class_conditioned = _class_conditioned(model)
        self.kernels = backend.kernel_path(self.device)
        #: seed mode draws z in the step kernel (Triton on a GPU); elsewhere with draw_noise.
        self.philox_seed_mode = self.kernels == "triton"

        on_cuda = self.device.type == "cuda"
        self._compile_mode, self._graphs_mode, self.autotune = compile, cuda_graphs, autotune
        self.compiled = compile is True or (compile == AUTO and self.kernels != "triton-interpreter")
        self.cuda_graphs = on_cuda and cuda_graphs in (True, AUTO)
        if cuda_graphs is True and not on_cuda:
            self._note(f"cuda_graphs=True ignored: CUDA graphs need a CUDA device, this sampler runs on {self.device}")
        self.engine = _choose_engine(engine, self.compiled, self.device, dtype)
        # channels_last "auto": on CUDA, where freezing puts the convolutions in channels_last (so
        # the fused ops between them take that layout too: no copies), and for half dtypes on CPU.
        self.channels_last = channels_last is True or (channels_last == AUTO and (on_cuda or dtype != torch.float32))

        eps_model = DiffusersEps(model) if _is_diffusers_unet(model) else model
        fast = accelerate(eps_model)
        self.report = fast.fastdiff_report
        fast = _placed(fast, self.device, dtype, self.channels_last).eval()
        self._eager_step = DenoiseStep(fast, self.table, dtype, self.channels_last)
        self._compiled_step = None  # the step the engine runs: compiled per key on first use
        if self.engine == "openvino":
            ov_model = OpenVINOModel(eps_model, dtype, threads=torch.get_num_threads(), split_batch=True)
            self._compiled_step = DenoiseStep(ov_model, self.table, torch.float32, channels_last=False)
        elif self.engine == "inductor":  # one compile per key: no recompile limit across keys or samplers
            self._compiled_step = compile_for(self._eager_step, self.device, autotune)
        self._graphs = GraphCache(self._step_by_key, self.device) if self.cuda_graphs else None
        self._ready: set[GraphKey] = set()
        #: keys whose compile ("auto": run eagerly) or capture ("auto": run the loop) failed
        self._eager_keys: set[GraphKey] = set()
        self._ungraphed_keys: set[GraphKey] = set()
        #: attention routes the model's calls took (fastdiff.ops.attention.recording_routes)
        self._attention_routes: set[str] = set()

    # ------------------------------------------------------------ public API

    @torch.no_grad()
    def sample(self, batch: int | None = None, seed: int = 0, noise: ExternalNoise | None = None,
               class_labels: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:  # fmt: skip
        """Samples (B, C, H, W) float32 from ``noise`` (external noise mode) or ``batch`` + ``seed``."""
        x_T, z, rng = self._noise(batch, seed, noise)
        class_labels = self._labels(class_labels, x_T.shape[0])
        key = self._key(x_T, class_labels, "given" if rng is None else "philox")
        with backend.on_device(self.device), backend.exact_fp32(), recording_routes(self._attention_routes):
            self._prepare(key)
            if self._graphed(key):
                return self._graphs.get(key).run(x_T, self.table.num_steps, z, rng, class_labels)
            return self._loop(self._step_for(key), x_T, z, rng, class_labels, progress)

    def warmup(self, batch: int = 1, class_labels: torch.Tensor | None = None, external_noise: bool = False) -> float:
        """Compile (and on a GPU capture) for ``batch`` ahead of sampling; returns the seconds taken.
        ``external_noise``: prepare the path ``sample(noise=...)`` takes (on a GPU seed mode differs)."""
        if self.image_shape is None:
            raise ValueError("warmup needs the image shape: pass image_shape= to Sampler")
        start = time.perf_counter()
        x = torch.zeros((batch, *self.image_shape), device=self.device)
        class_labels = self._labels(class_labels, batch)
        philox = self.philox_seed_mode and not external_noise
        with torch.no_grad(), backend.on_device(self.device), backend.exact_fp32(), \
                recording_routes(self._attention_routes):
            self._prepare(self._key(x, class_labels, "philox" if philox else "given"))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def describe(self) -> dict:
        """What runs: path (in words), device, dtype, compiled, cuda_graphs, kernels, the attention
        routes taken, and notes."""
        if self.engine == "openvino":
            parts = [f"model run by OpenVINO {openvino_engine.version()} on the CPU ({PRECISIONS[self.dtype]} "
                     "inference precision, a static-shape compile per batch, split into up to "
                     f"{self._compiled_step.model.threads} parallel one-thread streams where it divides evenly)"]  # fmt: skip
        else:
            parts = [f"accelerated model ({_replaced_summary(self.report)}; ops: {self.kernels})"]
        if self.engine == "inductor":
            autotuned = self.device.type == "cuda" and self.autotune
            parts.append("torch.compile (inductor, freezing" + (", max-autotune)" if autotuned else ")"))
        if self._eager_keys:
            parts.append(f"eager for {'; '.join(sorted(map(str, self._eager_keys)))} ({self.engine} failed)")
        layout = " channels_last" if self.channels_last and self.engine != "openvino" else ""
        parts.append(f"model in {_dtype_name(self.dtype)}{layout}, step maths in float32")
        parts.append("CUDA graph per shape" if self.cuda_graphs else f"eager step loop on {self.device.type}")
        if self._attention_routes:
            parts.append(f"attention: {'; '.join(sorted(self._attention_routes))}")
        return {
            "path": ", ".join(parts),
            "device": str(self.device),
            "dtype": _dtype_name(self.dtype),
            "compiled": self.compiled and not self._eager_keys,
            "engine": self.engine,
            "compiled_shapes": [str(k) for k in self._ready if self._uses_compile(k)],
            "cuda_graphs": self.cuda_graphs and not self._ungraphed_keys,
            "kernels": self.kernels,
            # routes taken so far (sdpa-flash / fastdiff-kernel / reference, with D and dtype); empty
            # before the first run, or where attention ran on the reference route inside compiled code
            "attention": sorted(self._attention_routes),
            "noise": "seed mode: z " + ("drawn in-kernel (Philox)" if self.philox_seed_mode else "from draw_noise"),
            "notes": list(self.notes),
        }

    # ------------------------------------------------------------ internals

    def _labels(self, class_labels, batch: int) -> torch.Tensor | None:
        if class_labels is None and self.class_conditioned:
            raise ValueError("class_labels is required: this model is class-conditioned")
        return _check_class_labels(class_labels, batch, self.device)

    def _note(self, message: str) -> None:
        self.notes.append(message)
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
        shape = _check_shape((batch, *self.image_shape))
        if not self.philox_seed_mode:
            drawn = draw_noise(self.table, shape, seed, device=self.device)
            return drawn.x_T, drawn.per_step, None  # z drawn a step at a time
        # x_T is draw_noise's first draw (the reference's x_T); each z comes from in-kernel Philox.
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        rng = torch.tensor([seed, 0], dtype=torch.int64)
        return x_T.to(self.device), None, rng.to(self.device)

    def _key(self, x_T, class_labels, noise_mode: str) -> GraphKey:
        return GraphKey(x_T.shape[0], tuple(x_T.shape[1:]), self.dtype, class_labels is not None, noise_mode,
                        self.table.history_size)  # fmt: skip

    def _uses_compile(self, key: GraphKey) -> bool:
        return self._compiled_step is not None and key not in self._eager_keys

    def _graphed(self, key: GraphKey) -> bool:
        return self._graphs is not None and key not in self._ungraphed_keys

    def _step_for(self, key: GraphKey):
        return self._compiled_step if self._uses_compile(key) else self._eager_step

    def _step_by_key(self, x_t, step_index, noise=None, rng=None, class_labels=None, history=None):
        """The step for the key these arguments make (what a CUDA graph of that key captures)."""
        key = self._key(x_t, class_labels, "philox" if noise is None else "given")
        return self._step_for(key)(x_t, step_index, noise, rng, class_labels, history)

    def _prepare(self, key: GraphKey) -> None:
        """Compile (first call of the compiled step) and capture for ``key``, once. What was
        asked for as "auto" steps back for this key only when it fails (compile first, then the
        graph), with a loud warning; the keys already compiled and captured keep theirs."""
        if key in self._ready:
            return
        try:
            if self._graphed(key):
                self._graphs.get(key)
            elif self._uses_compile(key):
                x = torch.zeros((key.batch, *key.image_shape), device=self.device)
                index = torch.zeros((), dtype=torch.int64, device=self.device)
                labels = index.new_zeros(key.batch) if key.class_conditioned else None
                noise = torch.zeros_like(x) if key.noise == "given" else None
                rng = index.new_zeros(2) if key.noise == "philox" else None
                self._compiled_step(x, index, noise, rng, labels, self.table.new_history(x.shape, self.device))
        except Exception as e:  # any compiler or capture failure; re-raised unless "auto"
            failure = f"{type(e).__name__}: {e}"
            if self._uses_compile(key) and self._compile_mode == AUTO:
                self._fallback(f"{ENGINE_NAMES[self.engine]} failed for {key} ({failure}); that shape runs the "
                               "accelerated model eagerly (much slower), shapes compiled before keep their compiled "
                               "code")  # fmt: skip
                self._eager_keys.add(key)
            elif self._graphed(key) and self._graphs_mode == AUTO:
                self._fallback(f"CUDA graph capture failed for {key} ({failure}); that shape runs the step loop "
                               "without a graph, shapes captured before keep their graphs")  # fmt: skip
                self._ungraphed_keys.add(key)
            else:
                raise
            return self._prepare(key)
        self._ready.add(key)

    def _fallback(self, message: str) -> None:
        """A fallback "auto" allowed: a warning the first time (it is loud: an unexpected slow
        path), a logged warning and a note in describe() every time."""
        logger.warning("fastdiff.Sampler: %s", message)
        if self._eager_keys or self._ungraphed_keys:
            self.notes.append(message)
        else:
            self._note(message)

    def _loop(self, step, x, z, rng, class_labels, progress: bool) -> torch.Tensor:
        steps = range(self.table.num_steps)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"{self.table.method} sampling", unit="step")
        step_index = torch.zeros((), dtype=torch.int64, device=self.device)
        history = self.table.new_history(x.shape, self.device)
        for i in steps:
            step_index.fill_(i)
            x = step(x, step_index, None if z is None else z[i], rng, class_labels, history)
        return x


def _make_table(schedule, method: str | None, steps, eta, order, model: nn.Module) -> StepTable:
    if isinstance(schedule, StepTable):
        if (method, steps, eta, order) != (None, None, 0.0, None):
            raise ValueError("pass method/steps/eta/order or a ready StepTable as schedule, not both")
        return schedule
    if _is_diffusers_scheduler(schedule):
        from fastdiff.acceleration import table_from_scheduler

        kind = "ddim" if type(schedule).__name__ == "DDIMScheduler" else "ddpm"
        if method not in (None, kind):
            raise ValueError(f"method {method!r} does not match the {type(schedule).__name__} passed as schedule")
        if eta and kind != "ddim":
            raise ValueError("eta applies to a DDIMScheduler only")
        return table_from_scheduler(schedule, steps=steps, eta=eta)
    if schedule is None:
        schedule = getattr(model, SCHEDULE_ATTRIBUTE, None) or linear_schedule()
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError("schedule must be a diffusers DDPMScheduler/DDIMScheduler, a NoiseSchedule, a StepTable "
                        f"or None, got {type(schedule).__name__}")  # fmt: skip
    method = method or "ddpm"
    if order is not None and not method.endswith("dpmsolver++"):
        raise ValueError(f"order applies to method 'dpmsolver++' or 'sde-dpmsolver++' only, not {method!r}")
    return step_table(schedule, method, steps=steps, eta=eta, order=2 if order is None else order)


def _choose_engine(engine: str, compiled: bool, device: torch.device, dtype: torch.dtype) -> str:
    """What runs the model: "inductor" (torch.compile), "openvino" (CPU only) or "eager".
    "auto": OpenVINO for bf16 on a CPU when it is installed (the faster engine there, see
    fastdiff.openvino_engine), inductor otherwise."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}")
    if engine == "openvino":
        if not compiled:
            raise ValueError("engine='openvino' compiles the model: it cannot go with compile=False")
        if device.type != "cpu":
            raise ValueError(f"engine='openvino' runs on the CPU, this sampler runs on {device}")
        if not openvino_engine.available():
            raise ImportError("engine='openvino' needs the openvino package: pip install 'fastdiff[cpu]'")
        return "openvino"
    if not compiled:
        return "eager"
    if engine == AUTO and device.type == "cpu" and dtype == torch.bfloat16 and openvino_engine.available():
        return "openvino"
    return "inductor"


def _is_diffusers_scheduler(obj) -> bool:
    return type(obj).__name__ in ("DDPMScheduler", "DDIMScheduler") and type(obj).__module__.startswith("diffusers")


def _resolve_device(device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``, so it compares equal to the devices tensors report."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device}: no CUDA device is available here (torch {torch.__version__})")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _is_diffusers_unet(model) -> bool:
    return type(model).__name__ == "UNet2DModel" and type(model).__module__.startswith("diffusers")


def _image_shape(model: nn.Module) -> tuple[int, int, int] | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if _is_diffusers_unet(model):
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return config.in_channels, height, width
    if hasattr(config, "image_size") and hasattr(config, "in_channels"):
        return config.in_channels, config.image_size, config.image_size
    return None


def _placed(model: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    """``model`` on ``device`` in ``dtype`` (and channels_last). It shares the caller's weights
    when they already fit; otherwise the weights are converted in a copy, so the caller's model
    is never changed."""
    tensors = [*model.parameters(), *model.buffers()]
    fits = all(t.device == device and (not t.is_floating_point() or t.dtype == dtype) for t in tensors)
    if fits and not channels_last:
        return model
    converted = copy.deepcopy(model).to(device=device, dtype=dtype)
    return converted.to(memory_format=torch.channels_last) if channels_last else converted


def _class_conditioned(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "num_classes", None) or getattr(config, "num_class_embeds", None))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _replaced_summary(report) -> str:
    counts = [f"{n} {kind}" for kind, n in report.counts.items() if n]
    return ", ".join(counts) if counts else "nothing replaced"
