"""The measurements of README's "Scale" section: large-N sharded sampling with the shipped model.

    python benchmarks/scale/run.py --work /tmp/fastdiff-scale      (~30-60 min on 2 busy cores)

1. killed: 10,000 images (DDIM 50, shards of 100) under `torchrun --nproc-per-node 2`; rank 1
   is killed with SIGKILL once ``--kill-after`` shards are on disk, then the same command is
   run again and resumes. 2. fidelity: the Fréchet distance of the 10,000 images to the
   held-out digits in fastdiff.bench.fidelity's feature space. 3. compare: throughput of 1 vs 2
   processes on ``--compare-images`` fresh images. 4. corrupt: two shards of the finished set
   damaged, the command re-run. Updates benchmarks/scale/results.json (images stay in --work).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent


def sample_command(out: Path, num_images: int, processes: int) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    if processes == 1:
        launcher = [sys.executable]
    return launcher + ["-m", "fastdiff.cli", "sample", "--sampler", "ddim", "--steps", "50", "--seed", "0",
                       "--num-images", str(num_images), "--shard-size", "100", "--merge", "--no-progress",
                       "--out", str(out)]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(command: list[str], log: Path, env: dict | None = None) -> dict:
    start, load_before = time.perf_counter(), load()
    with open(log, "w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}).returncode
    return {"command": " ".join(command[1:]), "exit_code": code, "seconds": round(time.perf_counter() - start, 1),
            "load_before": load_before, "load_after": load(), "log_tail": log.read_text().splitlines()[-4:]}


def shard_folders(out: Path) -> list[str]:
    folder = out / "shards"
    return sorted(p.name for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def killed_run(out: Path, kill_after: int, log: Path) -> dict:
    """Start the 2-process run, SIGKILL rank 1 once ``kill_after`` shards exist, wait for torchrun."""
    command = sample_command(out, 10_000, 2)
    start, load_before = time.perf_counter(), load()
    with open(log, "w") as f:
        agent = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT)
        victim = None
        while agent.poll() is None and victim is None:
            time.sleep(1)
            if len(shard_folders(out)) >= kill_after:
                for child in psutil.Process(agent.pid).children(recursive=True):
                    if child.environ().get("RANK") == "1":
                        victim = child
                        break
        if victim is None:
            raise RuntimeError("the run ended before rank 1 could be killed")
        victim.send_signal(signal.SIGKILL)
        code = agent.wait()
    temporaries = sorted(p.name for p in (out / "shards").glob(".*.tmp"))
    return {"command": " ".join(command[1:]), "exit_code": code, "seconds": round(time.perf_counter() - start, 1),
            "killed": f"rank 1 (pid {victim.pid}) with SIGKILL once {kill_after} shards were on disk",
            "shards_on_disk_after_kill": len(shard_folders(out)), "temporary_folders_left": temporaries,
            "manifest_written": (out / "manifest.json").exists(), "load_before": load_before, "load_after": load()}


def frechet_to_heldout(out: Path) -> dict:
    import numpy as np
    import torch

    from fastdiff.bench.fidelity import DigitsFeatures, frechet_distance
    from fastdiff.training.data import load_digits_dataset

    with np.load(out / "images.npz") as data:
        images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    features = DigitsFeatures.fit()
    heldout, train = load_digits_dataset("heldout").images, load_digits_dataset("train").images
    f_samples, f_heldout = features.features(images), features.features(heldout)
    return {"fd_samples_heldout": frechet_distance(f_samples, f_heldout),
            "fd_train_heldout": frechet_distance(features.features(train), f_heldout),
            "num_samples": len(images), "num_heldout": len(heldout), "classifier_heldout_accuracy": features.heldout_accuracy,
            "label_histogram_samples": features.label_histogram(images)}


def corrupted_run(out: Path, log: Path) -> dict:
    """Damage two shards of the finished set (one PNG byte flipped, one npz deleted) and re-run."""
    png = out / "shards" / "00042" / "0004217.png"
    data = bytearray(png.read_bytes())
    data[len(data) // 2] ^= 0xFF
    png.write_bytes(bytes(data))
    (out / "shards" / "00077" / "images.npz").unlink()
    before = json.loads((out / "manifest.json").read_text())["images_sha256_of_shards"]
    result = run(sample_command(out, 10_000, 2), log)
    after = json.loads((out / "manifest.json").read_text())["images_sha256_of_shards"]
    return {"damaged": ["shards/00042/0004217.png: one byte flipped", "shards/00077/images.npz: deleted"],
            "set_checksum_unchanged_after_redo": before == after, **result}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/fastdiff-scale"))
    parser.add_argument("--kill-after", type=int, default=30, help="shards on disk before rank 1 is killed")
    parser.add_argument("--compare-images", type=int, default=200, help="at least 2 shards, so both processes work")
    parser.add_argument("--compare", default="1_process_1_thread,1_process_default_threads,2_processes")
    parser.add_argument("--phases", default="killed,fidelity,compare,corrupt",
                        help="comma-separated: killed (kill + resume), fidelity, compare (1 vs 2 processes), corrupt")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    results_file = HERE / "results.json"
    results: dict = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results["machine"] = f"{os.cpu_count()} CPU cores, shared with other jobs (see load averages)"
    big = args.work / "ddim50_n10000"

    def save():
        results_file.write_text(json.dumps(results, indent=2) + "\n")

    if "killed" in phases:
        results["interrupted"] = killed_run(big, args.kill_after, args.work / "killed.log")
        results["resumed"] = run(sample_command(big, 10_000, 2), args.work / "resumed.log")
        manifest = json.loads((big / "manifest.json").read_text())
        results["manifest"] = {"settings": manifest["settings"], "num_shards": manifest["num_shards"],
                               "world_size": manifest["world_size"], "finished_utc": manifest["finished_utc"],
                               "images_sha256_of_shards": manifest["images_sha256_of_shards"],
                               "first_shard": manifest["shards"][0]}
        save()
    if "fidelity" in phases:
        results["fidelity"] = frechet_to_heldout(big)
        save()
    if "compare" in phases:
        # torchrun gives each of its processes one thread; one process alone takes torch's default.
        configs = (("1_process_1_thread", 1, {"OMP_NUM_THREADS": "1"}),
                   ("1_process_default_threads", 1, {}), ("2_processes", 2, {}))
        for name, processes, env in [c for c in configs if c[0] in args.compare.split(",")]:
            out = args.work / f"compare_{name}"
            shutil.rmtree(out, ignore_errors=True)
            entry = run(sample_command(out, args.compare_images, processes), args.work / f"compare_{name}.log", env)
            entry["images_per_s"] = round(args.compare_images / entry["seconds"], 2)
            entry["num_images"] = args.compare_images
            results[f"throughput_{name}"] = entry
            save()
    if "corrupt" in phases:
        results["corrupted_and_redone"] = corrupted_run(big, args.work / "corrupt.log")
        save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
