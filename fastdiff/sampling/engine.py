"""Which engine runs a Sampler's step, and preparing it per shape: compile (inductor or
OpenVINO) and CUDA-graph capture once per :class:`~fastdiff.engines.cuda_graphs.GraphKey`,
stepping back to a slower path for that key alone where "auto" allowed it and it failed.

With a compiled-artifact cache (:mod:`fastdiff.engines.cache`) inductor compiles ahead of time
(AOTInductor packages) and OpenVINO keeps its IR and compiled blobs there, so a key compiled by
any earlier process is loaded instead; without one, inductor is torch.compile in this process.
CUDA graphs are captured per process either way (a capture cannot be stored)."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from fastdiff.engines import openvino
from fastdiff.engines.cache import ArtifactCache, Entry
from fastdiff.engines.cuda_graphs import GraphCache, GraphKey
from fastdiff.engines.inductor import Packaged, compile_for, inductor_options
from fastdiff.engines.keys import model_fingerprint, tensor_sha256
from fastdiff.engines.openvino import OpenVINOModel
from fastdiff.ops import backend
from fastdiff.sampling.step import DenoiseStep
from fastdiff.schedulers import StepTable

logger = logging.getLogger(__name__)

AUTO = "auto"
ENGINES = (AUTO, "inductor", "openvino")
ENGINE_NAMES = {"inductor": "torch.compile", "openvino": "OpenVINO"}


def resolve_cache(cache) -> ArtifactCache | None:
    """The Sampler's ``cache`` argument: "auto" (the default folder, :func:`~fastdiff.engines.cache.default_root`),
    a folder, an ArtifactCache, or False / None (no cache)."""
    if cache is None or cache is False:
        return None
    if cache == AUTO:
        return ArtifactCache()
    if isinstance(cache, ArtifactCache):
        return cache
    if isinstance(cache, (str, os.PathLike)):
        return ArtifactCache(cache)
    raise TypeError(f"cache must be 'auto', a folder, an ArtifactCache, False or None, got {cache!r}")


def choose_engine(engine: str, compiled: bool, device: torch.device, dtype: torch.dtype) -> str:
    """What runs the model: "inductor" (torch.compile), "openvino" (CPU only) or "eager".
    "auto": OpenVINO for bf16 on a CPU when it is installed (the faster engine there, see
    fastdiff.engines.openvino), inductor otherwise."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}")
    if engine == "openvino":
        if not compiled:
            raise ValueError("engine='openvino' compiles the model: it cannot go with compile=False")
        if device.type != "cpu":
            raise ValueError(f"engine='openvino' runs on the CPU, this sampler runs on {device}")
        if not openvino.available():
            raise ImportError("engine='openvino' needs the openvino package: pip install 'fastdiff[cpu]'")
        return "openvino"
    if not compiled:
        return "eager"
    if engine == AUTO and device.type == "cpu" and dtype == torch.bfloat16 and openvino.available():
        return "openvino"
    return "inductor"


