"""Ahead-of-time compilation of Triton kernel configs for real GPUs, without a GPU.

``triton.compile`` lowers a kernel all the way to a cubin for any ``GPUTarget`` on a CPU-only
machine, but it does not refuse a kernel that needs more shared memory than the GPU has (that
check only runs at launch). ``compile_spec`` compiles one config, reads the shared memory
Triton allocated, and parses the ``ptxas -v`` log of the very ptxas run that built the cubin
for registers and spills, and the PTX for the width of its global loads.

Specs built with :func:`launch_spec` carry the specialisation Triton's JIT gives the launcher's real
arguments (a pointer or an integer divisible by 16 gets ``tt.divisibility``, an integer equal to 1
becomes a constant), so the compiled code is the code that runs, not a less specialised cousin.

Must run in a process without ``TRITON_INTERPRET``: under the interpreter ``@triton.jit``
returns an ``InterpretedFunction``, which cannot be compiled.
"""
from __future__ import annotations

import contextlib
import io
import re
import warnings
from dataclasses import dataclass, field

# Bytes of shared memory one block may use (opt-in maximum): A100 (sm_80) and H100 (sm_90).
SHARED_LIMIT = {80: 166_912, 90: 232_448}

_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
# ld.global[.modifiers][.v2|.v4].<type><bits> [...]: one load instruction per thread
_GLOBAL_LOAD = re.compile(r"\bld\.global((?:\.[A-Za-z0-9_:]+)*?)(?:\.v(\d))?\.[bfsu](\d+)\s")


@dataclass(frozen=True)
class AotSpec:
    """One config a launcher can pick: the kernel, its argument types, constexpr values and
    launch options. ``signature`` maps every argument of ``fn`` to a Triton type string
    ("*fp32", "*bf16", "i32", "fp32", ...) and constexpr arguments to "constexpr". ``attrs``: Triton
    attributes by argument index, as the JIT derives them (:func:`launch_spec`); None assumes only
    what holds for any launch, 16-byte-aligned pointers (torch's allocations). ``vector_load_bytes``:
    when set, the compile fails its check unless the PTX holds at least ``vector_loads`` global loads
    that are each at least this wide (the kernel's tile loads, vectorised)."""

    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    attrs: dict | None = None
    vector_load_bytes: int | None = None
    vector_loads: int = 1

    def describe(self) -> str:
        """Short label of the config, e.g. ``BLOCK=1024, SILU=True; w4 s3``."""
        values = ", ".join(f"{k}={v}" for k, v in self.constexprs.items())
        options = f"w{self.num_warps} s{self.num_stages}"
        if self.attrs is not None:  # the integer arguments the JIT knows to be multiples of 16
            names = list(self.signature)
            divisible = [names[i] for (i,), attrs in sorted(self.attrs.items())
                         if ["tt.divisibility", 16] in attrs and not self.signature[names[i]].startswith("*")]
            options += f"; %16: {' '.join(divisible) or '-'}"
        return f"{values}; {options}" if values else options


@dataclass(frozen=True)
class CompileResult:
    name: str
    arch: int
    shared_bytes: int | None
    registers: int | None
    spill_bytes: int | None  # ptxas spill stores + spill loads, per thread
    fits: bool
    error: str | None
    load_bytes: dict[int, int] | None = None  # PTX global loads: bytes per instruction -> count
    vectorised: bool | None = None  # the spec's vector-load check; None when it sets none

    @property
    def ok(self) -> bool:
        return self.error is None and self.fits and self.vectorised is not False

    @property
    def shared_limit(self) -> int:
        return SHARED_LIMIT[self.arch]


def check_arch(arch: int) -> int:
    if arch not in SHARED_LIMIT:
        raise ValueError(f"arch must be one of {sorted(SHARED_LIMIT)}, got {arch!r}")
    return arch


def compile_spec(spec: AotSpec, arch: int) -> CompileResult:
    """Compile ``spec`` for ``sm_<arch>``; compile errors are returned in ``error``, not raised."""
    check_arch(arch)
    try:
        shared, log, ptx = _compile(spec, arch)
        registers, spills = parse_ptxas_log(log)
    except Exception as exc:  # any compiler failure is a result to report, not a crash
        return CompileResult(spec.name, arch, None, None, None, False, f"{type(exc).__name__}: {exc}")
    loads = global_load_bytes(ptx)
    vectorised = None
    if spec.vector_load_bytes is not None:
        vectorised = sum(n for width, n in loads.items() if width >= spec.vector_load_bytes) >= spec.vector_loads
    return CompileResult(spec.name, arch, shared, registers, spills, shared <= SHARED_LIMIT[arch], None, loads,
                         vectorised)


