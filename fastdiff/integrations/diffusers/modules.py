"""The modules :func:`fastdiff.accelerate` puts in a model: the same maths through ``fastdiff.ops``.

Each one reuses the parameters of the module it replaces (the same ``nn.Parameter`` objects,
never copies) and keeps its state-dict names, so weights load and save as before.

- :class:`FusedGroupNorm`: an ``nn.GroupNorm`` (optionally followed by the SiLU it replaces)
  as one ``fastdiff.ops.group_norm_silu`` call.
- :class:`FusedSpatialSelfAttention`: fastdiff's attention block with its core on
  ``fastdiff.ops.attention``.
- :func:`fused_resnet_block_class`: diffusers' ``ResnetBlock2D`` with each GroupNorm -> SiLU
  pair as one fused call (diffusers applies the SiLU inside ``forward``, so only a new forward
  can fuse it).
- :class:`FusedAttnProcessor`: a diffusers attention processor with its core on
  ``fastdiff.ops.attention``.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from fastdiff import ops
from fastdiff.models.unet import SpatialSelfAttention


class FusedGroupNorm(nn.GroupNorm):
    """GroupNorm (+ SiLU when ``act``) as one fused op, sharing ``norm``'s weight and bias."""

    def __init__(self, norm: nn.GroupNorm, act: bool):
        # Built on the meta device so nothing is allocated, then given norm's own parameters.
        super().__init__(norm.num_groups, norm.num_channels, norm.eps, norm.affine, device="meta")
        self.weight, self.bias = norm.weight, norm.bias
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return ops.group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, self.act)
        # (N, C, *) of another rank (diffusers' attention normalises (B, C, H*W)): the statistics
        # are over (C/G, *) either way, so view it as (N, C, L, 1).
        y = ops.group_norm_silu(x.reshape(x.shape[0], x.shape[1], -1, 1), self.weight, self.bias,
                                self.num_groups, self.eps, self.act)
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={'silu' if self.act else 'none'}"


class FusedSpatialSelfAttention(SpatialSelfAttention):
    """fastdiff's attention block with the core on the flash-attention op (no new state)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ops.attention(q, k, v, q.shape[-1] ** -0.5)


def _fused_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' ``ResnetBlock2D.forward`` with ``norm1`` -> SiLU as one call (and ``norm2`` ->
    SiLU when the time embedding is added before it). ``norm1`` (and then ``norm2``) are
    :class:`FusedGroupNorm` with ``act=True``; the extra arguments diffusers deprecates are ignored."""
    hidden_states = self.norm1(input_tensor)  # GroupNorm + SiLU

    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:  # diffusers' workaround for upsample_nearest_nhwc
            input_tensor, hidden_states = input_tensor.contiguous(), hidden_states.contiguous()
        input_tensor, hidden_states = self.upsample(input_tensor), self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor, hidden_states = self.downsample(input_tensor), self.downsample(hidden_states)

    hidden_states = self.conv1(hidden_states)

    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]

    if self.time_embedding_norm == "default":
        if temb is not None:
            hidden_states = hidden_states + temb
        hidden_states = self.norm2(hidden_states)  # GroupNorm + SiLU
    else:  # "scale_shift": the SiLU comes after the modulation, so norm2 is a lone GroupNorm
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        hidden_states = self.norm2(hidden_states)
        hidden_states = self.nonlinearity(hidden_states * (1 + time_scale) + time_shift)

    hidden_states = self.conv2(self.dropout(hidden_states))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor.contiguous() if self.training else input_tensor)
    return (input_tensor + hidden_states) / self.output_scale_factor


@functools.cache
def fused_resnet_block_class() -> type:
    """``FusedResnetBlock2D``: a subclass of diffusers' ``ResnetBlock2D`` with only a new forward
    (built on first use so that importing fastdiff never imports diffusers). It is reachable as
    ``fastdiff.integrations.diffusers.modules.FusedResnetBlock2D`` (see ``__getattr__`` below), which is where
    pickle -- ``torch.save`` of an accelerated model -- finds it again."""
    # diffusers is optional
    from diffusers.models.resnet import ResnetBlock2D

    namespace = {"forward": _fused_resnet_forward, "__doc__": _fused_resnet_forward.__doc__, "__module__": __name__}
    return type("FusedResnetBlock2D", (ResnetBlock2D,), namespace)


def __getattr__(name: str):
    if name == "FusedResnetBlock2D":
        return fused_resnet_block_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class FusedAttnProcessor:
    """diffusers self-attention (``AttnProcessor2_0`` / ``AttnProcessor``) with the core on
    ``fastdiff.ops.attention``.

    The GroupNorm runs on the (B, C, H, W) map before it is flattened (the same statistics) so
    the norm op sees its native layout. Cross-attention or a mask, which the op does not take,
    go to diffusers' own processor unchanged.

    ``scale_from_module``: use ``attn.scale`` (what ``AttnProcessor`` uses) rather than
    1/sqrt(head_dim) (what ``AttnProcessor2_0`` uses), to match the processor replaced.
    """

    def __init__(self, scale_from_module: bool = False):
        self.scale_from_module = scale_from_module

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            # diffusers is optional
            from diffusers.models.attention_processor import AttnProcessor2_0

            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        spatial = hidden_states.dim() == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            if attn.group_norm is not None:
                hidden_states = attn.group_norm(hidden_states)
            hidden_states = hidden_states.reshape(batch, channels, height * width).transpose(1, 2)
        elif attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch, length, _ = hidden_states.shape

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, length, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        scale = attn.scale if self.scale_from_module else head_dim**-0.5
        hidden_states = ops.attention(query, key, value, scale)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, length, attn.heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
        if spatial:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
