"""The Ho et al. UNet: parameter count, shapes, conditioning, config validation."""
import pytest
import torch

from fastdiff.models.unet import (
    GroupNormAct,
    SpatialSelfAttention,
    UNet,
    UNetConfig,
    count_parameters,
    timestep_embedding,
)


def test_cifar10_config_has_ho_parameter_count():
    # Ho et al. report 35.7M; google/ddpm-cifar10-32 in diffusers has exactly this many.
    assert count_parameters(UNet(UNetConfig.cifar10())) == 35_746_307


def test_forward_shape_and_dtype():
    model = UNet(UNetConfig.tiny()).eval()
    x = torch.randn(3, 3, 16, 16)
    out = model(x, torch.tensor([0, 500, 999]))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


def test_scalar_timestep_broadcasts_over_batch():
    model = UNet(UNetConfig.tiny()).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x, torch.tensor(7)), model(x, torch.tensor([7, 7])), rtol=0, atol=0)


def test_output_depends_on_timestep():
    model = UNet(UNetConfig.tiny()).eval()
    x = torch.randn(1, 3, 16, 16)
    assert not torch.allclose(model(x, torch.tensor([1])), model(x, torch.tensor([900])))


def test_class_conditioning():
    cfg = UNetConfig(image_size=28, in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                     attn_resolutions=(14,), num_groups=8, num_classes=10)
    model = UNet(cfg).eval()
    x = torch.randn(2, 1, 28, 28)
    t = torch.tensor([10, 10])
    a = model(x, t, class_labels=torch.tensor([0, 0]))
    b = model(x, t, class_labels=torch.tensor([0, 3]))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="class_labels"):
        model(x, t)


def test_swappable_pieces_are_present():
    model = UNet(UNetConfig.tiny())
    norms = [m for m in model.modules() if isinstance(m, GroupNormAct)]
    attentions = [m for m in model.modules() if isinstance(m, SpatialSelfAttention)]
    assert any(n.act for n in norms) and any(not n.act for n in norms)
    # at 8x8: one down block, the middle, and two up blocks (num_res_blocks + 1)
    assert len(attentions) == 4
    assert all(not a.norm.act for a in attentions)


def test_timestep_embedding_matches_closed_form():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 3)
    expected = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected, rtol=1.3e-6, atol=1e-5)


def test_config_round_trips_through_dict():
    cfg = UNetConfig.tiny()
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image_size": 30}, "image_size"),  # 4 levels downsample 3 times: needs a multiple of 8
        ({"ch": 100}, "num_groups"),  # 100 channels do not split into 32 groups
        ({"num_heads": 3}, "num_heads"),
        ({"ch_mult": ()}, "ch_mult"),
        ({"dropout": 1.5}, "dropout"),
        ({"num_classes": 0}, "num_classes"),
        ({"ch": 0}, "ch"),
    ],
)
def test_bad_config_is_rejected_with_the_argument_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**kwargs)


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="unknown UNet config keys"):
        UNetConfig.from_dict({**UNetConfig.tiny().to_dict(), "channels": 3})
