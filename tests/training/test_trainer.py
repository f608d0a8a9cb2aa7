"""Training: the loss falls, resume is bit-exact, checkpoints are atomic and config-checked."""
import pytest
import torch

from fastdiff.models.unet import UNetConfig
from fastdiff.training.data import load_digits_dataset
from fastdiff.training.trainer import (
    CHECKPOINT_FILE,
    NonFiniteError,
    TrainConfig,
    Trainer,
    checkpoint_configs,
    read_checkpoint,
)

MODEL = UNetConfig(image_size=8, in_channels=1, out_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(4,), num_groups=8, dropout=0.1)  # dropout: the global RNG must resume too
TRAIN = TrainConfig(steps=6, batch_size=8, lr=2e-3, lr_warmup_steps=2, ema_decay=0.9, seed=3)


@pytest.fixture(scope="module")
def data():
    return load_digits_dataset("train", image_size=8).images[:64]


def _same_state(a: Trainer, b: Trainer):
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(tensor, b.model.state_dict()[name]), f"model.{name} differs"
    for name, tensor in a.ema.state_dict().items():
        assert torch.equal(tensor, b.ema.state_dict()[name]), f"ema.{name} differs"
    state_a, state_b = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        for key, value in state_a[index].items():
            assert torch.equal(value, state_b[index][key]), f"optimizer {index}.{key} differs"
    assert a.step == b.step


def test_loss_goes_down(data):
    config = TrainConfig(steps=40, batch_size=16, lr=2e-3, lr_warmup_steps=5, seed=0)
    trainer = Trainer(MODEL, config, data)
    losses = [trainer.train_step().item() for _ in range(config.steps)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, f"loss {first:.3f} -> {last:.3f}"


def test_resume_reproduces_the_uninterrupted_run_exactly(data, tmp_path):
    straight = Trainer(MODEL, TRAIN, data)
    straight.train()

    first = Trainer(MODEL, TRAIN, data)
    first.train(until=3, checkpoint_dir=tmp_path)
    resumed = Trainer(MODEL, TRAIN, data)
    torch.manual_seed(1234)  # as in a fresh process: dropout's global RNG must come from the checkpoint
    resumed.load_checkpoint(tmp_path)
    assert resumed.step == 3
    resumed.train()
    _same_state(straight, resumed)
    assert not any(torch.equal(p, q) for p, q in zip(straight.model.parameters(), Trainer(MODEL, TRAIN, data).model.parameters()))


def test_killed_checkpoint_write_leaves_the_previous_one(data, tmp_path, monkeypatch):
    trainer = Trainer(MODEL, TRAIN, data)
    trainer.train(until=2, checkpoint_dir=tmp_path)
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()

    import safetensors.torch

    def killed_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(safetensors.torch, "save_file", killed_mid_write)
    trainer.train_step()
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(tmp_path)
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]  # no temp file left behind
    monkeypatch.undo()

    restored = Trainer(MODEL, TRAIN, data)
    restored.load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert restored.step == 2
    assert checkpoint_configs(tmp_path) == (MODEL, TRAIN, 2)


def test_checkpoint_from_another_config_is_refused(data, tmp_path):
    Trainer(MODEL, TRAIN, data).save_checkpoint(tmp_path)
    wider = UNetConfig(**{**MODEL.to_dict(), "ch": 24})
    with pytest.raises(ValueError, match=r"another model config: ch: checkpoint 16 vs now 24"):
        Trainer(wider, TRAIN, data).load_checkpoint(tmp_path)
    other_lr = TrainConfig(**{**TRAIN.to_dict(), "lr": 1e-4})
    with pytest.raises(ValueError, match="another training config: lr"):
        Trainer(MODEL, other_lr, data).load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="another data shape"):
        Trainer(MODEL, TRAIN, data[:10]).load_checkpoint(tmp_path)
    longer = TrainConfig(**{**TRAIN.to_dict(), "steps": 100})  # training further is allowed
    Trainer(MODEL, longer, data).load_checkpoint(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors checkpoint"):
        read_checkpoint(tmp_path)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / CHECKPOINT_FILE))
    with pytest.raises(ValueError, match="not a fastdiff training checkpoint"):
        read_checkpoint(tmp_path)


