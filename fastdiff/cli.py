"""The ``fastdiff`` command line: argument parsing only; each subcommand calls the Python API.

Subcommands live in :data:`COMMANDS` as ``name -> module``; a module defines
``configure(parser)`` and ``run(args) -> int`` and is imported only when its command runs,
so ``fastdiff --help`` stays fast (no torch import).

Failures: a bad argument is argparse's usage message and exit code 2; any other error is one
line on stderr (``fastdiff CMD: error: ...``) and exit code 2, with the traceback only under
``--debug``; Ctrl-C is one line and exit code 130 (temp files are removed as the writers unwind).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import sys
import traceback

import fastdiff

#: Exit codes: a failure of any kind, and an interrupt (128 + SIGINT, as shells report it).
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

COMMANDS = {
    "sample": "fastdiff.commands.sample",
    "info": "fastdiff.commands.info",
    "verify": "fastdiff.commands.verify",
    "train": "fastdiff.commands.train",
    "fidelity": "fastdiff.commands.fidelity",
    "bench": "fastdiff.commands.bench",
    "compile": "fastdiff.commands.compile",
    "cache": "fastdiff.commands.cache",
    "tune-steps": "fastdiff.commands.tune_steps",
}


def main(argv: list[str] | None = None) -> int:
    """Run ``fastdiff`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    # OpenMP threads that wait passively yield their core instead of spinning on it, which on a
    # machine other processes load is many times slower (README, "Limitations": threads).
    # Takes effect only before torch is first imported; a value the user set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    prog = f"fastdiff {argv[0]}" if argv and argv[0] in COMMANDS else "fastdiff"
    try:
        if argv and argv[0] in COMMANDS:
            return _run_command(argv[0], argv[1:])
        _top_parser().parse_args(argv)  # --help, --version, or an error for an unknown command
        return EXIT_ERROR
    except SystemExit as e:  # argparse exits on --help and on errors; report its code instead
        return e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 -- every failure is one line and exit code 2
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(e)}" + ("" if debug else " (--debug shows the traceback)"), file=sys.stderr)
        return EXIT_ERROR


def one_line(error: BaseException) -> str:
    """``error`` as one line: its type (unless a plain ValueError/UsageError) and message."""
    message = " ".join(str(error).split()) or "(no message)"
    plain = type(error).__name__ in ("ValueError", "UsageError")
    return message if plain else f"{type(error).__name__}: {message}"


def _run_command(name: str, argv: list[str]) -> int:
    from fastdiff.commands import UsageError

    module = importlib.import_module(COMMANDS[name])
    parser = argparse.ArgumentParser(prog=f"fastdiff {name}", description=_summary(COMMANDS[name]))
    module.configure(parser)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    args = parser.parse_args(argv)
    try:
        return module.run(args)
    except UsageError as e:
        parser.error(one_line(e))


def _top_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<10} {_summary(module)}" for name, module in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="fastdiff",
        description="Fused Triton kernels and a fast sampling loop for DDPM/DDIM diffusion models.",
        epilog=f"commands:\n{listing}\n\nRun `fastdiff COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fastdiff {fastdiff.__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
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
