"""fastdiff.Sampler with OpenVINO running the model on the CPU (the optional ``cpu`` extra):
chosen by "auto" for bf16 where installed, named by describe(), bf16 within 30 dB of the fp32
reference over a trajectory, falling back to inductor (or refusing clearly) without openvino."""
import warnings

import pytest
import torch

from fastdiff.commands.verify import psnr
from fastdiff.engines import openvino
from fastdiff.models.unet import UNet, UNetConfig
from fastdiff.sampling import draw_noise, sample_reference
from fastdiff.sampling.sampler import Sampler
from fastdiff.schedulers import ddpm_table, linear_schedule

TABLE = ddpm_table(linear_schedule(), steps=20, clip_sample=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UNet(UNetConfig.tiny(image_size=8)).eval()


def test_bf16_on_openvino_holds_30_db_and_says_what_ran(model):
    pytest.importorskip("openvino")
    sampler = Sampler(model, TABLE, dtype=torch.bfloat16)  # auto: OpenVINO for bf16 on a CPU
    described = sampler.describe()
    assert described["engine"] == "openvino" and "OpenVINO" in described["path"] and "bf16" in described["path"]
    noise = draw_noise(TABLE, (2, 3, 8, 8), seed=3)
    actual = sampler.sample(noise=noise)
    expected = sample_reference(model, TABLE, noise=noise)
    assert actual.dtype == torch.float32 and 30.0 <= psnr(actual, expected) < float("inf")  # bf16 really ran
    assert sampler.describe()["compiled"] and not sampler.describe()["notes"]
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not model.training  # caller's model as it was


def test_engine_choice(model, monkeypatch):
    assert Sampler(model, TABLE, compile=False).describe()["engine"] == "eager"
    assert Sampler(model, TABLE, dtype=torch.float32).engine == "inductor"  # the exact mode stays on inductor
    assert Sampler(model, TABLE, dtype=torch.bfloat16, engine="inductor").engine == "inductor"
    with pytest.raises(ValueError, match="engine must be one of"):
        Sampler(model, TABLE, engine="tensorrt")
    with pytest.raises(ValueError, match="cannot go with compile=False"):
        Sampler(model, TABLE, engine="openvino", compile=False)
    monkeypatch.setattr(openvino, "available", lambda: False)
    assert Sampler(model, TABLE, dtype=torch.bfloat16).engine == "inductor"  # auto without openvino
    with pytest.raises(ImportError, match=r"pip install 'fastdiff\[cpu\]'"):
        Sampler(model, TABLE, engine="openvino")


@pytest.mark.parametrize("batch, threads, streams", [(1, 2, 1), (16, 2, 2), (15, 2, 1), (6, 4, 3), (4, 1, 1), (8, 4, 4)])
def test_streams_split_the_batch_evenly(batch, threads, streams):
    assert openvino.streams_for(batch, threads) == streams


def test_split_batch_gives_the_one_stream_answer(model):
    pytest.importorskip("openvino")
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([999, 10, 500, 0])
    whole = openvino.OpenVINOModel(model, torch.float32, threads=2)
    split = openvino.OpenVINOModel(model, torch.float32, threads=2, split_batch=True)
    assert len(split.prepare((x, t))) == 2 and len(whole.prepare((x, t))) == 1
    torch.testing.assert_close(split(x, t), whole(x, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split(x, t), model(x, t), rtol=1e-4, atol=1e-4)  # each row is its own sample


def test_conversion_prints_no_tracer_warnings(model):
    """The trace's warnings about shape checks turned constants (the shapes are static) would
    otherwise fill `fastdiff bench` and `sample --accelerate` output."""
    pytest.importorskip("openvino")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 500])
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        assert openvino.OpenVINOModel(model, None, threads=1)(x, t).shape == x.shape