class PreparedSteps:
    """The step each key runs -- compiled (``engine``), eager, or replayed as a CUDA graph --
    prepared once per key. ``eager`` is the accelerated model's step; ``compiled`` the engine's.

    ``compile_mode`` / ``graphs_mode`` are the Sampler's arguments: where one is "auto" and
    compiling (or capturing) a key fails, that key alone runs eagerly (or without a graph),
    said through ``note(message, warn)``; keys prepared before keep theirs. ``cache``: where
    compiled artifacts are kept (None: nowhere)."""

    def __init__(self, eager: DenoiseStep, eps_model: torch.nn.Module, table: StepTable, engine: str,
                 device: torch.device, dtype: torch.dtype, autotune: bool, cuda_graphs: bool,
                 compile_mode, graphs_mode, note: Callable[[str, bool], None], cache: ArtifactCache | None = None):
        self.eager, self.engine, self.device, self.dtype, self.table = eager, engine, device, dtype, table
        self.compile_mode, self.graphs_mode, self._note = compile_mode, graphs_mode, note
        self.cache = cache
        #: the cache entries each prepared key found or built
        self.entries: dict[GraphKey, list[Entry]] = {}
        self._preparing: list[Entry] = []
        self.compiled = None  # the step the engine runs: compiled per key on first use
        key = self._cache_key(eps_model, eager) if cache is not None else None
        if engine == "openvino":
            ov_model = OpenVINOModel(eps_model, dtype, threads=torch.get_num_threads(), split_batch=True,
                                     cache=cache, key=key, on_entry=self._heard)
            self.compiled = DenoiseStep(ov_model, table, torch.float32, channels_last=False)
        elif engine == "inductor" and cache is not None:
            self.compiled = Packaged(eager, inductor_options(device, autotune), device, cache, key, self._heard)
        elif engine == "inductor":  # one compile per key: no recompile limit across keys or samplers
            self.compiled = compile_for(eager, device, autotune)
        self.graphs = GraphCache(self._step_by_key, device) if cuda_graphs else None
        self.ready: set[GraphKey] = set()
        #: keys whose compile ("auto": run eagerly) or capture ("auto": run the loop) failed
        self.eager_keys: set[GraphKey] = set()
        self.ungraphed_keys: set[GraphKey] = set()

    def _cache_key(self, eps_model: torch.nn.Module, eager: DenoiseStep) -> dict:
        """What the compiled step depends on beyond its call signature and the environment: the
        model, the table (frozen into the code), the model's dtype and layout, the kernel path."""
        table = self.table
        return {
            "model": model_fingerprint(eps_model),
            "table": {"method": table.method, "clip": table.clip, "history": table.history_size,
                      "values": tensor_sha256({"timesteps": table.timesteps, "coefs": table.coefs})},
            "dtype": str(self.dtype),
            "memory_format": str(eager.memory_format),
            "kernels": backend.kernel_path(self.device),
        }

    def _heard(self, entry: Entry) -> None:
        self._preparing.append(entry)

    def loaded_from_cache(self, key: GraphKey) -> bool:
        """Whether ``key``'s compiled step came whole from the cache (nothing compiled)."""
        found = self.entries.get(key, [])
        return bool(found) and all(entry.hit for entry in found)

    def key(self, x_t: torch.Tensor, class_labels, noise_mode: str) -> GraphKey:
        return GraphKey(x_t.shape[0], tuple(x_t.shape[1:]), self.dtype, class_labels is not None, noise_mode,
                        self.table.history_size)

    def uses_compile(self, key: GraphKey) -> bool:
        return self.compiled is not None and key not in self.eager_keys

    def graphed(self, key: GraphKey) -> bool:
        return self.graphs is not None and key not in self.ungraphed_keys

    def step_for(self, key: GraphKey):
        return self.compiled if self.uses_compile(key) else self.eager

    def _step_by_key(self, x_t, step_index, noise=None, rng=None, class_labels=None, history=None):
        """The step for the key these arguments make (what a CUDA graph of that key captures)."""
        key = self.key(x_t, class_labels, "philox" if noise is None else "given")
        return self.step_for(key)(x_t, step_index, noise, rng, class_labels, history)

    def prepare(self, key: GraphKey) -> None:
        """Compile (first call of the compiled step) and capture for ``key``, once. What was
        asked for as "auto" steps back for this key only when it fails (compile first, then the
        graph), with a loud warning; the keys already compiled and captured keep theirs."""
        if key in self.ready:
            return
        self._preparing = []
        try:
            if self.graphed(key):
                self.graphs.get(key)
            elif self.uses_compile(key):
                x = torch.zeros((key.batch, *key.image_shape), device=self.device)
                index = torch.zeros((), dtype=torch.int64, device=self.device)
                labels = index.new_zeros(key.batch) if key.class_conditioned else None
                noise = torch.zeros_like(x) if key.noise == "given" else None
                rng = index.new_zeros(2) if key.noise == "philox" else None
                self.compiled(x, index, noise, rng, labels, self.table.new_history(x.shape, self.device))
        except Exception as e:  # any compiler or capture failure; re-raised unless "auto"
            failure = f"{type(e).__name__}: {e}"
            if self.uses_compile(key) and self.compile_mode == AUTO:
                self._fallback(f"{ENGINE_NAMES[self.engine]} failed for {key} ({failure}); that shape runs the "
                               "accelerated model eagerly (much slower), shapes compiled before keep their compiled "
                               "code")
                self.eager_keys.add(key)
            elif self.graphed(key) and self.graphs_mode == AUTO:
                self._fallback(f"CUDA graph capture failed for {key} ({failure}); that shape runs the step loop "
                               "without a graph, shapes captured before keep their graphs")
                self.ungraphed_keys.add(key)
            else:
                raise
            return self.prepare(key)
        self.entries[key] = self._preparing
        self.ready.add(key)

    def _fallback(self, message: str) -> None:
        """A fallback "auto" allowed: a warning the first time (it is loud: an unexpected slow
        path), a logged warning and a note in describe() every time."""
        logger.warning("fastdiff.Sampler: %s", message)
        self._note(message, not (self.eager_keys or self.ungraphed_keys))
