"""The ``fastdiff`` command line, run in-process through ``fastdiff.cli.main``."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdiff.cli import COMMANDS, main
from fastdiff.images import NPZ_KEY
from fastdiff.models import folders
from fastdiff.models.unet import UNet, UNetConfig

TINY_SAMPLE = ["sample", "--config", "tiny", "--steps", "2", "--batch", "2", "--no-progress"]


def _images(folder) -> np.ndarray:
    with np.load(folder / "samples.npz") as data:
        return data[NPZ_KEY]


def test_sample_writes_grid_and_npz(tmp_path, capsys):
    assert main([*TINY_SAMPLE, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "2 steps" in out and "time:" in out
    images = _images(tmp_path / "out")
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    from PIL import Image

    with Image.open(tmp_path / "out" / "samples.png") as picture:
        assert picture.size == (4 * (2 + 2 * 18), 4 * (2 + 1 * 18))  # 16x16 tiles scaled up 4 times
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["samples.npz", "samples.png"]


def test_sample_is_reproducible_and_seeded(tmp_path):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert main([*TINY_SAMPLE, "--sampler", "ddpm", "--seed", seed, "--out", str(tmp_path / name)]) == 0
    np.testing.assert_array_equal(_images(tmp_path / "a"), _images(tmp_path / "b"))
    assert not np.array_equal(_images(tmp_path / "a"), _images(tmp_path / "c"))


def test_sample_from_a_model_folder(tmp_path, capsys):
    folder = folders.save_model(UNet(UNetConfig.tiny(image_size=8, in_channels=1)), tmp_path / "model")
    args = ["sample", "--model", str(folder), "--steps", "2", "--batch", "3", "--no-progress", "--eta", "0.5"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    assert str(folder) in capsys.readouterr().out
    assert _images(tmp_path / "out").shape == (3, 8, 8, 1)


def test_sample_accelerated_matches_the_reference(tmp_path, capsys):
    """--accelerate runs fastdiff.Sampler (compiled on CPU), says so, and draws the reference's
    images: in seed mode on CPU it uses the same noise, and fp32 agrees to ~1e-6."""
    assert main([*TINY_SAMPLE, "--accelerate", "--out", str(tmp_path / "fast")]) == 0
    out = capsys.readouterr().out
    assert "accelerated model" in out and "warm-up:" in out
    # a progress line comes before the (long) compile, the seconds it took after it
    took = re.search(r"warm-up: (compiled|loaded compiled step from cache) in [\d.]+ s", out)
    assert took and out.index("warm-up: compiling the sampling step for batch 2") < took.start()
    assert main([*TINY_SAMPLE, "--out", str(tmp_path / "ref")]) == 0
    difference = np.abs(_images(tmp_path / "fast").astype(int) - _images(tmp_path / "ref").astype(int))
    assert difference.max() <= 1  # uint8 rounding of values that agree to ~1e-6


@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++3m-sde", "euler", "euler-a", "unipc"])
def test_sample_with_multistep_and_euler_samplers(tmp_path, capsys, sampler):
    out = tmp_path / "out"
    assert main(["sample", "--config", "tiny", "--sampler", sampler, "--steps", "3", "--batch", "2", "--no-progress",
                 "--out", str(out)]) == 0
    assert f"sampler: {sampler}, 3 steps" in capsys.readouterr().out
    assert _images(out).shape == (2, 16, 16, 3)


def _tiny(*extra: str) -> list[str]:
    return [*TINY_SAMPLE, *extra]


BAD_SAMPLE_ARGS = {
    "unknown sampler": (_tiny("--sampler", "heun"), "invalid choice: 'heun'"),
    "steps 0": (_tiny("--steps", "0"), "--steps: must be >= 1"),
    "dtype without accelerate": (_tiny("--dtype", "bfloat16"), "--dtype applies with --accelerate only"),
    "steps not a number": (_tiny("--steps", "ten"), "--steps: expected an integer"),
    "steps > T": (_tiny("--steps", "1001"), "--steps 1001: must be at most T = 1000"),
    "negative eta": (_tiny("--eta", "-0.1"), "--eta: must be >= 0"),
    "nan eta": (_tiny("--eta", "nan"), "--eta: must be a finite number"),
    "eta with ddpm": (_tiny("--sampler", "ddpm", "--eta", "0.5"), "--eta applies to --sampler ddim only"),
    "eta with dpm++": (_tiny("--sampler", "dpm++2m", "--eta", "0.5"), "--eta applies to --sampler ddim only"),
    "eta with euler-a": (_tiny("--sampler", "euler-a", "--eta", "0.5"), "--eta applies to --sampler ddim only"),
    "batch 0": (_tiny("--batch", "0"), "--batch: must be >= 1"),
    "unknown device": (_tiny("--device", "tpu"), "--device must be cpu, cuda"),
    "unknown preset": (["sample", "--config", "huge"], "invalid choice: 'huge'"),
    "missing model folder": (["sample", "--model", "{tmp}/nowhere"], "--model: model folder"),
    "model and config": (_tiny("--model", "{tmp}/nowhere"), "not allowed with argument"),
    "seed 2**64": (_tiny("--seed", str(2**64)), "--seed: must be in [0, 2**63)"),
    "negative seed": (_tiny("--seed", "-1"), "--seed: must be in [0, 2**63)"),
    "inf eta": (_tiny("--eta", "inf"), "--eta: must be a finite number"),
}


@pytest.mark.parametrize("case", list(BAD_SAMPLE_ARGS))
def test_bad_sample_arguments_exit_2_and_write_nothing(tmp_path, capsys, case):
    args, message = BAD_SAMPLE_ARGS[case]
    assert main([a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "usage: fastdiff sample" in err and message in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cuda_device_without_gpu_is_a_usage_error(tmp_path, capsys):
    assert main([*TINY_SAMPLE, "--device", "cuda", "--out", str(tmp_path / "out")]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_corrupt_model_folder_is_reported(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{oops")
    assert main(["sample", "--model", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "config.json: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_info_reports_versions_and_paths(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out and "execution paths" in out and "diffusers" in out
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"].startswith(torch.__version__)
    assert report["execution paths"]["cpu"].startswith("reference")


def test_top_level_help_and_errors(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main([]) == 2
    assert main(["paint"]) == 2
    assert "invalid choice: 'paint'" in capsys.readouterr().err
    assert main(["sample", "--help"]) == 0
    assert "--sampler" in capsys.readouterr().out


def test_help_does_not_import_torch():
    code = (
        "import sys; from fastdiff.cli import main; code = main(['--help']); "
        "sys.exit(10 if 'torch' in sys.modules else code)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "sample" in result.stdout


def test_cli_sampler_names_are_the_schedules():
    from fastdiff.presets import SAMPLER_METHODS
    from fastdiff.schedulers import METHODS

    assert {method for method, _ in SAMPLER_METHODS.values()} == set(METHODS)


def test_runtime_failure_is_one_line_and_exit_2(monkeypatch, capsys):
    """An error past argument parsing is one stderr line and exit code 2; --debug adds the traceback."""
    import fastdiff.commands.info as info

    def fail(args):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(info, "run", fail)
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fastdiff info: error: RuntimeError: disk on fire second line" in err
    assert "Traceback" not in err
    assert main(["info", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(["--debug", "info"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import fastdiff.commands.info as info

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "run", interrupted)
    assert main(["info"]) == 130
    err = capsys.readouterr().err
    assert err == "fastdiff info: interrupted\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_sampler_on_cuda_without_gpu_says_so():
    from fastdiff.sampling.sampler import Sampler

    with pytest.raises(RuntimeError, match="no CUDA device is available"):
        Sampler(UNet(UNetConfig.tiny()), device="cuda")


# ---------------------------------------------------------------- threads, verify's verdicts


@pytest.mark.parametrize("load, expected", [(0.0, 2), (0.9, 1), (7.5, 1)])
def test_default_threads_leave_busy_cores_alone(monkeypatch, load, expected):
    from fastdiff import commands

    monkeypatch.setattr(commands.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(commands.os, "getloadavg", lambda: (load, load, load))
    assert commands.default_threads() == expected


def test_processes_on_one_machine_share_the_default_threads(monkeypatch):
    from fastdiff import commands

    monkeypatch.setattr(commands, "default_threads", lambda: 4)
    before = torch.get_num_threads()
    try:
        assert commands.apply_threads(None, processes=2).startswith("2 (") and torch.get_num_threads() == 2
        assert "shared by 3 processes" in commands.apply_threads(None, processes=3) and torch.get_num_threads() == 1
        assert commands.apply_threads(3, processes=2) == "3 (--threads)" and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_sharded_sample_takes_threads(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        argv = ["sample", "--config", "tiny", "--steps", "1", "--no-progress", "--num-images", "2",
                "--shard-size", "2", "--threads", "1", "--out", str(tmp_path / "out")]
        assert main(argv) == 0
        assert "threads: 1 (--threads) per process" in capsys.readouterr().out and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_sample_and_verify_take_threads(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert main([*TINY_SAMPLE, "--threads", "1", "--out", str(tmp_path / "out")]) == 0
        assert "threads: 1 (--threads)" in capsys.readouterr().out and torch.get_num_threads() == 1
        assert main(["verify", "--steps", "2", "--batch", "1", "--no-compile", "--no-progress", "--threads", "1",
                     "--dtypes", "float32"]) == 0
        assert "threads: 1 (--threads)" in capsys.readouterr().out
        assert main([*TINY_SAMPLE, "--threads", "0"]) == 2
        assert main([*TINY_SAMPLE, "--out", str(tmp_path / "default")]) == 0
        assert "1-minute load" in capsys.readouterr().out  # the default says how it was chosen
    finally:
        torch.set_num_threads(before)


def test_verify_ddim_on_the_untrained_default_says_why(capsys):
    """Deterministic DDIM on an untrained model amplifies bf16 rounding past the 30 dB bar for
    any bf16 path: verify says so and holds fastdiff to 2x plain PyTorch's own bf16 error."""
    assert main(["verify", "--sampler", "ddim", "--steps", "10", "--batch", "2", "--no-compile", "--no-progress",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "bar not met (PSNR >= 30 dB)" in out and "plain PyTorch in bfloat16 (eager) is itself at" in out
    assert "-> PASS (2x rule" in out and "FAIL" not in out


def test_compile_then_sample_loads_from_the_cache_and_cache_list_clear(tmp_path, capsys, monkeypatch):
    """Through OpenVINO (seconds to compile the tiny model): `fastdiff compile` builds, `sample`
    loads what it built, `--no-cache` compiles and stores nothing, and all draw the same images."""
    pytest.importorskip("openvino")
    cache, unused = tmp_path / "cache", tmp_path / "unused"
    monkeypatch.setenv("FASTDIFF_CACHE_DIR", str(unused))
    sample = ["sample", "--config", "tiny", "--steps", "2", "--batch", "2", "--no-progress", "--accelerate",
              "--dtype", "bfloat16", "--threads", "1"]
    assert main(["compile", "--config", "tiny", "--steps", "2", "--batch", "2", "--dtype", "bfloat16",
                 "--threads", "1", "--cache-dir", str(cache)]) == 0
    assert "batch 2: compiled in" in capsys.readouterr().out
    assert main([*sample, "--cache-dir", str(cache), "--out", str(tmp_path / "hit")]) == 0
    out = capsys.readouterr().out
    assert "warm-up: loaded compiled step from cache in" in out and "time to first image" in out
    path_line = next(line for line in out.splitlines() if line.startswith("path:"))
    assert path_line.count("on cpu") == 1 and "one stream" in path_line  # said once; one thread, one stream
    assert main([*sample, "--no-cache", "--out", str(tmp_path / "fresh")]) == 0
    assert "warm-up: compiled in" in capsys.readouterr().out and not unused.exists()
    np.testing.assert_array_equal(_images(tmp_path / "hit"), _images(tmp_path / "fresh"))
    assert main(["cache", "list", "--cache-dir", str(cache)]) == 0
    listed = capsys.readouterr().out
    assert "2 entries" in listed and "openvino-ir" in listed and "shapes [[2, 3, 16, 16], [2]]" in listed
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert main(["cache", "list", "--cache-dir", str(cache)]) == 0 and "0 entries" in capsys.readouterr().out
