"""The dry run's checks of this tree against the GPU machine's image, without a GPU: what the image
holds (the device tool's KINDS.md, read 2026-11), that nothing fastdiff imports needs what it lacks,
that the gpu tests collect there, and that the tree fits what the device tool carries."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: The GPU image's versions (python3 there is /opt/torch/.venv/bin/python3).
IMAGE = {"python": "3.12", "torch": "2.11", "triton": "3.6", "numpy": "2.5"}
#: Installed here for the CPU paths and the tests, absent there (no registry can be reached from it).
ABSENT_ON_IMAGE = ("diffusers", "openvino")
#: Standard-library modules Python 3.12 removed (PEP 594, PEP 632, imp).
REMOVED_IN_PY312 = frozenset({"distutils", "imp", "asynchat", "asyncore", "smtpd"})
#: What the device tool copies to the machine: the working tree plus carried paths.
TRAVEL_LIMIT_BYTES = 64 * 2**20
SOURCE_FOLDERS = ("fastdiff", "kernels", "tests", "benchmarks")

#: Run by a fresh interpreter before anything imports fastdiff: the tree as the GPU machine sees it
#: with ``PYTHONPATH=.`` -- no editable install's finder, and the packages the image lacks absent.
_IMAGE_SHIM = """
import importlib.abc, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, '__module__', '').startswith('__editable__')]
sys.path_importer_cache.clear()
sys.path.insert(0, {root!r})
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {absent!r}:
            raise ModuleNotFoundError(f'No module named {{name!r}} (absent on the GPU image)', name=name)
sys.meta_path.insert(0, Absent())
"""

#: Then: import every fastdiff module, and collect what ``pytest -m gpu`` would run.
_IMPORT_AND_COLLECT = """
import importlib, json, pkgutil, fastdiff, fastdiff.kernels, pytest
failed = {}
for package in (fastdiff, fastdiff.kernels):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):
        try:
            importlib.import_module(module.name)
        except Exception as e:
            failed[module.name] = f'{type(e).__name__}: {e}'
print('IMPORTS ' + json.dumps({'kernels_from': fastdiff.kernels.__file__, 'failed': failed}), flush=True)
code = pytest.main(['--collect-only', '-q', '-m', 'gpu', '-p', 'no:cacheprovider', 'tests',
                    'benchmarks/test_bench_ops.py'])
