"""Ahead-of-time compilation of Triton kernel configs for real GPUs, without a GPU.

``triton.compile`` lowers a kernel all the way to a cubin for any ``GPUTarget`` on a CPU-only
machine, but it does not refuse a kernel that needs more shared memory than the GPU has (that
check only runs at launch). ``compile_spec`` compiles one config, reads the shared memory
Triton allocated, and parses the ``ptxas -v`` log of the very ptxas run that built the cubin
for registers and spills.

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


@dataclass(frozen=True)
class AotSpec:
    """One config a launcher can pick: the kernel, its argument types, constexpr values and
    launch options. ``signature`` maps every argument of ``fn`` to a Triton type string
    ("*fp32", "*bf16", "i32", "fp32", ...) and constexpr arguments to "constexpr"."""

    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3

    def describe(self) -> str:
        """Short label of the config, e.g. ``BLOCK=1024, SILU=True; w4 s3``."""
        values = ", ".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{values}; w{self.num_warps} s{self.num_stages}" if values else f"w{self.num_warps} s{self.num_stages}"


@dataclass(frozen=True)
class CompileResult:
    name: str
    arch: int
    shared_bytes: int | None
    registers: int | None
    spill_bytes: int | None  # ptxas spill stores + spill loads, per thread
    fits: bool
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None and self.fits

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
        shared, log = _compile(spec, arch)
        registers, spills = parse_ptxas_log(log)
    except Exception as exc:  # any compiler failure is a result to report, not a crash
        return CompileResult(spec.name, arch, None, None, None, False, f"{type(exc).__name__}: {exc}")
    return CompileResult(spec.name, arch, shared, registers, spills, shared <= SHARED_LIMIT[arch], None)


def parse_ptxas_log(log: str) -> tuple[int, int]:
    """(registers, spill bytes) from a ``ptxas -v`` log; the largest register count and the
    sum of spills when the module holds more than one function."""
    registers = [int(n) for n in _REGISTERS.findall(log)]
    if not registers:
        raise RuntimeError(f"no register count in the ptxas log:\n{log}")
    spills = sum(int(st) + int(ld) for st, ld in _SPILLS.findall(log))
    return max(registers), spills


def _compile(spec: AotSpec, arch: int) -> tuple[int, str]:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(spec.fn, triton.runtime.JITFunction):
        raise TypeError(
            f"spec {spec.name!r}: fn is {type(spec.fn).__name__}, not a JITFunction; TRITON_INTERPRET "
            "must be unset in the process that compiles ahead of time")
    _check_signature(spec)
    # The launcher passes torch tensors, whose data pointers are 16-byte aligned: Triton's JIT
    # specializes such pointers, so the ahead-of-time compile does the same.
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
    return kernel.metadata.shared, log.getvalue()


def _check_signature(spec: AotSpec) -> None:
    arg_names = list(spec.fn.arg_names)
    if set(spec.signature) != set(arg_names):
        raise ValueError(f"spec {spec.name!r}: signature names {sorted(spec.signature)}, "
                         f"the kernel takes {arg_names}")
    constexpr_args = {name for name, ty in spec.signature.items() if ty == "constexpr"}
    if constexpr_args != set(spec.constexprs):
        raise ValueError(f"spec {spec.name!r}: constexprs give {sorted(spec.constexprs)}, "
                         f"the signature marks {sorted(constexpr_args)} as constexpr")
