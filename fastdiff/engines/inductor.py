"""torch.compile settings for fastdiff's sampling step, chosen per device and kept local.

The settings are inductor config patches applied around each call of the compiled function
(:class:`Compiled`), never set globally: a user's other compiled code is unaffected. They
cannot go through ``torch.compile(options=...)``: dynamo reads ``freezing`` while tracing
(to treat parameters as constants), before inductor's own options apply, so with ``options``
freezing silently does nothing (checked: the generated code then takes the weights as inputs).
Tracing and compiling happen inside the first call (and any recompile), hence the patch there.

CPU (``{"freezing": True}``): without freezing inductor is no faster than eager on the UNet
(convolutions go to oneDNN either way); with freezing the weights become constants, so oneDNN
gets pre-packed weights (speed: README, "Results"). Freezing only applies when the compiled
call runs under ``torch.no_grad()``, and the weights are read at compile time: change them and
a new compile is needed.

CUDA (``max_autotune`` + ``coordinate_descent_tuning`` + freezing, ``triton.cudagraphs`` off):
what ``mode="max-autotune-no-cudagraphs"`` sets, plus freezing (conv layout and weight
constant folding). CUDA graphs stay off in inductor because :mod:`fastdiff.engines.cuda_graphs` captures the
whole step (UNet + fused step op) itself. ``autotune=False`` skips the autotuning (much shorter
compile) for tests and quick runs.

Persistent (:class:`Packaged`, what the Sampler uses where a cache is on): each signature is
exported (``torch.export``) and compiled ahead of time by AOTInductor under the same inductor
options into a package kept in the :class:`~fastdiff.engines.cache.ArtifactCache`; a later
process loads the package (a shared library and the frozen constants) in well under a second
instead of tracing and compiling again. Chosen over inductor's own FX-graph cache, with which
dynamo still traces every run (README, "Compiled-artifact cache").

Always ``fullgraph=True`` (a graph break is a bug to fix, not a slow path to accept) and
``dynamic=False`` (one static graph per batch size, as CUDA graphs need anyway).

One code object per call signature: dynamo caches compiled code per *code object* and allows
8 entries per code object (``recompile_limit``), so one shared entry point would stop
compiling at the 9th distinct shape -- or the 9th sampler in a process, since every
sampler's step shares the same ``forward``. :class:`Compiled` instead compiles, for each
signature (argument shapes, dtypes, devices, which are None), a fresh copy of a small
trampoline function with its own code object: one cache entry each, any number of
signatures and samplers, and no global dynamo limit raised for the user's other code. A
compiled signature's code is dropped with its :class:`Compiled`. Should dynamo still hit its
limit on one of them, it raises (``fullgraph``) rather than silently running eagerly.
"""
from __future__ import annotations

import itertools
import types
from collections.abc import Callable

import torch
import torch.utils._pytree as pytree

from fastdiff.engines.cache import ArtifactCache, Entry
from fastdiff.engines.keys import environment

CPU_OPTIONS = {"freezing": True}
CUDA_OPTIONS = {"freezing": True, "max_autotune": True, "coordinate_descent_tuning": True, "triton.cudagraphs": False}
CUDA_QUICK_OPTIONS = {"freezing": True, "triton.cudagraphs": False}


def inductor_options(device: torch.device | str, autotune: bool = True) -> dict:
    """The inductor config patches fastdiff compiles with on ``device`` (a fresh dict)."""
    if torch.device(device).type == "cuda":
        return dict(CUDA_OPTIONS if autotune else CUDA_QUICK_OPTIONS)
    return dict(CPU_OPTIONS)


#: The torch.compile backend of every Compiled (tests substitute a counting one).
BACKEND = "inductor"

_entry_ids = itertools.count()


def _fresh_entry(fn):
    """A function calling ``fn`` whose code object is new, so dynamo caches it on its own."""

    def entry(*args, **kwargs):
        return fn(*args, **kwargs)

    code = entry.__code__.replace(co_name=f"fastdiff_compiled_{next(_entry_ids)}")
    return types.FunctionType(code, entry.__globals__, code.co_name, None, entry.__closure__)


