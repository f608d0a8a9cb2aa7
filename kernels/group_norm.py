"""GroupNorm (+ optional SiLU), forward and backward, on NCHW- or channels_last-contiguous tensors.

Forward, one program per (sample, group), when batch x groups fills the GPU: the program walks its
group twice in [BLOCK_HW, BLOCK_C] tiles. The statistics pass merges per-tile means and centred
sums of squares of x - pivot with Chan's parallel update, all in fp32: no E[x^2] - E[x]^2
cancellation. The normalise pass applies the affine and SiLU epilogue and writes in the input's own
memory format. Only one tile and a few fp32 scalars are live at a time, so groups of any size
(64x64 pixels x 16 channels, ...) stream through registers.

Split-group path, when batch x groups is small against the SM count (batch 1 of a 32-group UNet is
32 programs on a 132-SM GPU): each group's pixels are cut into slices of whole tiles, one program
per slice. ``group_norm_partial_stats_kernel`` writes each slice's fp32 (count, mean, M2) of
x - pivot to a small workspace; ``group_norm_silu_apply_kernel`` merges its group's slices in slice
order with the same Chan update (no float atomics: deterministic, and every program of a group gets
bitwise the same statistics), then normalises its slice. x is read twice on both paths.

Vector loads: the compiler vectorises a tile's contiguous axis only where it can prove alignment.
In NCHW that axis is the pixels (Triton specialises HW % 16 == 0 at launch); in channels_last it is
the group's channels, which start at group * channels_per_group: GROUP_ALIGN, the largest power of
two dividing channels_per_group (up to one 16-byte vector), tells the compiler so, and C is computed
as num_groups * channels_per_group so that the pixel stride carries the same alignment.
"""
from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

#: Channel tiles are powers of two in [MIN_BLOCK_C, MAX_BLOCK_C]: fewer channels are masked (C/G = 1,
#: 2, 12, ...), more are looped over.
MIN_BLOCK_C = 4
MAX_BLOCK_C = 64
#: Elements per [BLOCK_HW, BLOCK_C] tile and the warps that share it: 8 fp32 values per thread, and
#: enough warps in flight for one program per group to keep an SM's memory pipe busy.
TILE_ELEMENTS = 2048
NUM_WARPS = 8
NUM_STAGES = 1
#: Split-group policy, first choices that no GPU has measured yet (benchmarks/test_bench_ops.py
#: times both paths): split while batch x groups < SPLIT_BELOW_PROGRAMS_PER_SM x SMs, into enough
#: slices for about TARGET_PROGRAMS_PER_SM programs per SM, never less than one tile per slice.
SPLIT_BELOW_PROGRAMS_PER_SM = 2
TARGET_PROGRAMS_PER_SM = 4
#: fp32 values per slice in the split path's workspace: count, mean and M2 of x - pivot.
PARTIAL_FIELDS = 3
_FIELDS = tl.constexpr(PARTIAL_FIELDS)  # the same, visible inside kernels