def global_load_bytes(ptx: str) -> dict[int, int]:
    """Bytes per ``ld.global`` instruction (vector width x element bits / 8) -> how many the PTX holds."""
    counts: dict[int, int] = {}
    for _, vector, bits in _GLOBAL_LOAD.findall(ptx):
        width = int(vector or 1) * int(bits) // 8
        counts[width] = counts.get(width, 0) + 1
    return dict(sorted(counts.items(), reverse=True))


def parse_ptxas_log(log: str) -> tuple[int, int]:
    """(registers, spill bytes) from a ``ptxas -v`` log; the largest register count and the
    sum of spills when the module holds more than one function."""
    registers = [int(n) for n in _REGISTERS.findall(log)]
    if not registers:
        raise RuntimeError(f"no register count in the ptxas log:\n{log}")
    spills = sum(int(st) + int(ld) for st, ld in _SPILLS.findall(log))
    return max(registers), spills


def _compile(spec: AotSpec, arch: int) -> tuple[int, str, str]:
    # triton is optional: imported only where it is used
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(spec.fn, triton.runtime.JITFunction):
        raise TypeError(
            f"spec {spec.name!r}: fn is {type(spec.fn).__name__}, not a JITFunction; TRITON_INTERPRET "
            "must be unset in the process that compiles ahead of time")
    _check_signature(spec)
    attrs = spec.attrs
    if attrs is None:  # torch's data pointers are 16-byte aligned, and the JIT specialises on that
        attrs = {(i, ): [["tt.divisibility", 16]]
                 for i, name in enumerate(spec.fn.arg_names) if spec.signature[name].startswith("*")}
    source = ASTSource(fn=spec.fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs), attrs=attrs)
    log = io.StringIO()
    # Triton prints the log of its own ptxas run when asked to; always_compile makes sure ptxas
    # runs even when the kernel is in Triton's cache.
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log), \
            warnings.catch_warnings():
        # Triton 3.9 warns that its fp-fusion default will change; the compile keeps the
        # default, as the JIT does when the launcher runs.
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    return kernel.metadata.shared, log.getvalue(), kernel.asm["ptx"]


def launch_spec(name: str, fn, args: dict, num_warps: int, num_stages: int, *, vector_load_bytes: int | None = None,
                vector_loads: int = 1) -> AotSpec:
    """The spec Triton's JIT compiles when a launcher calls ``fn`` with ``args`` (every argument by
    name, constexprs included; pointers as tensors or ``triton.runtime.jit.MockTensor(dtype)``,
    whose address 0 is as aligned as torch's allocations). Each value is specialised by Triton's
    own ``native_specialize_impl`` for the CUDA backend, as ``JITFunction.run`` does it: integers
    equal to 1 become constexprs, pointers and integers divisible by 16 get ``tt.divisibility``."""
    # triton is optional: imported only where it is used
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction

    # Under TRITON_INTERPRET, @triton.jit gives an InterpretedFunction, which has no parameter
    # metadata: a JITFunction of the same Python function does (nothing is compiled here).
    params = fn.params if isinstance(fn, JITFunction) else JITFunction(fn.fn, **getattr(fn, "kwargs", {})).params
    missing = {p.name for p in params} ^ set(args)
    if missing:
        raise ValueError(f"spec {name!r}: arguments {sorted(missing)} do not match the kernel's parameters")
    backend = make_backend(GPUTarget("cuda", 90, 32))  # the specialisation does not depend on the arch
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(params):
        value = args[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, specialization = native_specialize_impl(backend, value, param.is_const, not param.do_not_specialize,
                                                      not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":  # an integer equal to 1
            constexprs[param.name] = value
        elif isinstance(specialization, str):
            attrs[(index, )] = backend.parse_attr(specialization)
    return AotSpec(name, fn, signature, constexprs, num_warps, num_stages, attrs, vector_load_bytes, vector_loads)


def _check_signature(spec: AotSpec) -> None:
    arg_names = list(spec.fn.arg_names)
    if set(spec.signature) != set(arg_names):
        raise ValueError(f"spec {spec.name!r}: signature names {sorted(spec.signature)}, "
                         f"the kernel takes {arg_names}")
    constexpr_args = {name for name, ty in spec.signature.items() if ty == "constexpr"}
    if constexpr_args != set(spec.constexprs):
        raise ValueError(f"spec {spec.name!r}: constexprs give {sorted(spec.constexprs)}, "
                         f"the signature marks {sorted(constexpr_args)} as constexpr")