print(f'COLLECT_EXIT {int(code)}')
"""


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def as_on_image() -> tuple[list[str], list[str]]:
    """(import problems, collection problems) of the tree as the GPU machine sees it: every fastdiff
    module imports with diffusers and openvino absent, and ``pytest -m gpu`` collects gpu tests."""
    shim = _IMAGE_SHIM.format(root=str(ROOT), absent=set(ABSENT_ON_IMAGE))
    done = subprocess.run([sys.executable, "-c", shim + _IMPORT_AND_COLLECT], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    imported = re.search(r"^IMPORTS (.*)$", done.stdout, re.MULTILINE)
    if not imported:
        failure = [f"importing fastdiff failed (exit {done.returncode}): {done.stderr.strip()[-600:]}"]
        return failure, failure
    result = json.loads(imported.group(1))
    import_problems = [f"{name}: {error}" for name, error in sorted(result["failed"].items())]
    if Path(result["kernels_from"]).resolve() != ROOT / "kernels" / "__init__.py":
        import_problems.append(f"fastdiff.kernels came from {result['kernels_from']}, not this tree's kernels/")
    collected = re.search(r"(\d+)(?:/\d+)? tests? collected", done.stdout)
    exit_code = re.search(r"^COLLECT_EXIT (\d+)", done.stdout, re.MULTILINE)
    if not exit_code or exit_code.group(1) != "0" or not collected or collected.group(1) == "0":
        tail = done.stdout.rpartition("IMPORTS")[2].strip()[-600:]
        return import_problems, [f"pytest --collect-only -m gpu failed: {tail}"]
    return import_problems, []


def removed_stdlib_imports(root: Path = ROOT, folders=SOURCE_FOLDERS) -> list[str]:
    """Imports of standard-library modules that Python 3.12 (the image's) no longer has."""
    problems = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                problems += [f"{path.relative_to(root)}:{node.lineno}: imports {name} (removed in Python 3.12)"
                             for name in names if name.split(".")[0] in REMOVED_IN_PY312]
    return problems


_COMPILE_ALL = """
import sys, warnings
warnings.simplefilter('error', SyntaxWarning)  # 3.12 warns of invalid escape sequences
for path in sys.argv[1:]:
    try:
        compile(open(path).read(), path, 'exec')
    except (SyntaxError, SyntaxWarning) as e:
        print(f'{path}: {type(e).__name__}: {e}')
"""


def _python312() -> str | None:
    """A Python 3.12 interpreter that runs: on PATH, or one pyenv installed (its shim may not select it)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    for candidate in [shutil.which("python3.12"), *map(str, sorted(pyenv.glob("versions/3.12*/bin/python3.12")))]:
        if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True, timeout=30).returncode == 0:
            return candidate
    return None


def python312_syntax(root: Path = ROOT, folders=SOURCE_FOLDERS) -> tuple[str, list[str]]:
    """(how checked, problems): every source file compiles under a Python 3.12 (the image's version),
    its new SyntaxWarnings as errors; where there is none, only this interpreter's parser did."""
    python312 = _python312()
    if python312 is None:
        return "not checked: no python3.12 here", []
    files = [str(p) for folder in folders for p in sorted((root / folder).rglob("*.py"))]
    done = subprocess.run([python312, "-c", _COMPILE_ALL, *files], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        return f"with {python312}", [f"{python312} failed: {done.stderr.strip()[-300:]}"]
    return f"with {python312}", done.stdout.splitlines()


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def requirement_floors(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """The ``>=`` floors pyproject.toml sets for python and the image's packages."""
    text = pyproject.read_text()
    floors = {name: found.group(1) for name in IMAGE if name != "python"
              for found in [re.search(rf'"{name}>=([\d.]+)', text)] if found}
    python = re.search(r'requires-python\s*=\s*">=([\d.]+)"', text)
    if python:
        floors["python"] = python.group(1)
    return floors


def version_problems(floors: dict[str, str] | None = None) -> list[str]:
    """A requirement floor above what the image has would make fastdiff refuse (or miss) it there."""
    floors = requirement_floors() if floors is None else floors
    return [f"pyproject asks {name}>={floor}, the GPU image has {IMAGE[name]}"
            for name, floor in floors.items() if _version_tuple(floor) > _version_tuple(IMAGE[name])]


def local_versions() -> dict[str, str | None]:
    import importlib.metadata

    versions = {"python": ".".join(map(str, sys.version_info[:3]))}
    for name in IMAGE:
        if name != "python":
            try:
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                versions[name] = None
    return versions


def travelling_bytes(carry: tuple[str, ...] = (".whl",)) -> int:
    """Bytes the device tool copies: tracked and untracked-not-ignored files, and ``carry`` if present."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60).stdout.split("\0")
    files = [ROOT / name for name in listed if name]
    for path in carry:
        files += [p for p in (ROOT / path).rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if p.is_file())


def size_problems() -> list[str]:
    size = travelling_bytes()
    if size > TRAVEL_LIMIT_BYTES:
        return [f"the tree and .whl/ are {size / 2**20:.1f} MiB, the device tool carries {TRAVEL_LIMIT_BYTES >> 20}"]
    return []


def image_checks() -> list[tuple[str, list[str]]]:
    """(check, problems) for each check of the tree against the GPU image; empty problems: it passed."""
    import_problems, collect_problems = as_on_image()
    how, syntax_problems = python312_syntax()
    return [
        (f"every source file compiles as Python 3.12 ({how})", syntax_problems),
        (f"requirement floors vs the image ({IMAGE}; here {local_versions()})", version_problems()),
        ("no standard-library module Python 3.12 removed", removed_stdlib_imports()),
        ("every fastdiff module imports with PYTHONPATH=. and no diffusers/openvino", import_problems),
        ("pytest -m gpu collects there", collect_problems),
        (f"working tree + .whl/ within {TRAVEL_LIMIT_BYTES >> 20} MiB", size_problems()),
    ]
