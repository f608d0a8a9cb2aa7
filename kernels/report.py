"""Ahead-of-time compile report: every config of every Triton kernel, compiled for real GPUs.

    python -m fastdiff.kernels.report [--arch 80 90] [--json] [--kernel NAME ...] [--workers 2]

Finds every module of ``fastdiff.kernels`` that defines ``aot_specs()`` (``--kernel`` picks
some by short name, or any importable module by dotted name), compiles each config for each
target, and prints a markdown table per kernel: shared memory against the GPU's limit,
registers and spills from ptxas, the width of the PTX's global loads, and whether the configs
that expect vectorised tile loads got them. Exits non-zero if a config fails to compile or needs more
shared memory than the target has, or misses its vector loads. Needs no GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import pkgutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace

from fastdiff.kernels.aot import SHARED_LIMIT, AotSpec, CompileResult, check_arch, compile_spec

PACKAGE = "fastdiff.kernels"
NOT_KERNELS = {"aot", "report", "layouts"}
_TABLE_HEADER = ("| config | constexprs; warps, stages; ints the JIT knows %16 | target | shared B (% of limit) "
                 "| registers | spills B | ld.global B x count | status |")


@dataclass(frozen=True)
class Row:
    kernel: str
    spec: AotSpec
    result: CompileResult


@dataclass
class Report:
    rows: list[Row]
    module_errors: dict[str, str]  # kernel -> why its specs could not be listed
    archs: list[int]
    seconds: float

    @property
    def failed(self) -> int:
        return sum(not row.result.ok for row in self.rows) + len(self.module_errors)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and self.failed == 0


def kernel_modules(names: list[str] | None = None) -> dict[str, str]:
    """Kernel name -> module name. No ``names``: every module of the package except this
    tooling; a plain name means ``fastdiff.kernels.<name>``, a dotted one is taken as is."""
    if names:
        return {name: name if "." in name else f"{PACKAGE}.{name}" for name in names}
    package = importlib.import_module(PACKAGE)
    found = sorted(info.name for info in pkgutil.iter_modules(package.__path__))
    return {name: f"{PACKAGE}.{name}" for name in found if name not in NOT_KERNELS}


def load_specs(module_name: str) -> list[AotSpec] | None:
    """The module's ``aot_specs()``, or None when it defines none (a helper module)."""
    module = importlib.import_module(module_name)
    aot_specs = getattr(module, "aot_specs", None)
    return None if aot_specs is None else list(aot_specs())


@functools.lru_cache(maxsize=None)
def _worker_specs(module_name: str) -> list[AotSpec]:
    return load_specs(module_name)


def _compile_job(module_name: str, index: int, arch: int) -> CompileResult:
    # Workers get names, not specs: a JITFunction does not pickle.
    return compile_spec(_worker_specs(module_name)[index], arch)


def _dedup_key(spec: AotSpec, arch: int) -> tuple:
    fn = spec.fn
    return (getattr(fn, "__module__", None), getattr(fn, "__name__", repr(fn)), tuple(sorted(spec.signature.items())),
            tuple(sorted((k, repr(v)) for k, v in spec.constexprs.items())), repr(spec.attrs), spec.vector_load_bytes,
            spec.vector_loads, spec.num_warps, spec.num_stages, arch)