def test_export_writes_the_ema_weights(data, tmp_path):
    from fastdiff.models.folders import load_model

    trainer = Trainer(MODEL, TRAIN, data)
    trainer.train(until=2)
    model, info = load_model(trainer.export(tmp_path / "model"))
    assert info.config == MODEL and info.extra["trained_steps"] == 2
    for name, tensor in trainer.ema.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)
    assert not torch.equal(trainer.ema.conv_in.weight, trainer.model.conv_in.weight)


@pytest.mark.parametrize("field, value", [("steps", 0), ("lr", 0.0), ("ema_decay", 1.0), ("seed", -1),
                                          ("schedule", "square"), ("batch_size", 2.0), ("lr", float("inf")),
                                          ("weight_decay", float("inf")), ("lr", float("nan")),
                                          ("grad_clip", float("inf")), ("lr_warmup_steps", True), ("lr", "1e-3")])
def test_bad_train_config(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_data_must_match_the_model(data):
    with pytest.raises(ValueError, match=r"model expects \(1, 16, 16\)"):
        Trainer(UNetConfig(**{**MODEL.to_dict(), "image_size": 16}), TRAIN, data)
    with pytest.raises(ValueError, match="no images"):
        Trainer(MODEL, TRAIN, data[:0])


def test_cli_trains_resumes_and_refuses_another_config(tmp_path, capsys):
    from fastdiff.cli import main

    common = ["train", "--steps", "2", "--batch-size", "4", "--ch", "16", "--checkpoint-dir", str(tmp_path / "run"),
              "--no-progress", "--device", "cpu"]
    assert main(common) == 0
    assert main(common) == 2  # an existing checkpoint without --resume
    assert "pass --resume" in capsys.readouterr().err
    assert main([*common[:2], "3", *common[3:], "--resume", "--export", str(tmp_path / "model")]) == 0
    assert "step 3" in capsys.readouterr().out
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert main([*common, "--resume", "--ch", "24"]) == 2
    assert "another model config: ch: checkpoint 16 vs now 24" in capsys.readouterr().err


# ---------------------------------------------------------------- guards


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(data, tmp_path):
    """NaN weights used to train on with exit 0 and overwrite good checkpoints."""
    trainer = Trainer(MODEL, TRAIN, data)
    trainer.train(until=2, checkpoint_dir=tmp_path, checkpoint_every=1)
    good = (tmp_path / CHECKPOINT_FILE).read_bytes()
    with torch.no_grad():
        trainer.model.conv_in.weight[0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"step 3: the loss is nan .* the last good checkpoint .* is kept"):
        trainer.train(checkpoint_dir=tmp_path, checkpoint_every=1)
    assert trainer.step == 2 and (tmp_path / CHECKPOINT_FILE).read_bytes() == good
    for name, tensor in trainer.model.state_dict().items():  # the bad step did not update anything
        assert torch.equal(tensor, before[name]) or tensor.isnan().any(), name
    with pytest.raises(NonFiniteError, match="EMA weight"):
        trainer.ema.conv_in.weight.data.fill_(float("inf"))
        trainer.export(tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_huge_learning_rate_stops_with_a_clear_error(data):
    trainer = Trainer(MODEL, TrainConfig(**{**TRAIN.to_dict(), "lr": 1e30, "lr_warmup_steps": 0}), data)
    with pytest.raises(NonFiniteError, match=r"the loss is (nan|inf)"):
        trainer.train()


def test_thread_count_is_recorded_and_a_mismatch_warned(data, tmp_path):
    threads = torch.get_num_threads()
    Trainer(MODEL, TRAIN, data).save_checkpoint(tmp_path)
    assert read_checkpoint(tmp_path)[1]["threads"] == str(threads)
    Trainer(MODEL, TRAIN, data).load_checkpoint(tmp_path)  # same count: silent
    torch.set_num_threads(threads + 1)
    try:
        with pytest.warns(UserWarning, match=rf"written with {threads} CPU threads, this run has {threads + 1}"):
            Trainer(MODEL, TRAIN, data).load_checkpoint(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _rewrite(path, tensors=None, metadata=None, drop=(), **changes):
    from safetensors.torch import save_file

    saved_tensors, saved_metadata = read_checkpoint(path)
    saved_tensors = {k: v for k, v in saved_tensors.items() if k not in drop}
    saved_tensors.update(tensors or {})
    saved_metadata = {k: v for k, v in saved_metadata.items() if k not in drop}
    saved_metadata.update(metadata or {})
    save_file(saved_tensors, str(path), metadata=saved_metadata)


DAMAGED_CHECKPOINTS = {
    "step -5": (dict(metadata={"step": "-5"}), r"step must be an integer >= 0, got '-5'"),
    "step text": (dict(metadata={"step": "five"}), r"step must be an integer >= 0"),
    "no step": (dict(drop=("step",)), r"metadata lacks \['step'\]"),
    "model config not JSON": (dict(metadata={"model_config": "{oops"}), r"'model_config' is not valid JSON"),
    "data shape not a list": (dict(metadata={"data_shape": "3"}), r"'data_shape' must be a JSON list"),
    "param groups garbage": (dict(metadata={"optimizer_param_groups": "[{}]"}), r"optimizer state does not load"),
    "missing weight": (dict(drop=("model.conv_in.weight",)), r"missing tensors \['model.conv_in.weight'\]"),
    "missing rng": (dict(drop=("rng.torch",)), r"missing tensors \['rng.torch'\]"),
    "extra tensor": (dict(tensors={"model.extra": torch.zeros(1)}), r"unexpected \['model.extra'\]"),
    "wrong shape": (dict(tensors={"ema.conv_in.weight": torch.zeros(1)}), r"'ema.conv_in.weight' is torch.float32 \(1,\)"),
    "wrong dtype": (dict(tensors={"rng.batches": torch.zeros(5056, dtype=torch.int32)}), r"'rng.batches' is torch.int32"),
    "optimizer state shape": (dict(tensors={"optimizer.0.exp_avg": torch.zeros(2)}), r"'optimizer.0.exp_avg' is"),
    "optimizer index": (dict(tensors={"optimizer.999.exp_avg": torch.zeros(2)}), r"unexpected tensor 'optimizer.999.exp_avg'"),
    "optimizer state partial": (dict(drop=("optimizer.0.exp_avg_sq",)), r"missing tensors \['optimizer.0.exp_avg_sq'\]|incomplete"),
}


@pytest.fixture(scope="module")
def good_checkpoint(data, tmp_path_factory) -> bytes:
    trainer = Trainer(MODEL, TRAIN, data)
    trainer.train(until=1)
    return trainer.save_checkpoint(tmp_path_factory.mktemp("good")).read_bytes()


@pytest.mark.parametrize("case", list(DAMAGED_CHECKPOINTS))
def test_damaged_checkpoint_is_refused_naming_the_file(data, good_checkpoint, tmp_path, case):
    """These used to end in raw KeyError/RuntimeError tracebacks, or resume silently (step -5)."""
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(good_checkpoint)
    change, pattern = DAMAGED_CHECKPOINTS[case]
    _rewrite(path, **change)
    fresh = Trainer(MODEL, TRAIN, data)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(ValueError, match=pattern) as raised:
        fresh.load_checkpoint(tmp_path)
    assert str(path) in str(raised.value) and "damaged checkpoint" in str(raised.value)
    assert fresh.step == 0 and all(torch.equal(v, before[k]) for k, v in fresh.model.state_dict().items())


def test_cli_reports_a_damaged_checkpoint_in_one_line(tmp_path, capsys):
    from fastdiff.cli import main

    common = ["train", "--steps", "1", "--batch-size", "4", "--ch", "16", "--checkpoint-dir", str(tmp_path),
              "--no-progress", "--device", "cpu"]
    assert main(common) == 0
    _rewrite(tmp_path / CHECKPOINT_FILE, metadata={"step": "-5"})
    capsys.readouterr()
    assert main([*common, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / CHECKPOINT_FILE}: damaged checkpoint: step must be" in err and "Traceback" not in err
