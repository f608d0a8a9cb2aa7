"""The diffusers peer: a ``UNet2DModel`` carrying a fastdiff UNet's weights, run by the
unmodified ``DDPMPipeline`` / ``DDIMPipeline``.

Both models are Ho et al.'s architecture, so the conversion is a renaming plus one split (our
fused 1x1 ``qkv`` conv becomes diffusers' ``to_q``/``to_k``/``to_v`` linears). The pipelines
draw their noise with ``randn_tensor``; :func:`replayed_noise` substitutes a replay of the run's
shared :class:`~fastdiff.sampling.ExternalNoise` so every path denoises the same noise.
"""
from __future__ import annotations

import contextlib
import importlib

import torch
import torch.nn as nn

from fastdiff.models.unet import Downsample, SpatialSelfAttention, UNet, Upsample


class ConversionError(ValueError):
    """The fastdiff UNet has a detail UNet2DModel cannot express."""


def unet2d_config(config) -> dict:
    """UNet2DModel keyword arguments describing the same network as a fastdiff ``UNetConfig``."""
    if config.ch_mult[0] != 1:
        raise ConversionError(f"ch_mult[0] = {config.ch_mult[0]}: UNet2DModel ties the stem width to block 0's width")
    widths = [config.ch * m for m in config.ch_mult]
    levels = range(len(widths))
    has_attention = [config.image_size >> level in config.attn_resolutions for level in levels]
    attention_widths = {w for w, a in zip(widths, has_attention) if a} | {widths[-1]}
    if config.num_heads == 1:
        head_dim = None  # diffusers then uses one head as wide as each block
    elif len({w // config.num_heads for w in attention_widths}) == 1:
        head_dim = widths[-1] // config.num_heads
    else:
        raise ConversionError("UNet2DModel has one attention_head_dim for all blocks; these widths need several")
    return dict(
        sample_size=config.image_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        time_embedding_type="positional",
        freq_shift=1,  # fastdiff divides by (half - 1), as Ho et al.'s TF code
        flip_sin_to_cos=False,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in has_attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)),
        block_out_channels=tuple(widths),
        layers_per_block=config.num_res_blocks,
        downsample_padding=1,  # fastdiff's stride-2 conv pads 1 on every side
        dropout=config.dropout,
        act_fn="silu",
        attention_head_dim=head_dim,
        norm_num_groups=config.num_groups,
        norm_eps=config.norm_eps,
        num_class_embeds=config.num_classes,
    )


def _copy(target: dict, prefix: str, module: nn.Module) -> None:
    for name, tensor in module.state_dict().items():
        target[f"{prefix}.{name}"] = tensor


def _copy_resblock(target: dict, prefix: str, block) -> None:
    for ours, theirs in (("norm1", "norm1"), ("conv1", "conv1"), ("temb_proj", "time_emb_proj"),
                         ("norm2", "norm2"), ("conv2", "conv2")):
        _copy(target, f"{prefix}.{theirs}", getattr(block, ours))
    if isinstance(block.skip, nn.Conv2d):
        _copy(target, f"{prefix}.conv_shortcut", block.skip)


def _copy_attention(target: dict, prefix: str, attention: SpatialSelfAttention) -> None:
    _copy(target, f"{prefix}.group_norm", attention.norm)
    weights = attention.qkv.weight[:, :, 0, 0].chunk(3)
    biases = attention.qkv.bias.chunk(3)
    for name, w, b in zip(("to_q", "to_k", "to_v"), weights, biases):
        target[f"{prefix}.{name}.weight"], target[f"{prefix}.{name}.bias"] = w, b
    target[f"{prefix}.to_out.0.weight"] = attention.proj_out.weight[:, :, 0, 0]
    target[f"{prefix}.to_out.0.bias"] = attention.proj_out.bias


def _copy_level_blocks(target: dict, layers, block_prefix: str, resample: str) -> None:
    """Copy a down or up path: ResBlock(+attention) pairs per level, a resampler closing each level."""
    level, index = 0, 0
    for layer in layers:
        if isinstance(layer, (Downsample, Upsample)):
            _copy(target, f"{block_prefix}.{level}.{resample}.0.conv", layer.conv)
            level, index = level + 1, 0
            continue
        block, attention = layer
        _copy_resblock(target, f"{block_prefix}.{level}.resnets.{index}", block)
        if isinstance(attention, SpatialSelfAttention):
            _copy_attention(target, f"{block_prefix}.{level}.attentions.{index}", attention)
        index += 1


