"""fastdiff.engines.cache: entries found by key and verified before use, rebuilt with one warning
when corrupted, built once by racing processes, evicted least recently used first; and the
Sampler's compiled steps through it: every part of the key makes a new entry, and a cache hit
samples the same images as the fresh compile, bit for bit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn

import fastdiff
from fastdiff.engines import cache as cache_module
from fastdiff.engines.cache import MANIFEST, ArtifactCache, default_root, verify
from fastdiff.engines.inductor import PACKAGE
from fastdiff.sampling.sampler import Sampler
from fastdiff.schedulers import ddim_table, linear_schedule

TABLE = ddim_table(linear_schedule(), steps=2, eta=0.5)
KEY = {"model": "m", "batch": 2}


class Builds:
    """A build function writing one file, counting its calls."""

    def __init__(self, payload: bytes = b"compiled code"):
        self.calls, self.payload = 0, payload

    def __call__(self, folder):
        self.calls += 1
        (folder / "artifact.bin").write_bytes(self.payload)


def test_found_by_key_and_any_change_of_key_or_kind_is_another_entry(tmp_path):
    cache, build = ArtifactCache(tmp_path), Builds()
    first = cache.entry("inductor", KEY, build)
    assert not first.hit and build.calls == 1 and (first.path / "artifact.bin").read_bytes() == b"compiled code"
    again = cache.entry("inductor", dict(KEY), build)
    assert again.hit and again.path == first.path and build.calls == 1
    others = [cache.entry("inductor", {**KEY, "batch": 3}, build), cache.entry("inductor", {**KEY, "x": 1}, build),
              cache.entry("openvino", KEY, build)]
    assert build.calls == 4 and len({first.path, *(e.path for e in others)}) == 4
    assert verify(first.path, "inductor", KEY) is None and verify(first.path, "inductor", {**KEY, "batch": 3})


def test_default_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTDIFF_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "fastdiff"
    monkeypatch.setenv("FASTDIFF_CACHE_DIR", str(tmp_path / "mine"))
    assert default_root() == ArtifactCache().root == tmp_path / "mine"


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "drop the manifest", "foreign manifest"])
def test_a_damaged_entry_is_rebuilt_with_one_warning_never_loaded(tmp_path, damage):
    cache, build = ArtifactCache(tmp_path), Builds()
    path = cache.entry("inductor", KEY, build).path
    artifact, manifest = path / "artifact.bin", path / MANIFEST
    if damage == "flip a byte":
        artifact.write_bytes(b"Compiled code")
    elif damage == "truncate":
        artifact.write_bytes(b"compiled")
    elif damage == "drop the manifest":
        manifest.unlink()
    else:  # another key's entry copied (or hash-collided) into this folder
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "key": {**KEY, "batch": 9}}))
    with pytest.warns(RuntimeWarning, match="fastdiff cache: .* rebuilding it") as caught:
        rebuilt = cache.entry("inductor", KEY, build)
    assert len(caught) == 1 and not rebuilt.hit and build.calls == 2
    assert artifact.read_bytes() == b"compiled code" and verify(path, "inductor", KEY) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.entry("inductor", KEY, build).hit  # whole again: no second warning


def test_a_failed_build_leaves_no_entry(tmp_path):
    cache = ArtifactCache(tmp_path)

    def failing(folder):
        (folder / "half.bin").write_bytes(b"half")
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError, match="compiler crashed"):
        cache.entry("inductor", KEY, failing)
    assert cache.entries() == [] and [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_least_recently_used_entries_are_evicted_past_the_cap(tmp_path):
    cache = ArtifactCache(tmp_path, max_bytes=10_000)
    payload = b"x" * 3000  # with its manifest, three entries fit and a fourth does not
    a, b, c = (cache.entry("k", {"n": n}, Builds(payload)).path for n in range(3))
    for age, path in ((300, a), (200, b), (100, c)):  # a oldest...
        os.utime(path / MANIFEST, (1e9 - age, 1e9 - age))
    assert cache.entry("k", {"n": 0}, Builds()).hit  # ...until a hit makes it the newest
    d = cache.entry("k", {"n": 3}, Builds(payload)).path
    assert [e.path for e in cache.entries()] == [c, a, d] and not b.exists()  # b went, least recently used
    assert sum(e.size for e in cache.entries()) <= 10_000
    assert cache.clear() == [c, a, d] and cache.entries() == []


RACER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from fastdiff.engines.cache import ArtifactCache

    def build(folder):
        with open(sys.argv[2], "a") as log:
            log.write(f"{os.getpid()}\\n")
        time.sleep(1.0)  # a long compile: the other process arrives meanwhile
        (folder / "artifact.bin").write_bytes(b"compiled code")

    entry = ArtifactCache(sys.argv[1]).entry("inductor", {"model": "m"}, build)
    print("hit" if entry.hit else "built", (entry.path / "artifact.bin").read_bytes().decode())
""")


