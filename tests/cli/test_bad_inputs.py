"""The bad-input table: every row is a value a user could pass (to an op, the API, the command
line, a model folder or a checkpoint) that must be refused up front with a clear error naming
it -- never a traceback from deep inside, never a silently wrong result.

Rows are (what, call, error type, message pattern); command-line rows are (argv, message) and
must exit with code 2, print no traceback and end in one error line.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from fastdiff import ops
from fastdiff.cli import main
from fastdiff.models import folders
from fastdiff.models.unet import UNet, UNetConfig
from fastdiff.sampling import draw_noise, sample_reference
from fastdiff.schedulers import linear_schedule, make_schedule, step_table
from fastdiff.training.trainer import TrainConfig

TABLE = step_table(linear_schedule(), "ddim", steps=10)
Q_TABLE = linear_schedule().q_sample_table()
X = torch.randn(2, 3, 4, 4)
W = torch.ones(3)


def _step(**overrides):
    args = dict(x_t=X, eps=X, step_index=torch.tensor(0), coefs=TABLE.coefs)
    args.update(overrides)
    return lambda: ops.sampler_step(**args)


def _q_sample(**overrides):
    args = dict(x0=X, t=torch.zeros(2, dtype=torch.int64), coefs=Q_TABLE, noise=X)
    args.update(overrides)
    return lambda: ops.q_sample(**args)


def _norm(x=X, weight=W, bias=None, num_groups=3):
    return lambda: ops.group_norm_silu(x, weight, bias, num_groups)


Q = torch.randn(1, 2, 4, 8)


def _attention(q=Q, k=Q, v=Q, scale=None):
    return lambda: ops.attention(q, k, v, scale)


API_ROWS = {
    # ops
    "step_index -1": (_step(step_index=torch.tensor(-1)), ValueError, r"^step_index must lie in \[0, 10\)"),
    "step_index S": (_step(step_index=torch.tensor(10)), ValueError, r"^step_index must lie in \[0, 10\)"),
    "step_index float": (_step(step_index=torch.tensor(0.0)), TypeError, r"^step_index must have dtype"),
    "step_index two": (_step(step_index=torch.tensor([0, 1])), ValueError, r"^step_index must hold exactly one"),
    "step coefs 5 columns": (_step(coefs=TABLE.coefs[:, :5]), ValueError, r"^coefs must have shape \(S, 6 \+ K\)"),
    "step clip_range 0": (_step(clip_range=0.0), ValueError, r"^clip_range must be > 0"),
    "step clip_range str": (_step(clip_range="1"), TypeError, r"^clip_range must be a float"),
    "step eps shape": (_step(eps=X[:1]), ValueError, r"^eps has shape"),
    "q_sample t -1": (_q_sample(t=torch.tensor([0, -1])), ValueError, r"^t must lie in \[0, 1000\)"),
    "q_sample t T": (_q_sample(t=torch.tensor([0, 1000])), ValueError, r"^t must lie in \[0, 1000\)"),
    "q_sample rng shape": (_q_sample(noise=None, rng=torch.tensor([1, 2, 3])), ValueError, r"^rng must have shape"),
    "q_sample no noise": (_q_sample(noise=None), ValueError, r"^noise or rng must be given"),
    "norm fp16 weight, fp32 x": (_norm(weight=W.half()), TypeError, r"^weight must have x's dtype"),
    "norm weight/bias dtypes": (_norm(x=X.half(), weight=W.half(), bias=W), TypeError, r"^bias has dtype"),
    "norm groups True": (_norm(num_groups=True), TypeError, r"^num_groups must be an int"),
    "norm groups 2 of 3": (_norm(num_groups=2), ValueError, r"^num_groups=2 must be >= 1 and divide"),
    "norm weight shape": (_norm(weight=torch.ones(4)), ValueError, r"^weight must have shape \(3,\)"),
    "attention k dtype": (_attention(k=Q.double()), TypeError, r"^k must have dtype|^k has dtype"),
    "attention head dim 0": (_attention(q=Q[..., :0], k=Q[..., :0], v=Q[..., :0]), ValueError, r"^q has head dim 0"),
    "attention scale str": (_attention(scale="1"), TypeError, r"^scale must be a float"),
    # sampling API
    "draw_noise seed float": (lambda: draw_noise(TABLE, (1, 1, 2, 2), 1.5), TypeError, r"^seed must be an integer"),
    "draw_noise seed bool": (lambda: draw_noise(TABLE, (1, 1, 2, 2), True), TypeError, r"^seed must be an integer"),
    "draw_noise seed 2**64": (lambda: draw_noise(TABLE, (1, 1, 2, 2), 2**64), ValueError, r"^seed must be in \[-2\*\*63, 2\*\*64\)"),
    "draw_noise 3-d shape": (lambda: draw_noise(TABLE, (1, 2, 2), 0), ValueError, r"^shape must be four integers"),
    "draw_noise batch 0": (lambda: draw_noise(TABLE, (0, 1, 2, 2), 0), ValueError, r"^batch size must be >= 1"),
    "sample seed and noise": (
        lambda: sample_reference(lambda x, t: x, TABLE, seed=0, noise=draw_noise(TABLE, (1, 1, 2, 2), 0)),
        ValueError, r"^pass exactly one of seed"),
    # schedules and configs
    "schedule T 10**9": (lambda: make_schedule("linear", 10**9), ValueError, r"^num_timesteps must be an integer in \[2, 100000\]"),
    "schedule T True": (lambda: make_schedule("linear", True), ValueError, r"^num_timesteps must be an integer"),
    "schedule T 1": (lambda: make_schedule("cosine", 1), ValueError, r"^num_timesteps must be an integer"),
    "train lr inf": (lambda: TrainConfig(lr=math.inf), ValueError, r"^lr must be a finite number"),
    "train weight_decay inf": (lambda: TrainConfig(weight_decay=math.inf), ValueError, r"^weight_decay must be a finite"),
    "train lr nan": (lambda: TrainConfig(lr=math.nan), ValueError, r"^lr must be a finite number"),
    "train seed 2**63": (lambda: TrainConfig(seed=2**63), ValueError, r"^seed must be an integer in \[0, 2\*\*63\)"),
}


@pytest.mark.parametrize("row", list(API_ROWS))
def test_api_refuses_bad_input_with_a_clear_error(row):
    call, error, pattern = API_ROWS[row]
    with pytest.raises(error, match=pattern):
        call()


# ---------------------------------------------------------------- model folders (config.json)

TINY = UNetConfig.tiny(image_size=8, in_channels=1)

CONFIG_ROWS = {
    "num_classes true": ({"num_classes": True}, r"num_classes must be None or a positive integer, got True"),
    "norm_eps string": ({"norm_eps": "1e-6"}, r"norm_eps must be a finite number, got '1e-6'"),
    "norm_eps -1": ({"norm_eps": -1}, r"norm_eps must be > 0, got -1"),
    "ch_mult with true": ({"ch_mult": [True, 2]}, r"ch_mult must be a list of positive integers, got \[True, 2\]"),
    "dropout string": ({"dropout": "0.1"}, r"dropout must be a finite number, got '0.1'"),
    "attn_resolutions 4": ({"attn_resolutions": 4}, r"attn_resolutions must be a list of positive integers, got 4"),
    "num_timesteps 10**9": ({"num_timesteps": 10**9}, r"num_timesteps must be an integer in \[2, 100000\]"),
    "num_timesteps true": ({"num_timesteps": True}, r"num_timesteps must be an integer"),
    "ch string": ({"ch": "32"}, r"ch must be a positive integer, got '32'"),
    "image_size 0": ({"image_size": 0}, r"image_size must be a positive integer, got 0"),
    "unknown key": ({"channels": 3}, r"unknown UNet config keys: \['channels'\]"),
    "schedule name": ({"schedule": "square"}, r"schedule"),
    "bad weights hash": ({folders.WEIGHTS_HASH_KEY: "abc"}, r"'weights_sha256' must be 64 lowercase hex digits"),
    "other weights' hash": ({folders.WEIGHTS_HASH_KEY: "0" * 64}, r"model.safetensors: does not match config.json"),
    "version 2": ({"version": 2}, r"unsupported version 2"),
}


def _damaged_folder(tmp_path, change: dict):
    folder = folders.save_model(UNet(TINY), tmp_path / "model")
    config = json.loads((folder / folders.CONFIG_FILE).read_text())
    config.update(change)
    (folder / folders.CONFIG_FILE).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("row", list(CONFIG_ROWS))
def test_model_folder_config_is_checked_strictly(tmp_path, capsys, row):
    change, pattern = CONFIG_ROWS[row]
    folder = _damaged_folder(tmp_path, change)
    with pytest.raises(ValueError, match=pattern) as raised:
        folders.load_model(folder)
    assert str(folder) in str(raised.value)  # names the file
    assert main(["sample", "--model", str(folder), "--steps", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--model:" in err and "Traceback" not in err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the command line

CLI_ROWS = {
    "sample seed 2**64": (["sample", "--seed", str(2**64)], "--seed: must be in [0, 2**63)"),
    "sample seed -1": (["sample", "--seed", "-1"], "--seed: must be in [0, 2**63)"),
    "sample eta inf": (["sample", "--eta", "inf"], "--eta: must be a finite number"),
    "sample eta -inf": (["sample", "--eta=-inf"], "--eta: must be a finite number"),
    "sample steps 0": (["sample", "--steps", "0"], "--steps: must be >= 1"),
    "sample batch x": (["sample", "--batch", "x"], "--batch: expected an integer"),
    "sample out under a file": (["sample", "--out", "{file}/sub"], "is a file, not a folder"),
    "sample out is a file": (["sample", "--out", "{file}"], "exists and is not a folder"),
    "sample sampler heun": (["sample", "--sampler", "heun"], "invalid choice: 'heun'"),
    "sample device tpu": (["sample", "--device", "tpu"], "--device must be cpu, cuda"),
    "sample model missing": (["sample", "--model", "{tmp}/nowhere"], "--model: model folder"),
    "train lr inf": (["train", "--lr", "inf"], "--lr: must be a finite number"),
    "train lr 0": (["train", "--lr", "0"], "--lr: must be > 0"),
    "train weight decay inf": (["train", "--weight-decay", "inf"], "--weight-decay: must be a finite number"),
    "train weight decay -1": (["train", "--weight-decay", "-1"], "--weight-decay: must be >= 0"),
    "train grad clip nan": (["train", "--grad-clip", "nan"], "--grad-clip: must be a finite number"),
    "train ema decay 1": (["train", "--ema-decay", "1"], "--ema-decay: must be in [0, 1)"),
    "train dropout 1.5": (["train", "--dropout", "1.5"], "--dropout: must be in [0, 1)"),
    "train seed 2**64": (["train", "--seed", str(2**64)], "--seed: must be in [0, 2**63)"),
    "train lr warmup -1": (["train", "--lr-warmup", "-1"], "--lr-warmup: must be >= 0"),
    "train checkpoint every -5": (["train", "--checkpoint-every", "-5"], "--checkpoint-every: must be >= 0"),
    "train ch-mult letters": (["train", "--ch-mult", "a,b"], "--ch-mult: expected comma-separated integers"),
    "bench steps 0": (["bench", "--steps", "0"], "--steps: must be >= 1"),
    "bench seed -3": (["bench", "--seed", "-3"], "--seed: must be in [0, 2**63)"),
    "verify seed 2**70": (["verify", "--seed", str(2**70)], "--seed: must be in [0, 2**63)"),
    "fidelity seed x": (["fidelity", "--seed", "x"], "--seed: expected an integer"),
}


@pytest.mark.parametrize("row", list(CLI_ROWS))
def test_command_line_refuses_bad_values_with_exit_2(tmp_path, capsys, row):
    argv, message = CLI_ROWS[row]
    (tmp_path / "file").write_text("not a folder")
    argv = [a.format(tmp=tmp_path, file=tmp_path / "file") for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert captured.err.strip().splitlines()[-1].startswith(f"fastdiff {argv[0]}: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ---------------------------------------------------------------- memory, checked before the work


def test_a_batch_that_cannot_fit_is_refused_before_sampling_with_a_hint(tmp_path, capsys, monkeypatch):
    """--batch 100000 used to run for minutes into a raw allocator traceback (102 GB of noise)."""
    import fastdiff.engines.memory as memory
    import fastdiff.sampling.reference as sampling

    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * memory.GIB)
    monkeypatch.setattr(sampling, "sample_reference", lambda *a, **k: pytest.fail("sampled before checking"))
    out = tmp_path / "out"
    assert main(["sample", "--batch", "100000", "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--batch 100000: a batch of 100000 needs about" in err and "try --batch" in err
    assert "Traceback" not in err and not out.exists()


def test_an_image_size_that_cannot_fit_at_all_says_so(tmp_path, capsys, monkeypatch):
    import fastdiff.engines.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * memory.GIB)
    big = UNetConfig(image_size=4096, in_channels=1, out_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1,
                     attn_resolutions=(), num_groups=4, dropout=0.0)
    folder = folders.save_model(UNet(big), tmp_path / "model")
    assert main(["sample", "--model", str(folder), "--batch", "1", "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "even one 4096x4096 image needs" in err and "Traceback" not in err


def test_a_shard_that_cannot_fit_is_refused_before_sampling_with_a_hint(tmp_path, capsys, monkeypatch):
    """--num-images used to skip the memory check: a huge --shard-size ran into the allocator."""
    import fastdiff.engines.memory as memory
    import fastdiff.scale.shards as shards

    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * memory.GIB)
    monkeypatch.setattr(shards, "sample_model", lambda *a, **k: pytest.fail("sampled before checking"))
    out = tmp_path / "out"
    argv = ["sample", "--num-images", "100000", "--shard-size", "100000", "--steps", "1", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--shard-size 100000: a batch of 100000 needs about" in err and "try --shard-size" in err
    assert "Traceback" not in err and not out.exists()
