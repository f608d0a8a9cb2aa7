"""List or clear the compiled-artifact cache (what `fastdiff compile` and `fastdiff sample --accelerate` keep)."""
from __future__ import annotations

import argparse
import datetime


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "clear"), help="list the entries, or remove them all")
    parser.add_argument("--cache-dir", metavar="FOLDER",
                        help="compiled-artifact cache (default: $FASTDIFF_CACHE_DIR, else $XDG_CACHE_HOME/fastdiff)")


def run(args: argparse.Namespace) -> int:
    from fastdiff.engines.cache import ArtifactCache

    cache = ArtifactCache(args.cache_dir)
    if cache.root.exists() and not cache.root.is_dir():
        from fastdiff.commands import UsageError

        raise UsageError(f"--cache-dir {cache.root}: exists and is not a folder")
    if args.action == "clear":
        removed = cache.clear()
        print(f"removed {len(removed)} entries from {cache.root}")
        return 0
    entries = cache.entries()
    print(f"{cache.root}: {len(entries)} entries, {sum(e.size for e in entries) / 2**20:.1f} MiB "
          f"(cap {cache.max_bytes / 2**20:.0f} MiB; least recently used first)")
    for e in entries:
        used = datetime.datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M")
        print(f"  {e.path.name}  {e.kind:<13} {e.size / 2**20:8.1f} MiB  used {used}  {describe_key(e.key)}")
    return 0


def describe_key(key: dict) -> str:
    """The parts of a key a person tells entries apart by: model class, dtype, shapes, threads."""
    parts = [key.get("model", {}).get("class", "").rpartition(".")[2], key.get("dtype")]
    if "signature" in key:
        parts.append(key["signature"][0])
    if "shapes" in key:
        parts.append(f"shapes {key['shapes']}")
    if "threads" in key:
        parts.append(f"{key['threads']} threads")
    return ", ".join(str(p) for p in parts if p)
