"""The compiled-artifact cache: what an engine compiled, kept on disk so that the next process
loads it in about a second instead of compiling again.

An entry is a folder ``<root>/<kind>-<digest>/`` holding the engine's files and ``entry.json``
(the kind, the whole key, each file's SHA-256). The digest is the SHA-256 of the key: the key
holds everything that changes the compiled code (:mod:`fastdiff.engines.keys` builds its parts). Before use an entry
is verified: its manifest must name this kind and key and every file its checksum. A missing,
corrupted, truncated or foreign entry is rebuilt, with one warning when it existed.

Writes are atomic (:func:`fastdiff.files.atomic_folder`: a build goes to a temp folder, renamed
into place whole; a killed build leaves a temp folder the next build removes, never an entry).
Processes on one machine (torchrun ranks) take a lock file per entry around check-and-build,
so one builds and the others wait, then load it. The total size is capped: after each build
the least recently used entries (a hit touches the manifest) go until the rest fit.

Where: ``$FASTDIFF_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastdiff``, else ``~/.cache/fastdiff``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastdiff.files import atomic_folder, atomic_write, remove_stale_temps

CACHE_DIR_ENV = "FASTDIFF_CACHE_DIR"
MAX_BYTES_ENV = "FASTDIFF_CACHE_MAX_BYTES"
#: Default size cap (an inductor entry of the built-in model is ~8 MB, a CIFAR-10 one ~150 MB).
DEFAULT_MAX_BYTES = 4 * 2**30
MANIFEST = "entry.json"
FORMAT = 1


def default_root() -> Path:
    """``$FASTDIFF_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastdiff``, else ``~/.cache/fastdiff``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastdiff"


def digest(value) -> str:
    """SHA-256 of a JSON-able value (dict keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


@dataclass(frozen=True)
class Entry:
    """A verified entry: its folder, and whether it was found (``hit``) or built."""

    path: Path
    hit: bool


@dataclass(frozen=True)
class EntryInfo:
    """An entry as ``fastdiff cache list`` shows it."""

    path: Path
    kind: str
    key: dict
    size: int
    last_used: float


class ArtifactCache:
    """Compiled artifacts under ``root`` (default :func:`default_root`), at most ``max_bytes``
    in total (default ``$FASTDIFF_CACHE_MAX_BYTES`` or 4 GiB)."""

    def __init__(self, root=None, max_bytes: int | None = None):
        self.root = Path(root) if root is not None else default_root()
        if max_bytes is None:
            max_bytes = int(os.environ.get(MAX_BYTES_ENV, DEFAULT_MAX_BYTES))
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes

    def __repr__(self) -> str:
        return f"ArtifactCache({str(self.root)!r})"

    def folder(self, kind: str, key: dict) -> Path:
        return self.root / f"{kind}-{digest({'kind': kind, 'key': key})[:32]}"

    def entry(self, kind: str, key: dict, build: Callable[[Path], object]) -> Entry:
        """The verified entry for (``kind``, ``key``): found, or built by ``build(folder)``
        (which writes the engine's files into ``folder``) and stored."""
        key = json.loads(json.dumps(key))  # as the manifest will hold it (tuples become lists)
        folder = self.folder(kind, key)
        with self._locked(folder):
            problem = verify(folder, kind, key)
            if problem is None:
                os.utime(folder / MANIFEST)  # least recently used goes first
                return Entry(folder, True)
            if problem != "missing":
                warnings.warn(f"fastdiff cache: {folder} {problem}; rebuilding it", RuntimeWarning, stacklevel=3)
                shutil.rmtree(folder, ignore_errors=True)
            with atomic_folder(folder) as staging:
                build(staging)
                files = {p.relative_to(staging).as_posix(): file_sha256(p)
                         for p in sorted(staging.rglob("*")) if p.is_file()}
                manifest = {"format": FORMAT, "kind": kind, "key": key, "files": files}
                atomic_write(staging / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
        self.evict(keep=folder)
        return Entry(folder, False)

    def entries(self) -> list[EntryInfo]:
        """The entries, least recently used first (unreadable ones with kind "?")."""
        found = []
        for folder in sorted(self.root.glob("*-*")) if self.root.is_dir() else ():
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            manifest = _read_manifest(folder) or {}
            try:
                last_used = (folder / MANIFEST).stat().st_mtime
            except OSError:
                last_used = 0.0
            found.append(EntryInfo(folder, manifest.get("kind", "?"), manifest.get("key", {}), _size(folder),
                                   last_used))
        return sorted(found, key=lambda e: e.last_used)

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used entries (never ``keep``, nor one another process holds)
        until the total fits ``max_bytes``; returns what went."""
        entries = self.entries()
        total = sum(e.size for e in entries)
        removed = []
        for e in entries:
            if total <= self.max_bytes:
                break
            if e.path == keep or not self._remove(e.path):
                continue
            total -= e.size
            removed.append(e.path)
        return removed

    def clear(self) -> list[Path]:
        """Remove every entry no other process holds; returns what went."""
        return [e.path for e in self.entries() if self._remove(e.path)]

    def _remove(self, folder: Path) -> bool:
        with self._locked(folder, wait=False) as held:
            if held:
                shutil.rmtree(folder, ignore_errors=True)
                remove_stale_temps(folder)  # the lock file stays: a process may be waiting on it
            return held

    def _lock_path(self, folder: Path) -> Path:
        return folder.with_name(f".{folder.name}.lock")

    @contextlib.contextmanager
    def _locked(self, folder: Path, wait: bool = True):
        """Hold ``folder``'s lock file (yields False when ``wait`` is off and another holds it).
        The OS drops the lock of a killed process. Without fcntl (Windows) there is no lock:
        racing builds then each write their own temp folder and the last rename wins whole."""
        try:
            import fcntl  # POSIX only
        except ImportError:
            yield True
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path(folder), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def verify(folder: Path, kind: str, key: dict) -> str | None:
    """None when ``folder`` is a whole entry of this kind and key, else what is wrong with it."""
    if not folder.exists():
        return "missing"
    manifest = _read_manifest(folder)
    if manifest is None:
        return "has no readable manifest"
    if manifest.get("format") != FORMAT or manifest.get("kind") != kind or manifest.get("key") != key:
        return "belongs to another key"
    for name, sha in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"lacks {name}"
        if file_sha256(path) != sha:
            return f"has a corrupted {name} (checksum differs)"
    return None


def _read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