def signature(args: tuple, kwargs: dict) -> tuple:
    """What a static-shape compile specialises on: each tensor's shape, dtype and device, and
    which arguments are None (other values as they are)."""

    def describe(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.dtype, value.device)
        return ("value", value)

    return tuple(map(describe, args)) + tuple((name, describe(v)) for name, v in sorted(kwargs.items()))


class Compiled:
    """``fn`` (a module or function) compiled by torch.compile, one compile per call
    :func:`signature` (see the module docstring), called under the inductor ``options``.
    ``compiled_signatures`` lists the signatures compiled so far."""

    def __init__(self, fn, options: dict, backend=None):
        self.fn, self.backend = fn, backend or BACKEND
        self.options = dict(options)
        self._compiled: dict[tuple, object] = {}

    @property
    def compiled_signatures(self) -> list[tuple]:
        return list(self._compiled)

    def __call__(self, *args, **kwargs):
        key = signature(args, kwargs)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = torch.compile(_fresh_entry(self.fn), backend=self.backend, fullgraph=True, dynamic=False)
            self._compiled[key] = compiled
        with torch._inductor.config.patch(self.options):
            return compiled(*args, **kwargs)


def compile_for(fn, device: torch.device | str, autotune: bool = True) -> Compiled:
    """``fn`` compiled with fastdiff's settings for ``device`` (see the module docstring)."""
    return Compiled(fn, inductor_options(device, autotune))


#: The file an inductor cache entry holds: the AOTInductor package of one signature.
PACKAGE = "step.pt2"


class Packaged:
    """``fn`` compiled by AOTInductor under the inductor ``options`` on ``device``, one package per
    call :func:`signature`, kept in ``cache`` under ``key`` (what ``fn`` is: model, table, ...)
    plus the signature, options, thread count and :func:`~fastdiff.engines.keys.environment`.
    Positional arguments only (None allowed). ``on_entry(entry)`` hears of each package found or built."""

    def __init__(self, fn, options: dict, device: torch.device | str, cache: ArtifactCache, key: dict,
                 on_entry: Callable[[Entry], None] = lambda entry: None):
        self.fn, self.options, self.device, self.cache, self.key = fn, dict(options), torch.device(device), cache, key
        self.on_entry = on_entry
        self._loaded: dict[tuple, object] = {}

    def entry_key(self, args: tuple) -> dict:
        return {**self.key, "signature": [str(part) for part in signature(args, {})], "options": self.options,
                "threads": torch.get_num_threads(), "environment": environment(self.device)}

    def __call__(self, *args):
        sig = signature(args, {})
        runner = self._loaded.get(sig)
        if runner is None:
            entry = self.cache.entry("inductor", self.entry_key(args), lambda folder: self._build(folder, args))
            runner = self._loaded[sig] = load_package(entry.path / PACKAGE)
            self.on_entry(entry)
        return runner(*args)

    def _build(self, folder, args: tuple) -> None:
        with torch.no_grad():  # freezing applies under no_grad only
            exported = torch.export.export(self.fn, args)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(folder / PACKAGE),
                                                     inductor_configs=self.options)


def load_package(path) -> Callable:
    """An AOTInductor package, loaded by its C++ loader directly and called as
    ``torch._inductor.aoti_load_package`` calls it (inputs flattened to tensors, outputs
    unflattened by the package's call spec). Running a package needs none of inductor's Python
    side: importing it (with dynamo) would be most of a warm start's cost (README, "Compiled-artifact
    cache"), and its load-time check of the CPU's vector ISA compiles probe libraries in
    subprocesses, while the cache key already holds the CPU's capability."""
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    out_spec = pytree.treespec_loads(loader.get_call_spec()[1])

    def run(*args):
        flat = [a for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
        return pytree.tree_unflatten(loader.boxed_run(flat), out_spec)

    return run
