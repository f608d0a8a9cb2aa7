"""Time to first image, cold (empty compiled-artifact cache) against warm (cache hit), in one run.

Each case runs ``fastdiff sample --accelerate ...`` as a new process three times: ``--no-cache``
(today's in-process compile), then into an empty ``--cache-dir`` (cold: compile and store),
then again (warm: load). Each process gets an empty inductor cache folder of its own
(``TORCHINDUCTOR_CACHE_DIR``), so no run reuses inductor's on-disk caches of another: "no
cache" and "cold" are first runs, "warm" loads from fastdiff's cache alone. Time to first image is process start to images written: measured
here around the process (until it exits) and printed by the command itself. The cold and warm
images must be equal bit for bit. Writes ttfi.json beside this script.

    python benchmarks/compile_cache/ttfi.py [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fastdiff.bench.environment import collect
from fastdiff.files import atomic_write

GOAL = ["--accelerate", "--sampler", "dpm++3m", "--steps", "8", "--no-progress"]
CASES = {
    "built-in model, inductor (float32), batch 64": ["--batch", "64"],
    "built-in model, OpenVINO (bfloat16), batch 64": ["--batch", "64", "--dtype", "bfloat16"],
    "CIFAR-10 config, OpenVINO (bfloat16), batch 16": ["--config", "cifar10", "--batch", "16", "--dtype", "bfloat16"],
}


def run(args: list[str], out: Path) -> dict:
    load_before = os.getloadavg()
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(out.with_name(out.name + "-inductor"))}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fastdiff.cli", "sample", *args, "--out", str(out)],
                          capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{args} failed: {done.stderr}")
    said = re.search(r"time to first image ([\d.]+) s", done.stdout)
    warmup = re.search(r"^warm-up: (.*) in ([\d.]+) s", done.stdout, re.M)
    return {"wall_s": round(seconds, 2), "reported_ttfi_s": float(said[1]), "warmup": warmup[1],
            "warmup_s": float(warmup[2]), "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "path": re.search(r"^path: +(.*)$", done.stdout, re.M)[1]}


def images(out: Path) -> np.ndarray:
    with np.load(out / "samples.npz") as data:
        return data["images"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="2", help="--threads of every run (part of the cache key)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("ttfi.json"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for n, (name, case) in enumerate(CASES.items()):
            command = [*GOAL, *case, "--threads", args.threads]
            cache = scratch / f"cache{n}"
            row = {"case": name, "command": "fastdiff sample " + " ".join(command)}
            row["no_cache"] = run([*command, "--no-cache"], scratch / f"{n}-none")
            row["cold"] = run([*command, "--cache-dir", str(cache)], scratch / f"{n}-cold")
            row["warm"] = run([*command, "--cache-dir", str(cache)], scratch / f"{n}-warm")
            row["warm_images_equal_cold_bit_for_bit"] = bool(np.array_equal(images(scratch / f"{n}-cold"),
                                                                             images(scratch / f"{n}-warm")))
            results.append(row)
            print(json.dumps(row, indent=1), flush=True)
    report = {"environment": collect("cpu"), "threads": args.threads, "results": results}
    atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