def converted_state_dict(model: UNet) -> dict[str, torch.Tensor]:
    """The fastdiff UNet's weights under UNet2DModel's parameter names."""
    sd: dict[str, torch.Tensor] = {}
    _copy(sd, "time_embedding.linear_1", model.temb[0])
    _copy(sd, "time_embedding.linear_2", model.temb[2])
    if model.class_embedding is not None:
        _copy(sd, "class_embedding", model.class_embedding)
    _copy(sd, "conv_in", model.conv_in)
    _copy_level_blocks(sd, model.down, "down_blocks", "downsamplers")
    block1, attention, block2 = model.mid
    _copy_resblock(sd, "mid_block.resnets.0", block1)
    _copy_attention(sd, "mid_block.attentions.0", attention)
    _copy_resblock(sd, "mid_block.resnets.1", block2)
    _copy_level_blocks(sd, model.up, "up_blocks", "upsamplers")
    _copy(sd, "conv_norm_out", model.norm_out)
    _copy(sd, "conv_out", model.conv_out)
    return sd


def to_unet2d(model: UNet):
    """A diffusers ``UNet2DModel`` with ``model``'s weights (same device and dtype), in eval mode."""
    # diffusers is optional
    from diffusers import UNet2DModel

    param = next(model.parameters())
    unet = UNet2DModel(**unet2d_config(model.config))
    unet.load_state_dict(converted_state_dict(model), strict=True)
    unet = unet.to(param.device)
    return (unet if param.dtype == torch.float32 else unet.to(param.dtype)).eval()


@torch.no_grad()
def conversion_error(model: UNet, unet2d, batch: int = 2, seed: int = 0) -> float:
    """Max abs difference of the two models' eps predictions on random inputs."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters())
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen).to(param)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(param.device)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=gen).to(param.device) if cfg.num_classes else None
    ours = model(x, t, labels)
    theirs = unet2d(x, t, class_labels=labels).sample
    return (ours.double() - theirs.double()).abs().max().item()


# The modules whose ``randn_tensor`` the DDPM/DDIM pipelines and schedulers draw from.
_NOISE_SOURCES = (
    "diffusers.pipelines.ddpm.pipeline_ddpm",
    "diffusers.pipelines.ddim.pipeline_ddim",
    "diffusers.schedulers.scheduling_ddpm",
    "diffusers.schedulers.scheduling_ddim",
    "diffusers.schedulers.scheduling_dpmsolver_multistep",
)


@contextlib.contextmanager
def replayed_noise(noise):
    """Make diffusers' ``randn_tensor`` return x_T, then z[0], z[1], ... of ``noise`` in order."""
    queue = [noise.x_T, *noise.z.unbind(0)]
    drawn = iter(queue)

    def replay(shape, generator=None, device=None, dtype=None, layout=None):
        try:
            tensor = next(drawn)
        except StopIteration:
            raise RuntimeError("diffusers drew more noise than the run's ExternalNoise holds") from None
        if tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(
                f"diffusers asked for noise of shape {tuple(shape)}, the replay holds {tuple(tensor.shape)}")
        return tensor.to(device=device, dtype=dtype)

    modules = [importlib.import_module(name) for name in _NOISE_SOURCES]
    saved = [m.randn_tensor for m in modules]
    for m in modules:
        m.randn_tensor = replay
    try:
        yield
    finally:
        for m, original in zip(modules, saved):
            m.randn_tensor = original


@contextlib.contextmanager
def injected_class_labels(unet2d, class_labels):
    """Pass ``class_labels`` to every ``unet2d`` call: DDPM/DDIM pipelines have no argument for them."""
    if class_labels is None:
        yield
        return

    def add_labels(module, args, kwargs):
        return args, {**kwargs, "class_labels": class_labels}

    hook = unet2d.register_forward_pre_hook(add_labels, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()


def make_pipeline(unet2d, table, schedule):
    """DDPMPipeline or DDIMPipeline whose scheduler computes the update that ``table`` encodes
    (for DPM-Solver++ tables, a DDPMPipeline with a DPMSolverMultistepScheduler of the same
    order and form, diffusers' defaults otherwise as in :func:`fastdiff.schedulers.dpmsolver.dpmsolver_table`).

    The schedule's betas are handed over as ``trained_betas``, so any fastdiff schedule maps exactly.
    Raises ValueError for a UniPC table: both pipelines pass ``generator=`` to the scheduler's
    ``step``, which ``UniPCMultistepScheduler.step`` does not take.
    """
    # diffusers is optional
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler

    if table.corrector:
        raise ValueError("no unconditional diffusers pipeline runs UniPCMultistepScheduler: DDPMPipeline and "
                         "DDIMPipeline pass generator= to its step, which does not take it")
    if table.history_size or table.method.endswith("dpmsolver++"):
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas.float().tolist(),
            solver_order=table.history_size + 1, algorithm_type=table.method,
        )
        pipe = DDPMPipeline(unet=unet2d, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    common = dict(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas.float().tolist(),
                  clip_sample=table.clip is not None, clip_sample_range=table.clip or 1.0)
    if table.method == "ddpm":
        pipe = DDPMPipeline(unet=unet2d, scheduler=DDPMScheduler(variance_type="fixed_large", **common))
    else:
        pipe = DDIMPipeline(unet=unet2d, scheduler=DDIMScheduler(set_alpha_to_one=True, **common))
    pipe.set_progress_bar_config(disable=True)
    return pipe