def test_two_processes_racing_on_one_entry_build_it_once(tmp_path):
    log = tmp_path / "builds.log"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "cache"), str(log)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = sorted(p.communicate(timeout=120)[0].strip() for p in racers)
    assert [p.returncode for p in racers] == [0, 0]
    assert outputs == ["built compiled code", "hit compiled code"]  # the second waited, then loaded it
    assert len(log.read_text().split()) == 1
    (entry,) = ArtifactCache(tmp_path / "cache").entries()
    assert verify(entry.path, "inductor", {"model": "m"}) is None


# ---------------------------------------------------------------- the Sampler's keys and images


class TinyEps(nn.Module):
    """A cheap eps model (one conv): its ahead-of-time compile takes seconds."""

    def __init__(self, seed=0, channels=1):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * 0.1


def step_key(tmp_path, model=None, table=TABLE, dtype=torch.float32, batch=2, noise=True, image=(1, 4, 4)):
    """The inductor cache key the Sampler's compiled step would use for these settings."""
    sampler = Sampler(model or TinyEps(), table, image_shape=image, dtype=dtype, engine="inductor",
                      cache=tmp_path)
    x = torch.zeros(batch, *image)
    args = (x, torch.tensor(0), torch.zeros_like(x) if noise else None, None, None, None)
    return cache_module.digest(sampler._steps.compiled.entry_key(args))


def test_every_part_of_the_step_key_changes_the_entry(tmp_path, monkeypatch):
    base = step_key(tmp_path)
    assert step_key(tmp_path) == base  # the same settings, the same entry
    heavier = TinyEps()
    with torch.no_grad():
        heavier.conv.weight[0, 0, 0, 0] += 1e-3
    variants = {
        "weights": step_key(tmp_path, model=heavier),
        "config": step_key(tmp_path, model=TinyEps(channels=2), image=(2, 4, 4)),
        "table": step_key(tmp_path, table=ddim_table(linear_schedule(), steps=3, eta=0.5)),
        "dtype": step_key(tmp_path, dtype=torch.bfloat16),
        "batch": step_key(tmp_path, batch=3),
        "image shape": step_key(tmp_path, image=(1, 8, 8)),
        "noise mode": step_key(tmp_path, noise=False),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        variants["threads"] = step_key(tmp_path)
    finally:
        torch.set_num_threads(threads)
    for name, module, attribute, value in [
        ("torch version", torch, "__version__", "0.0.1"),
        ("fastdiff version", fastdiff, "__version__", "0.0.1"),
        ("device capability", torch.backends.cpu, "get_cpu_capability", lambda: "NO AVX"),
    ]:
        with monkeypatch.context() as patch:
            patch.setattr(module, attribute, value)
            variants[name] = step_key(tmp_path)
    assert len(set(variants.values()) | {base}) == len(variants) + 1, variants


def test_a_cache_hit_samples_the_images_of_the_fresh_compile_bit_for_bit(tmp_path):
    cache = ArtifactCache(tmp_path)
    fresh = Sampler(TinyEps(), TABLE, image_shape=(1, 4, 4), cache=cache)
    fresh.warmup(2)
    assert not fresh.loaded_from_cache(2) and "AOTInductor" in fresh.describe()["path"]
    (entry,) = cache.entries()
    assert entry.kind == "inductor" and (entry.path / PACKAGE).is_file()
    loaded = Sampler(TinyEps(), TABLE, image_shape=(1, 4, 4), cache=cache)  # as a new process would
    loaded.warmup(2)
    assert loaded.loaded_from_cache(2) and len(cache.entries()) == 1
    assert torch.equal(fresh.sample(batch=2, seed=3), loaded.sample(batch=2, seed=3))
    eager = Sampler(TinyEps(), TABLE, image_shape=(1, 4, 4), compile=False).sample(batch=2, seed=3)
    torch.testing.assert_close(loaded.sample(batch=2, seed=3), eager, rtol=1.3e-6, atol=1e-5)


def test_sampler_cache_argument(tmp_path):
    assert Sampler(TinyEps(), TABLE, image_shape=(1, 4, 4), cache=False).describe()["cache"] is None
    assert Sampler(TinyEps(), TABLE, image_shape=(1, 4, 4), compile=False, cache=tmp_path).describe()["cache"] is None
    assert Sampler(TinyEps(), TABLE, image_shape=(1, 4, 4), cache=tmp_path).describe()["cache"] == str(tmp_path)
    with pytest.raises(TypeError, match="cache must be"):
        Sampler(TinyEps(), TABLE, image_shape=(1, 4, 4), cache=3)
