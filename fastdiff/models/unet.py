"""The Ho et al. (2020) DDPM UNet in plain PyTorch.

The default :class:`UNetConfig` is the CIFAR-10 model (ch 128, ch_mult 1,2,2,2, two residual
blocks per level, attention at 16x16, GroupNorm(32)+SiLU, dropout 0.1; 35.7M parameters).
Two small modules carry everything the engine swaps: :class:`GroupNormAct` (GroupNorm with an
optional fused SiLU) and :class:`SpatialSelfAttention` (whose ``attend`` is the attention core).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiff.ops import reference
from fastdiff.presets import PRESETS


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    dropout: float = 0.1
    num_groups: int = 32
    norm_eps: float = 1e-6
    num_classes: int | None = None

    def __post_init__(self):
        # Strict types: a config.json value of the wrong JSON type (true for 1, "1e-6" for a
        # number) is refused here rather than failing later, deep inside the model.
        for name in ("ch_mult", "attn_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(_is_int(m) and m >= 1 for m in value):
                raise ValueError(f"{name} must be a list of positive integers, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("image_size", "in_channels", "out_channels", "ch", "num_res_blocks", "num_heads", "num_groups"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("dropout", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.ch_mult:
            raise ValueError(f"ch_mult must be a non-empty list of positive integers, got {list(self.ch_mult)!r}")
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by {factor} (the UNet downsamples "
                f"{len(self.ch_mult) - 1} times)"
            )
        for width in sorted({self.ch * m for m in self.ch_mult}):
            if width % self.num_groups:
                raise ValueError(f"channels {width} (ch x ch_mult) are not divisible by num_groups {self.num_groups}")
            if width % self.num_heads:
                raise ValueError(f"channels {width} are not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.num_classes is not None and (not _is_int(self.num_classes) or self.num_classes < 1):
            raise ValueError(f"num_classes must be None or a positive integer, got {self.num_classes!r}")

    @classmethod
    def cifar10(cls) -> "UNetConfig":
        """Ho et al.'s CIFAR-10 model (google/ddpm-cifar10-32)."""
        return cls()

    @classmethod
    def tiny(cls, image_size: int = 16, in_channels: int = 3) -> "UNetConfig":
        """A small model for tests: runs a forward in milliseconds on a CPU."""
        return cls(
            image_size=image_size, in_channels=in_channels, out_channels=in_channels, ch=32, ch_mult=(1, 2),
            num_res_blocks=1, attn_resolutions=(image_size // 2,), dropout=0.0, num_groups=8,
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNet config keys: {unknown}")
        return cls(**d)


def preset_config(name: str) -> UNetConfig:
    """The UNetConfig of a preset name (:data:`fastdiff.presets.PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
    return {"default": UNetConfig, "cifar10": UNetConfig.cifar10, "tiny": UNetConfig.tiny}[name]()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Ho et al., from the Transformer): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNormAct(nn.GroupNorm):
    """GroupNorm, optionally followed by SiLU: the pair the engine fuses into one kernel."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6, act: bool = True):
        super().__init__(num_groups, num_channels, eps=eps)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, self.act)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={'silu' if self.act else 'none'}"


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNormAct(groups, in_ch, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = GroupNormAct(groups, out_ch, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        return self.skip(x) + h


class SpatialSelfAttention(nn.Module):
    """Self-attention over the H*W positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, num_heads: int, groups: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNormAct(groups, channels, eps, act=False)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention core on (B, heads, N, D); the engine swaps this for the flash kernel."""
        return reference.attention(q, k, v, 1.0 / math.sqrt(q.shape[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, N, D)
        out = self.attend(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t): predicts the noise in x_t. ``forward(x, t, class_labels=None)``."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or UNetConfig()
        temb_ch = 4 * cfg.ch
        self.temb = nn.Sequential(nn.Linear(cfg.ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.class_embedding = nn.Embedding(cfg.num_classes, temb_ch) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)

        def res(i, o):
            return ResBlock(i, o, temb_ch, cfg.dropout, cfg.num_groups, cfg.norm_eps)

        def attn(c, resolution):
            if resolution in cfg.attn_resolutions:
                return SpatialSelfAttention(c, cfg.num_heads, cfg.num_groups, cfg.norm_eps)
            return nn.Identity()

        self.down = nn.ModuleList()
        skip_channels, ch, resolution = [cfg.ch], cfg.ch, cfg.image_size
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(nn.ModuleList([res(ch, cfg.ch * mult), attn(cfg.ch * mult, resolution)]))
                ch = cfg.ch * mult
                skip_channels.append(ch)
            if level != len(cfg.ch_mult) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
                resolution //= 2

        self.mid = nn.ModuleList([res(ch, ch), SpatialSelfAttention(ch, cfg.num_heads, cfg.num_groups, cfg.norm_eps), res(ch, ch)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(nn.ModuleList([res(ch + skip_channels.pop(), cfg.ch * mult), attn(cfg.ch * mult, resolution)]))
                ch = cfg.ch * mult
            if level != 0:
                self.up.append(Upsample(ch))
                resolution *= 2

        self.norm_out = GroupNormAct(cfg.num_groups, ch, cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = self.temb(timestep_embedding(t, self.config.ch).to(x.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels is required: this UNet is class-conditioned")
            temb = temb + self.class_embedding(class_labels)

        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, Downsample):
                h = layer(h)
            else:
                block, attention = layer
                h = attention(block(h, temb))
            skips.append(h)

        block1, attention, block2 = self.mid
        h = block2(attention(block1(h, temb)), temb)

        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                block, attention = layer
                h = attention(block(torch.cat([h, skips.pop()], dim=1), temb))

        return self.conv_out(self.norm_out(h))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
