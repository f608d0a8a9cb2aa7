"""The ``fastdiff`` command line: argument parsing only; each subcommand calls the Python API.

Subcommands live in :data:`COMMANDS` as ``name -> module``; a module defines
``configure(parser)`` and ``run(args) -> int`` and is imported only when its command runs,
so ``fastdiff --help`` stays fast (no torch import).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys

import fastdiff

COMMANDS = {
    "sample": "fastdiff.commands.sample",
    "info": "fastdiff.commands.info",
    "verify": "fastdiff.commands.verify",
    "train": "fastdiff.commands.train",
    "fidelity": "fastdiff.commands.fidelity",
    "bench": "fastdiff.commands.bench",
}


def main(argv: list[str] | None = None) -> int:
    """Run ``fastdiff`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS:
            return _run_command(argv[0], argv[1:])
        _top_parser().parse_args(argv)  # --help, --version, or an error for an unknown command
        return 2
    except SystemExit as e:  # argparse exits on --help and on errors; report its code instead
        return e.code if isinstance(e.code, int) else 1


def _run_command(name: str, argv: list[str]) -> int:
    from fastdiff.commands import UsageError

    module = importlib.import_module(COMMANDS[name])
    parser = argparse.ArgumentParser(prog=f"fastdiff {name}", description=_summary(COMMANDS[name]))
    module.configure(parser)
    args = parser.parse_args(argv)
    try:
        return module.run(args)
    except UsageError as e:
        parser.error(str(e))


def _top_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<10} {_summary(module)}" for name, module in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="fastdiff",
        description="Fused Triton kernels and a fast sampling loop for DDPM/DDIM diffusion models.",
        epilog=f"commands:\n{listing}\n\nRun `fastdiff COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fastdiff {fastdiff.__version__}")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    return parser


def _summary(module_name: str) -> str:
    """First line of a command module's docstring, read from its source without importing it."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        return ""
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


if __name__ == "__main__":
    sys.exit(main())
