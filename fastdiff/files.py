"""Atomic file and folder writes: a crash or an error leaves the old file (or set) or none,
never half of one. Every file fastdiff writes goes through :func:`atomic_write` or
:func:`atomic_folder`."""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from fastdiff.pause import pause_point


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _temp_path(path: Path, suffix: str = "") -> Path:
    """A fresh temp name beside ``path``; it carries our pid so a later run can tell it is stale."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path) -> list[Path]:
    """Remove the temp files and folders that :func:`atomic_write` / :func:`atomic_folder` left
    beside ``path`` in a process that no longer runs (killed mid-write); returns what went.
    Temps of live processes (and of this one) are left alone."""
    path = Path(path)
    # New names carry the writer's pid; the older form (12 hex digits, no pid) is always stale.
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)-[0-9a-f]{{8}}|[0-9a-f]{{12}})\.tmp")
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None:
            continue
        pid = int(match[1]) if match[1] else None
        if pid is not None and (pid == os.getpid() or _process_alive(pid)):
            continue
        if entry.name.endswith(".tmp.old") and not path.exists():
            os.rename(entry, path)  # killed between _swap_in's two renames: the old set goes back
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def atomic_write(path, write_fn: Callable[[Path], object]) -> Path:
    """Call ``write_fn(tmp_path)`` to write a temp file beside ``path``, then rename it over ``path``.

    The temp name keeps ``path``'s suffix (numpy and PIL pick the format from it). On error the
    temp file is removed and ``path`` is left as it was; temps that a killed earlier run left
    beside ``path`` are removed first. The file gets the usual permissions (0o666 less the
    umask) whatever the writer chose: safetensors writes 0o600.
    """
    path = Path(path)
    remove_stale_temps(path)
    tmp = _temp_path(path, path.suffix)
    try:
        write_fn(tmp)
        os.chmod(tmp, _default_file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        pause_point("atomic-write")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_folder(folder):
    """Write a set of files as one unit: ``with atomic_folder(out) as staging:`` write into
    ``staging``; on a clean exit it replaces ``out`` in one rename, on an error (or Ctrl-C) it
    is removed and ``out`` stays as it was. Killed at any moment, ``out`` holds the whole old
    set or the whole new set, never a mix.

    Files already in ``out`` that the new set does not write are kept (hard-linked into the
    new folder, or copied where links do not work). Entering it creates the staging folder,
    so an unwritable destination fails before any work; stale temps of killed runs go first.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder)
        staging = _temp_path(folder)
        staging.mkdir()
    except OSError as e:
        raise OSError(f"cannot write into {folder}: {e.strerror or e}") from None
    try:
        yield staging
        if folder.is_dir():
            _link_missing(folder, staging)
            shutil.copymode(folder, staging)
        pause_point("folder-staged")
        _swap_in(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _link_missing(source: Path, target: Path) -> None:
    """Hard-link (or copy) every file under ``source`` that ``target`` lacks into ``target``."""
    for entry in source.iterdir():
        destination = target / entry.name
        if entry.is_dir() and not entry.is_symlink():
            destination.mkdir(exist_ok=True)
            _link_missing(entry, destination)
        elif not destination.exists() and not destination.is_symlink():
            try:
                os.link(entry, destination, follow_symlinks=False)
            except OSError:
                shutil.copy2(entry, destination, follow_symlinks=False)


def _swap_in(staging: Path, folder: Path) -> None:
    """Put ``staging`` at ``folder``: an atomic exchange where the OS has one (Linux
    renameat2), else rename the old folder aside, rename the new one in, remove the old."""
    if not folder.exists():
        os.rename(staging, folder)
    elif _exchange(staging, folder):
        shutil.rmtree(staging, ignore_errors=True)  # staging now holds the old set
    else:
        old = _temp_path(folder, ".old")
        os.rename(folder, old)
        os.rename(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_folder(folder.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    # only where renameat2 may exist (Linux)
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