@contextlib.contextmanager
def compile_environment():
    """No interpreter (it would turn kernels into InterpretedFunctions) and a fresh Triton cache
    (so every run really compiles), for this process and the workers it starts."""
    saved = {key: os.environ.get(key) for key in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    with tempfile.TemporaryDirectory(prefix="fastdiff-aot-") as cache_dir:
        os.environ.pop("TRITON_INTERPRET", None)
        os.environ["TRITON_CACHE_DIR"] = cache_dir
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def collect_specs(names: list[str] | None = None) -> tuple[list[tuple[str, str, int, AotSpec]], dict[str, str]]:
    """(kernel, module, index, spec) for every config, and the kernels whose configs could not
    be listed, with the reason."""
    jobs: list[tuple[str, str, int, AotSpec]] = []
    module_errors: dict[str, str] = {}
    for kernel, module_name in kernel_modules(names).items():
        try:
            specs = load_specs(module_name)
        except Exception as exc:  # a broken module is reported, the others still compile
            module_errors[kernel] = f"{type(exc).__name__}: {exc}"
            continue
        if specs is None:
            if names:
                module_errors[kernel] = f"{module_name} defines no aot_specs()"
        elif not specs:
            module_errors[kernel] = "aot_specs() returned no config"
        else:
            jobs += [(kernel, module_name, index, spec) for index, spec in enumerate(specs)]
    return jobs, module_errors


def build_report(names: list[str] | None = None, archs: list[int] | tuple[int, ...] = (80, 90),
                 workers: int = 2) -> Report:
    archs = [check_arch(arch) for arch in archs]
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    start = time.perf_counter()
    with compile_environment():
        jobs, module_errors = collect_specs(names)
        # Identical configs (same kernel, types, constexprs and options) compile once.
        distinct: dict[tuple, tuple[str, int, int]] = {}
        for _, module_name, index, spec in jobs:
            for arch in archs:
                distinct.setdefault(_dedup_key(spec, arch), (module_name, index, arch))
        by_key = dict(zip(distinct, _run(list(distinct.values()), workers)))
    rows = [Row(kernel, spec, replace(by_key[_dedup_key(spec, arch)], name=spec.name))
            for kernel, _, _, spec in jobs for arch in archs]
    return Report(rows, module_errors, archs, time.perf_counter() - start)


def _run(jobs: list[tuple[str, int, int]], workers: int) -> list[CompileResult]:
    if workers == 1 or len(jobs) <= 1:
        return [_compile_job(*job) for job in jobs]
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        return list(pool.map(_compile_job, *zip(*jobs), chunksize=4))


def _status(result: CompileResult) -> str:
    if result.error is not None:
        # Triton's CompilationError starts with the source position and ends with the cause.
        lines = [line.strip() for line in result.error.splitlines() if line.strip()]
        summary = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        return "FAILED: " + summary[:200]
    if not result.fits:
        return "FAILED: over the shared-memory limit"
    if result.vectorised is False:
        return "FAILED: tile loads not vectorised"
    status = "ok (spills)" if result.spill_bytes else "ok"
    return status + (", vectorised" if result.vectorised else "")


def _loads_cell(result: CompileResult) -> str:
    if not result.load_bytes:
        return "-"
    return " ".join(f"{width}x{count}" for width, count in result.load_bytes.items())


def _shared_cell(result: CompileResult) -> str:
    if result.shared_bytes is None:
        return "-"
    return f"{result.shared_bytes:,} ({100 * result.shared_bytes / result.shared_limit:.0f}%)"


def format_markdown(report: Report) -> str:
    lines = []
    kernels = list(dict.fromkeys([row.kernel for row in report.rows] + list(report.module_errors)))
    for kernel in kernels:
        lines += ["", f"### {kernel}", ""]
        if kernel in report.module_errors:
            lines.append(f"FAILED to list configs: {report.module_errors[kernel]}")
            continue
        lines += [_TABLE_HEADER, "|---|---|---|---:|---:|---:|---|---|"]
        for row in (r for r in report.rows if r.kernel == kernel):
            result = row.result
            cells = [result.name, row.spec.describe(), f"sm_{result.arch}", _shared_cell(result),
                     "-" if result.registers is None else str(result.registers),
                     "-" if result.spill_bytes is None else str(result.spill_bytes), _loads_cell(result),
                     _status(result)]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    n_configs = len(report.rows) // max(len(report.archs), 1)
    n_ok = sum(row.result.ok for row in report.rows)
    lines += ["", f"{n_configs} configs x {len(report.archs)} targets: {n_ok} ok, {report.failed} failed "
              f"({report.seconds:.0f} s)"]
    if not report.rows and not report.module_errors:
        lines.append(f"no module of {PACKAGE} defines aot_specs()")
    return "\n".join(lines).lstrip("\n")


def to_json(report: Report) -> dict:
    # triton is optional: imported only where it is used
    import triton

    return {
        "triton_version": triton.__version__,
        "archs": report.archs,
        "shared_limit": {str(arch): SHARED_LIMIT[arch] for arch in report.archs},
        "results": [{"kernel": row.kernel, "config": row.spec.describe(), **asdict(row.result),
                     "ok": row.result.ok} for row in report.rows],
        "module_errors": report.module_errors,
        "failed": report.failed,
        "seconds": round(report.seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.kernels.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT),
                        help="compute capabilities to compile for (default: 80 90)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown tables")
    parser.add_argument("--kernel", nargs="+", metavar="NAME",
                        help="kernel modules to report (short name in fastdiff.kernels, or a dotted module)")
    parser.add_argument("--workers", type=int, default=2, help="compile processes (default: 2)")
    args = parser.parse_args(argv)
    report = build_report(args.kernel, args.arch, args.workers)
    print(json.dumps(to_json(report), indent=1) if args.json else format_markdown(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