@triton.jit
def _program_start(pid, slices, hw_per_slice, HW, channels_per_group, num_groups, GROUP_ALIGN: tl.constexpr,
                   CHANNELS_LAST: tl.constexpr):
    """(group, first pixel, offset of the group's first element, its first channel,
    channels_per_group, pixel stride, channel stride) of program ``pid``, one of ``slices`` per
    group = sample * num_groups + g (the one-program kernels pass 1: pid is the group). The stride
    that the layout makes 1 stays a compile-time 1, so the compiler sees which tile axis is
    contiguous; channels_per_group comes back as a visible multiple of GROUP_ALIGN (exact: the
    launcher picks a divisor)."""
    group = pid // slices
    hw_begin = (pid % slices) * hw_per_slice
    channels_per_group = (channels_per_group // GROUP_ALIGN) * GROUP_ALIGN
    C = num_groups * channels_per_group
    sample = group // num_groups
    first_channel = (group % num_groups) * channels_per_group
    if CHANNELS_LAST:
        stride_hw = C
        stride_c = 1
    else:
        stride_hw = 1
        stride_c = HW
    base = sample.to(tl.int64) * C * HW + first_channel.to(tl.int64) * stride_c
    return group, hw_begin, base, first_channel, channels_per_group, stride_hw, stride_c


@triton.jit
def _tile(hw_start, c_start, HW, channels_per_group, stride_hw, stride_c, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """(element offsets, in-group mask) of the [BLOCK_HW, BLOCK_C] tile at (hw_start, c_start)."""
    hws = hw_start + tl.arange(0, BLOCK_HW)
    cs = c_start + tl.arange(0, BLOCK_C)
    mask = (hws[:, None] < HW) & (cs[None, :] < channels_per_group)
    return hws[:, None] * stride_hw + cs[None, :] * stride_c, mask


@triton.jit
def _chan_merge(count, mean, m2, other_count, other_mean, other_m2):
    """(count, mean, M2) of two disjoint sets from each one's (Chan et al.); other_count > 0."""
    new_count = count + other_count
    delta = other_mean - mean
    mean += delta * (other_count / new_count)
    m2 += other_m2 + delta * delta * (count * other_count / new_count)
    return new_count, mean, m2


@triton.jit
def _moments(x_ptr, pivot, hw_begin, hw_end, HW, channels_per_group, stride_hw, stride_c,
             BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """fp32 (count, mean, M2) of x - pivot over the group's pixels [hw_begin, min(hw_end, HW)), one
    tile at a time; hw_begin is a multiple of BLOCK_HW, so every tile starts inside the group."""
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c_start in range(0, channels_per_group, BLOCK_C):
        for hw_start in range(hw_begin, tl.minimum(hw_end, HW), BLOCK_HW):
            offsets, mask = _tile(hw_start, c_start, HW, channels_per_group, stride_hw, stride_c, BLOCK_HW, BLOCK_C)
            tile = tl.load(x_ptr + offsets, mask=mask, other=0.0)
            tile = tl.where(mask, tile.to(tl.float32) - pivot, 0.0)
            tile_count = (tl.minimum(HW - hw_start, BLOCK_HW) * tl.minimum(channels_per_group - c_start, BLOCK_C)).to(
                tl.float32
            )
            tile_mean = tl.sum(tl.sum(tile, axis=1), axis=0) / tile_count
            centred = tl.where(mask, tile - tile_mean, 0.0)
            tile_m2 = tl.sum(tl.sum(centred * centred, axis=1), axis=0)
            count, mean, m2 = _chan_merge(count, mean, m2, tile_count, tile_mean, tile_m2)
    return count, mean, m2


@triton.jit
def _rstd(count, m2, eps):
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    # Deviations past ~1e19 overflow the fp32 sums: no normalised value is right, so NaN (as the
    # reference route does), not the bias alone that rstd = 0 would give.
    return tl.where(m2 < float("inf"), rstd, float("nan"))


@triton.jit
def _channel_affine(weight_ptr, bias_ptr, first_channel, cs, c_mask, BLOCK_C: tl.constexpr, HAS_AFFINE: tl.constexpr):
    """fp32 (w, b) of channels ``first_channel + cs`` (1 and 0 without an affine)."""
    w = tl.full((BLOCK_C,), 1.0, tl.float32)
    b = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_AFFINE:
        w = tl.load(weight_ptr + first_channel + cs, mask=c_mask, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + first_channel + cs, mask=c_mask, other=0.0).to(tl.float32)
    return w, b


@triton.jit
def _normalise(x_ptr, y_ptr, weight_ptr, bias_ptr, first_channel, pivot, mean, rstd, hw_begin, hw_end, HW,
               channels_per_group, stride_hw, stride_c, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
               HAS_AFFINE: tl.constexpr, APPLY_SILU: tl.constexpr):
    """y = silu(((x - pivot) - mean) * rstd * w + b) over pixels [hw_begin, min(hw_end, HW)), in y's dtype."""
    for c_start in range(0, channels_per_group, BLOCK_C):
        cs = c_start + tl.arange(0, BLOCK_C)
        c_mask = cs < channels_per_group
        w, shift = _channel_affine(weight_ptr, bias_ptr, first_channel, cs, c_mask, BLOCK_C, HAS_AFFINE)
        scale = rstd * w
        for hw_start in range(hw_begin, tl.minimum(hw_end, HW), BLOCK_HW):
            offsets, mask = _tile(hw_start, c_start, HW, channels_per_group, stride_hw, stride_c, BLOCK_HW, BLOCK_C)
            tile = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            out = ((tile - pivot) - mean) * scale[None, :] + shift[None, :]
            if APPLY_SILU:
                out = out * tl.sigmoid(out)
            tl.store(y_ptr + offsets, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def group_norm_silu_kernel(
    x_ptr,  # (N, C, H, W) input, NCHW- or channels_last-contiguous; streamed, never held whole
    y_ptr,  # (N, C, H, W) output, same memory format as x
    weight_ptr,  # (C,) affine scale (any float dtype) or a dummy pointer when not HAS_AFFINE
    bias_ptr,  # (C,) affine shift, same rules as weight_ptr
    stats_ptr,  # (N * num_groups, 2) fp32 [mean of x - pivot, rstd] per group, written when STORE_STATS
    HW,
    channels_per_group,
    num_groups,
    eps,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    GROUP_ALIGN: tl.constexpr,  # a power of two dividing channels_per_group
    CHANNELS_LAST: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    APPLY_SILU: tl.constexpr,
    STORE_STATS: tl.constexpr,  # training: the backward kernel recomputes x-hat from these
):
    """One program per (sample, group): statistics pass, then normalise pass."""
    group, _, base, first_channel, channels_per_group, stride_hw, stride_c = _program_start(
        tl.program_id(0), 1, HW, HW, channels_per_group, num_groups, GROUP_ALIGN, CHANNELS_LAST
    )
    x_ptr += base
    y_ptr += base
    # Statistics are taken of x - pivot, with the group's first element as pivot: for a group whose
    # mean is large against its spread (1e4 +- 1) the shifted values are exact and small, so neither
    # the sums nor the normalisation ((x - pivot) - mean) round away the signal.
    pivot = tl.load(x_ptr).to(tl.float32)
    count, mean, m2 = _moments(x_ptr, pivot, 0, HW, HW, channels_per_group, stride_hw, stride_c, BLOCK_HW, BLOCK_C)
    rstd = _rstd(count, m2, eps)
    if STORE_STATS:
        tl.store(stats_ptr + 2 * group, mean)
        tl.store(stats_ptr + 2 * group + 1, rstd)
    _normalise(x_ptr, y_ptr, weight_ptr, bias_ptr, first_channel, pivot, mean, rstd, 0, HW, HW, channels_per_group,
               stride_hw, stride_c, BLOCK_HW, BLOCK_C, HAS_AFFINE, APPLY_SILU)


@triton.jit
def group_norm_partial_stats_kernel(
    x_ptr,  # (N, C, H, W) input, NCHW- or channels_last-contiguous; each program reads one slice
    partial_ptr,  # (N * num_groups * slices, 3) fp32 workspace: [count, mean, M2] of x - pivot per slice
    HW,
    channels_per_group,
    num_groups,
    hw_per_slice,  # pixels per slice, a multiple of BLOCK_HW; the last slice may be shorter
    slices,  # slices per group
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    GROUP_ALIGN: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
):
    """Split-group path, first launch: one program per (sample, group, slice of pixels)."""
    pid = tl.program_id(0)
    _, hw_begin, base, first_channel, channels_per_group, stride_hw, stride_c = _program_start(
        pid, slices, hw_per_slice, HW, channels_per_group, num_groups, GROUP_ALIGN, CHANNELS_LAST
    )
    x_ptr += base
    pivot = tl.load(x_ptr).to(tl.float32)  # the group's pivot, the same in every slice
    count, mean, m2 = _moments(x_ptr, pivot, hw_begin, hw_begin + hw_per_slice, HW, channels_per_group, stride_hw,
                               stride_c, BLOCK_HW, BLOCK_C)
    tl.store(partial_ptr + _FIELDS * pid, count)
    tl.store(partial_ptr + _FIELDS * pid + 1, mean)
    tl.store(partial_ptr + _FIELDS * pid + 2, m2)


@triton.jit
def group_norm_silu_apply_kernel(
    x_ptr,  # (N, C, H, W) input, as in group_norm_partial_stats_kernel
    y_ptr,  # (N, C, H, W) output, same memory format as x
    weight_ptr,  # (C,) affine scale or a dummy pointer when not HAS_AFFINE
    bias_ptr,  # (C,) affine shift, same rules as weight_ptr
    partial_ptr,  # (N * num_groups * slices, 3) fp32, written by group_norm_partial_stats_kernel
    stats_ptr,  # (N * num_groups, 2) fp32 [mean of x - pivot, rstd], written by slice 0 when STORE_STATS
    HW,
    channels_per_group,
    num_groups,
    hw_per_slice,
    slices,
    eps,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    GROUP_ALIGN: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    APPLY_SILU: tl.constexpr,
    STORE_STATS: tl.constexpr,
):
    """Split-group path, second launch: merge the group's slices in order, normalise this slice."""
    group, hw_begin, base, first_channel, channels_per_group, stride_hw, stride_c = _program_start(
        tl.program_id(0), slices, hw_per_slice, HW, channels_per_group, num_groups, GROUP_ALIGN, CHANNELS_LAST
    )
    x_ptr += base
    y_ptr += base
    pivot = tl.load(x_ptr).to(tl.float32)
    partial_ptr += _FIELDS * group.to(tl.int64) * slices
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for s in range(0, slices):
        count, mean, m2 = _chan_merge(count, mean, m2, tl.load(partial_ptr + _FIELDS * s),
                                      tl.load(partial_ptr + _FIELDS * s + 1),
                                      tl.load(partial_ptr + _FIELDS * s + 2))
    rstd = _rstd(count, m2, eps)
    if STORE_STATS:
        if hw_begin == 0:  # the group's first slice
            tl.store(stats_ptr + 2 * group, mean)
            tl.store(stats_ptr + 2 * group + 1, rstd)
    _normalise(x_ptr, y_ptr, weight_ptr, bias_ptr, first_channel, pivot, mean, rstd, hw_begin, hw_begin + hw_per_slice,
               HW, channels_per_group, stride_hw, stride_c, BLOCK_HW, BLOCK_C, HAS_AFFINE, APPLY_SILU)


@triton.jit
def _silu_grad(g, xhat, w, b, APPLY_SILU: tl.constexpr):
    """dL/da from dL/dy where y = silu(a), a = x-hat * w + b (g itself without SiLU)."""
    if APPLY_SILU:
        a = xhat * w[None, :] + b[None, :]
        sig = tl.sigmoid(a)
        g = g * sig * (1.0 + a * (1.0 - sig))
    return g


@triton.jit
def group_norm_silu_backward_kernel(
    x_ptr,  # (N, C, H, W) forward input, NCHW- or channels_last-contiguous; read twice, tile by tile
    dy_ptr,  # (N, C, H, W) gradient of the output, same memory format as x
    dx_ptr,  # (N, C, H, W) gradient of x, same memory format and dtype as x
    weight_ptr,  # (C,) affine scale, or a dummy pointer when not HAS_AFFINE
    bias_ptr,  # (C,) affine shift, same rules as weight_ptr
    stats_ptr,  # (N * num_groups, 2) fp32 [mean of x - pivot, rstd] saved by the forward kernel
    dweight_ptr,  # (N, C) fp32: this sample's share of dweight (the launcher sums over N)
    dbias_ptr,  # (N, C) fp32: this sample's share of dbias
    HW,
    channels_per_group,
    num_groups,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    GROUP_ALIGN: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    APPLY_SILU: tl.constexpr,
):
    """One program per (sample, group). With x-hat = ((x - pivot) - mean) * rstd recomputed from
    the saved statistics, a = x-hat * w + b and g = dL/da (through SiLU when applied):
    dx = rstd * (w g - mean(w g) - x-hat * mean(w g x-hat)), dw = sum g x-hat, db = sum g.
    Pass 1 accumulates the two group means and the per-channel sums in fp32; pass 2 writes dx."""
    group, _, base, first_channel, channels_per_group, stride_hw, stride_c = _program_start(
        tl.program_id(0), 1, HW, HW, channels_per_group, num_groups, GROUP_ALIGN, CHANNELS_LAST
    )
    x_ptr += base
    dy_ptr += base
    dx_ptr += base
    pivot = tl.load(x_ptr).to(tl.float32)
    mean = tl.load(stats_ptr + 2 * group)
    rstd = tl.load(stats_ptr + 2 * group + 1)

    # Pass 1: sum(w g) and sum(w g x-hat) over the group; sum(g x-hat) and sum(g) per channel.
    sum_wg = 0.0
    sum_wg_xhat = 0.0
    for c_start in range(0, channels_per_group, BLOCK_C):
        cs = c_start + tl.arange(0, BLOCK_C)
        c_mask = cs < channels_per_group
        w, b = _channel_affine(weight_ptr, bias_ptr, first_channel, cs, c_mask, BLOCK_C, HAS_AFFINE)
        channel_g_xhat = tl.zeros((BLOCK_C,), tl.float32)
        channel_g = tl.zeros((BLOCK_C,), tl.float32)
        for hw_start in range(0, HW, BLOCK_HW):
            offsets, mask = _tile(hw_start, c_start, HW, channels_per_group, stride_hw, stride_c, BLOCK_HW, BLOCK_C)
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            xhat = ((x - pivot) - mean) * rstd
            g = tl.where(mask, _silu_grad(g, xhat, w, b, APPLY_SILU), 0.0)
            xhat = tl.where(mask, xhat, 0.0)
            if HAS_AFFINE:
                channel_g_xhat += tl.sum(g * xhat, axis=0)
                channel_g += tl.sum(g, axis=0)
            else:
                sum_wg += tl.sum(tl.sum(g, axis=1), axis=0)
                sum_wg_xhat += tl.sum(tl.sum(g * xhat, axis=1), axis=0)
        if HAS_AFFINE:
            sum_wg += tl.sum(channel_g * w, axis=0)
            sum_wg_xhat += tl.sum(channel_g_xhat * w, axis=0)
            partial = (group // num_groups).to(tl.int64) * num_groups * channels_per_group + first_channel + cs
            tl.store(dweight_ptr + partial, channel_g_xhat, mask=c_mask)
            tl.store(dbias_ptr + partial, channel_g, mask=c_mask)
    count = (HW * channels_per_group).to(tl.float32)
    mean_wg = sum_wg / count
    mean_wg_xhat = sum_wg_xhat / count

    # Pass 2: dx, in x's dtype and memory format.
    for c_start in range(0, channels_per_group, BLOCK_C):
        cs = c_start + tl.arange(0, BLOCK_C)
        c_mask = cs < channels_per_group
        w, b = _channel_affine(weight_ptr, bias_ptr, first_channel, cs, c_mask, BLOCK_C, HAS_AFFINE)
        for hw_start in range(0, HW, BLOCK_HW):
            offsets, mask = _tile(hw_start, c_start, HW, channels_per_group, stride_hw, stride_c, BLOCK_HW, BLOCK_C)
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            xhat = ((x - pivot) - mean) * rstd
            g = _silu_grad(g, xhat, w, b, APPLY_SILU)
            dx = rstd * (g * w[None, :] - mean_wg - xhat * mean_wg_xhat)
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launch configuration (pure Python)


class Plan(NamedTuple):
    """What the launchers pick for one input (see :func:`plan`)."""

    block_c: int
    block_hw: int
    group_align: int
    slices: int  # programs per (sample, group): 1 is the one-program kernel, more the split-group path
    hw_per_slice: int  # pixels per slice, a multiple of block_hw (HW itself when slices == 1)


def _block_config(channels_per_group: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) for a group with channels_per_group channels."""
    block_c = min(max(triton.next_power_of_2(channels_per_group), MIN_BLOCK_C), MAX_BLOCK_C)
    return block_c, TILE_ELEMENTS // block_c


def group_align(channels_per_group: int, element_size: int, channels_last: bool) -> int:
    """GROUP_ALIGN: in channels_last, the largest power of two that divides channels_per_group, up to
    one 16-byte vector of elements; 1 in NCHW, whose contiguous axis (the pixels) does not need it."""
    if not channels_last:
        return 1
    align = 1
    while align * 2 * element_size <= 16 and channels_per_group % (align * 2) == 0:
        align *= 2
    return align


def slices_per_group(groups: int, tiles_per_group: int, sm_count: int | None) -> int:
    """Programs per (sample, group), the split-group policy: 1 while batch x groups (``groups``)
    is at least SPLIT_BELOW_PROGRAMS_PER_SM x ``sm_count`` (or there is no SM count: CPU tensors
    under the interpreter), else enough for about TARGET_PROGRAMS_PER_SM programs per SM, at most
    one per tile."""
    if sm_count is None or groups >= SPLIT_BELOW_PROGRAMS_PER_SM * sm_count:
        return 1
    return max(1, min(tiles_per_group, triton.cdiv(TARGET_PROGRAMS_PER_SM * sm_count, groups)))


def plan(batch: int, channels: int, hw: int, num_groups: int, element_size: int, channels_last: bool,
         sm_count: int | None) -> Plan:
    """Tiles, alignment and slicing for an (N, C, H*W) input of ``element_size``-byte elements."""
    channels_per_group = channels // num_groups
    block_c, block_hw = _block_config(channels_per_group)
    tiles = triton.cdiv(hw, block_hw)
    slices = slices_per_group(batch * num_groups, tiles, sm_count)
    hw_per_slice = triton.cdiv(tiles, slices) * block_hw if slices > 1 else hw
    slices = triton.cdiv(hw, hw_per_slice)  # rounding to whole tiles may leave fewer, never an empty slice
    return Plan(block_c, block_hw, group_align(channels_per_group, element_size, channels_last), slices,
                hw_per_slice if slices > 1 else hw)


@functools.cache
def _device_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sm_count(device: torch.device) -> int | None:
    """The CUDA device's SM count; None for CPU tensors (the interpreter: one program per group)."""
    if device.type != "cuda":
        return None
    return _device_sm_count(device.index if device.index is not None else torch.cuda.current_device())


class Launch(NamedTuple):
    """One kernel launch: the kernel, its grid and every argument by name (constexprs included).
    The launchers run these and ``aot_specs`` compiles them, so both see the same arguments."""

    kernel: object
    grid: tuple[int]
    args: dict


def forward_launches(x, y, weight, bias, stats, partials, shape: tuple[int, int, int], num_groups: int, eps: float,
                     p: Plan, channels_last: bool, has_affine: bool, apply_silu: bool) -> list[Launch]:
    """The forward's launches for an (N, C, H*W) ``shape``: one kernel, or the split-group pair.
    Tensor arguments may be stand-ins (``aot_specs``); ``stats``/``partials`` None when unused."""
    n, c, hw = shape
    common = dict(HW=hw, channels_per_group=c // num_groups, num_groups=num_groups)
    tiles = dict(BLOCK_C=p.block_c, BLOCK_HW=p.block_hw, GROUP_ALIGN=p.group_align, CHANNELS_LAST=channels_last)
    epilogue = dict(HAS_AFFINE=has_affine, APPLY_SILU=apply_silu, STORE_STATS=stats is not None)
    stats = x if stats is None else stats  # never written unless STORE_STATS
    if p.slices == 1:
        return [Launch(group_norm_silu_kernel, (n * num_groups,),
                       dict(x_ptr=x, y_ptr=y, weight_ptr=weight, bias_ptr=bias, stats_ptr=stats, **common, eps=eps,
                            **tiles, **epilogue))]
    grid = (n * num_groups * p.slices,)
    slicing = dict(hw_per_slice=p.hw_per_slice, slices=p.slices)
    return [
        Launch(group_norm_partial_stats_kernel, grid, dict(x_ptr=x, partial_ptr=partials, **common, **slicing, **tiles)),
        Launch(group_norm_silu_apply_kernel, grid,
               dict(x_ptr=x, y_ptr=y, weight_ptr=weight, bias_ptr=bias, partial_ptr=partials, stats_ptr=stats, **common,
                    **slicing, eps=eps, **tiles, **epilogue)),
    ]


def backward_launch(x, dy, dx, weight, bias, stats, partial_w, partial_b, shape: tuple[int, int, int],
                    num_groups: int, p: Plan, channels_last: bool, has_affine: bool, apply_silu: bool) -> Launch:
    n, c, hw = shape
    return Launch(group_norm_silu_backward_kernel, (n * num_groups,),
                  dict(x_ptr=x, dy_ptr=dy, dx_ptr=dx, weight_ptr=weight, bias_ptr=bias, stats_ptr=stats,
                       dweight_ptr=partial_w, dbias_ptr=partial_b, HW=hw, channels_per_group=c // num_groups,
                       num_groups=num_groups, BLOCK_C=p.block_c, BLOCK_HW=p.block_hw, GROUP_ALIGN=p.group_align,
                       CHANNELS_LAST=channels_last, HAS_AFFINE=has_affine, APPLY_SILU=apply_silu))


def _run(launch: Launch) -> None:
    launch.kernel[launch.grid](**launch.args, num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _affine(x: torch.Tensor, weight, bias) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(has_affine, weight, bias) as the kernels take them: with only one of weight/bias given, the
    other is filled with ones/zeros so one switch covers both; x stands in when neither is given."""
    if weight is None and bias is None:
        return False, x, x  # never read: HAS_AFFINE is False
    c = x.shape[1]
    return (True, weight.contiguous() if weight is not None else x.new_ones(c),
            bias.contiguous() if bias is not None else x.new_zeros(c))


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    apply_silu: bool,
    stats: torch.Tensor | None = None,
    *,
    sm_count: int | None = None,
) -> torch.Tensor:
    """Launch the forward on already-validated arguments; returns y in x's dtype and memory format.
    ``stats``: an (N * num_groups, 2) float32 tensor that receives each group's [mean of
    x - pivot, rstd] (training; see :func:`group_norm_silu_backward`), or None. ``sm_count``
    drives the split-group policy (:func:`slices_per_group`); default: the CUDA device's, and
    none for CPU tensors (the interpreter), which then take the one-program kernel.

    NCHW- and channels_last-contiguous inputs are read in place; any other layout is copied to NCHW
    first (the op layer has already made sliced channels_last inputs channels_last-contiguous).
    """
    channels_last = _is_channels_last(x)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=memory_format)
    y = torch.empty_like(x, memory_format=memory_format)
    n, c, h, w = x.shape
    if y.numel() == 0:
        return y
    has_affine, weight, bias = _affine(x, weight, bias)
    if sm_count is None:
        sm_count = device_sm_count(x.device)
    p = plan(n, c, h * w, num_groups, x.element_size(), channels_last, sm_count)
    partials = None
    if p.slices > 1:
        partials = torch.empty((n * num_groups * p.slices, PARTIAL_FIELDS), dtype=torch.float32, device=x.device)
    for launch in forward_launches(x, y, weight, bias, stats, partials, (n, c, h * w), num_groups, eps, p,
                                   channels_last, has_affine, apply_silu):
        _run(launch)
    return y


def group_norm_silu_backward(
    x: torch.Tensor,
    dy: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: torch.Tensor,
    num_groups: int,
    apply_silu: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dweight, dbias) of :func:`group_norm_silu` from the forward's input and saved
    ``stats``; dx in x's dtype and memory format, dweight/dbias (None when not given) in their
    parameter's dtype, reduced over the batch from fp32 partial sums."""
    channels_last = _is_channels_last(x)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=memory_format)
    dy = dy.to(x.dtype).contiguous(memory_format=memory_format)
    dx = torch.empty_like(x, memory_format=memory_format)
    n, c, h, w = x.shape
    partial_w = torch.zeros((n, c), dtype=torch.float32, device=x.device)
    partial_b = torch.zeros((n, c), dtype=torch.float32, device=x.device)
    if dx.numel():
        has_affine, affine_weight, affine_bias = _affine(x, weight, bias)
        p = plan(n, c, h * w, num_groups, x.element_size(), channels_last, sm_count=None)
        _run(backward_launch(x, dy, dx, affine_weight, affine_bias, stats, partial_w, partial_b, (n, c, h * w),
                             num_groups, p, channels_last, has_affine, apply_silu))
    dweight = partial_w.sum(0).to(weight.dtype) if weight is not None else None
    dbias = partial_b.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias


# ---------------------------------------------------------------- ahead-of-time report

#: (N, C, H*W) the report compiles at 32 groups: the Ho CIFAR-10 UNet's GroupNorms at batch 1 (the
#: split-group path on a 132-SM H100) and 64 (one program per group).
AOT_SHAPES = [(batch, c, hw) for batch in (1, 64) for c, hw in
              ((128, 1024), (256, 256), (384, 256), (512, 64), (256, 16))]
AOT_GROUPS = 32
AOT_SM_COUNT = 132  # H100 SXM
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
_TILE_LOADS = {"group_norm_silu_kernel": 2, "group_norm_partial_stats_kernel": 1, "group_norm_silu_apply_kernel": 1,
               "group_norm_silu_backward_kernel": 4}


def expected_vector_bytes(p: Plan, hw: int, element_size: int, channels_last: bool) -> int | None:
    """Bytes per tile load the compiler can prove aligned: channels_last, GROUP_ALIGN elements; NCHW,
    16 elements when HW % 16 == 0 (the JIT's specialisation); capped at a 16-byte vector. None when
    only scalar loads are possible."""
    elements = p.group_align if channels_last else (16 if hw % 16 == 0 else 1)
    return min(16, elements * element_size) if elements > 1 else None


def _aot_launches():
    """(name, Launch, expected vector bytes) for every launch the report compiles: the shapes above
    in both layouts, every (BLOCK_C, GROUP_ALIGN) the launchers can pick, and every epilogue switch."""
    # triton is optional: imported only where it is used
    from triton.runtime.jit import MockTensor

    ptr = {dtype: MockTensor(dtype) for dtype in (torch.bfloat16, torch.float32)}
    f32 = ptr[torch.float32]
    cases = [(shape, cl, torch.bfloat16, True, True, False) for shape in AOT_SHAPES for cl in (False, True)]
    cases += [((64, 128, 1024), cl, torch.float32, True, True, False) for cl in (False, True)]
    for block_c in (2**i for i in range(MIN_BLOCK_C.bit_length() - 1, MAX_BLOCK_C.bit_length())):
        for cpg in range(max(1, block_c // 2 + 1) if block_c > MIN_BLOCK_C else 1, block_c + 1):
            cases.append(((64, AOT_GROUPS * cpg, 256), True, torch.bfloat16, True, True, False))
        cases.append(((64, AOT_GROUPS * block_c, 256), False, torch.bfloat16, True, True, False))
    for cl, affine, silu, stats in itertools.product((False, True), repeat=4):
        cases.append(((64, 256, 256), cl, torch.bfloat16, affine, silu, stats))
    cases += [((1, 128, 1024), cl, torch.bfloat16, True, True, True) for cl in (False, True)]

    found = []
    for (n, c, hw), cl, dtype, affine, silu, store_stats in cases:
        x = ptr[dtype]
        size = torch.empty((), dtype=dtype).element_size()
        flags = "".join(f"_{flag}" for flag, on in (("affine", affine), ("silu", silu), ("stats", store_stats)) if on)
        tag = f"{'cl' if cl else 'nchw'}_{_DTYPE_NAMES[dtype]}_{n}x{c}x{hw}g{AOT_GROUPS}{flags}"
        p = plan(n, c, hw, AOT_GROUPS, size, cl, AOT_SM_COUNT)
        vector = expected_vector_bytes(p, hw, size, cl)
        for launch in forward_launches(x, x, x, x, f32 if store_stats else None, f32, (n, c, hw), AOT_GROUPS, 1e-6, p,
                                       cl, affine, silu):
            found.append((f"{launch.kernel.__name__.removesuffix('_kernel')}_{tag}", launch, vector))
        if not store_stats:
            p = plan(n, c, hw, AOT_GROUPS, size, cl, sm_count=None)
            launch = backward_launch(x, x, x, x, x, f32, f32, f32, (n, c, hw), AOT_GROUPS, p, cl, affine, silu)
            found.append((f"group_norm_silu_backward_{tag}", launch, vector))
    return found


def aot_specs():
    """Every kernel configuration the launchers pick for the launches above, each compiled with
    the specialisation Triton's JIT gives those arguments (fastdiff.kernels.aot.launch_spec), and
    checked for vectorised tile loads where the layout allows them. Listed for bf16 (the GPU
    serving dtype; fp16 compiles alike) and a few fp32 launches. Identical compiles are listed once."""
    # triton's compiler: only the AOT report needs it
    from fastdiff.kernels.aot import launch_spec

    specs = {}
    for name, launch, vector in _aot_launches():
        spec = launch_spec(name, launch.kernel, launch.args, NUM_WARPS, NUM_STAGES, vector_load_bytes=vector,
                           vector_loads=_TILE_LOADS[launch.kernel.__name__])
        key = (launch.kernel.__name__, tuple(spec.signature.items()), repr(spec.constexprs), repr(spec.attrs))
        specs.setdefault(key, spec)
    return list(specs.values())
