"""GroupNorm (+ optional SiLU) forward: one Triton program per (sample, group).

Each program walks its group twice in [BLOCK_HW, BLOCK_C] tiles. The statistics pass merges
per-tile means and centred sums of squares of x - pivot with Chan's parallel update, all in fp32:
no E[x^2] - E[x]^2 cancellation. The normalise pass applies the affine and SiLU epilogue and
writes in the input's own memory format. Only one tile and a few fp32 scalars are live at a time,
so groups of any size (64x64 pixels x 16 channels, ...) stream through registers.
"""
from __future__ import annotations

import itertools

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


@triton.jit
def group_norm_silu_kernel(
    x_ptr,  # (N, C, H, W) input, NCHW- or channels_last-contiguous; streamed, never held whole
    y_ptr,  # (N, C, H, W) output, same memory format as x
    weight_ptr,  # (C,) affine scale (any float dtype) or a dummy pointer when not HAS_AFFINE
    bias_ptr,  # (C,) affine shift, same rules as weight_ptr
    stats_ptr,  # (N * num_groups, 2) fp32 [mean of x - pivot, rstd] per group, written when STORE_STATS
    C,
    HW,
    channels_per_group,
    num_groups,
    eps,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    APPLY_SILU: tl.constexpr,
    STORE_STATS: tl.constexpr,  # training: the backward kernel recomputes x-hat from these
):
    pid = tl.program_id(0)
    sample = pid // num_groups
    first_channel = (pid % num_groups) * channels_per_group
    # The layout is a constexpr so the compiler knows which tile axis is contiguous (coalescing).
    if CHANNELS_LAST:
        stride_c = 1
        stride_hw = C
    else:
        stride_c = HW
        stride_hw = 1
    base = sample.to(tl.int64) * C * HW + first_channel.to(tl.int64) * stride_c
    x_ptr += base
    y_ptr += base
    hw_offsets = tl.arange(0, BLOCK_HW)
    c_offsets = tl.arange(0, BLOCK_C)

    # Statistics are taken of x - pivot, with the group's first element as pivot: for a group whose
    # mean is large against its spread (1e4 +- 1) the shifted values are exact and small, so neither
    # the sums nor the normalisation ((x - pivot) - mean) round away the signal.
    pivot = tl.load(x_ptr).to(tl.float32)

    # Pass 1: running (count, mean, M2) of x - pivot in fp32, one tile at a time (Chan et al.).
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c_start in range(0, channels_per_group, BLOCK_C):
        cs = c_start + c_offsets
        for hw_start in range(0, HW, BLOCK_HW):
            hws = hw_start + hw_offsets
            mask = (hws[:, None] < HW) & (cs[None, :] < channels_per_group)
            tile = tl.load(x_ptr + hws[:, None] * stride_hw + cs[None, :] * stride_c, mask=mask, other=0.0)
            tile = tl.where(mask, tile.to(tl.float32) - pivot, 0.0)
            tile_count = (tl.minimum(HW - hw_start, BLOCK_HW) * tl.minimum(channels_per_group - c_start, BLOCK_C)).to(
                tl.float32
            )
            tile_mean = tl.sum(tl.sum(tile, axis=1), axis=0) / tile_count
            centred = tl.where(mask, tile - tile_mean, 0.0)
            tile_m2 = tl.sum(tl.sum(centred * centred, axis=1), axis=0)
            new_count = count + tile_count
            delta = tile_mean - mean
            mean += delta * (tile_count / new_count)
            m2 += tile_m2 + delta * delta * (count * tile_count / new_count)
            count = new_count
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    # Deviations past ~1e19 overflow the fp32 sums: no normalised value is right, so NaN (as the
    # reference route does), not the bias alone that rstd = 0 would give.
    rstd = tl.where(m2 < float("inf"), rstd, float("nan"))
    if STORE_STATS:
        tl.store(stats_ptr + 2 * pid, mean)
        tl.store(stats_ptr + 2 * pid + 1, rstd)

    # Pass 2: normalise, affine, SiLU, store in the output's dtype.
    for c_start in range(0, channels_per_group, BLOCK_C):
        cs = c_start + c_offsets
        c_mask = cs < channels_per_group
        scale = tl.full((BLOCK_C,), 1.0, tl.float32) * rstd
        shift = tl.zeros((BLOCK_C,), tl.float32)
        if HAS_AFFINE:
            scale *= tl.load(weight_ptr + first_channel + cs, mask=c_mask, other=0.0).to(tl.float32)
            shift += tl.load(bias_ptr + first_channel + cs, mask=c_mask, other=0.0).to(tl.float32)
        for hw_start in range(0, HW, BLOCK_HW):
            hws = hw_start + hw_offsets
            mask = (hws[:, None] < HW) & c_mask[None, :]
            offsets = hws[:, None] * stride_hw + cs[None, :] * stride_c
            tile = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            out = ((tile - pivot) - mean) * scale[None, :] + shift[None, :]
            if APPLY_SILU:
                out = out * tl.sigmoid(out)
            tl.store(y_ptr + offsets, out.to(y_ptr.dtype.element_ty), mask=mask)


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
    C,
    HW,
    channels_per_group,
    num_groups,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    APPLY_SILU: tl.constexpr,
):
    """One program per (sample, group). With x-hat = ((x - pivot) - mean) * rstd recomputed from
    the saved statistics, a = x-hat * w + b and g = dL/da (through SiLU when applied):
    dx = rstd * (w g - mean(w g) - x-hat * mean(w g x-hat)), dw = sum g x-hat, db = sum g.
    Pass 1 accumulates the two group means and the per-channel sums in fp32; pass 2 writes dx."""
    pid = tl.program_id(0)
    sample = pid // num_groups
    first_channel = (pid % num_groups) * channels_per_group
    if CHANNELS_LAST:
        stride_c = 1
        stride_hw = C
    else:
        stride_c = HW
        stride_hw = 1
    base = sample.to(tl.int64) * C * HW + first_channel.to(tl.int64) * stride_c
    x_ptr += base
    dy_ptr += base
    dx_ptr += base
    hw_offsets = tl.arange(0, BLOCK_HW)
    c_offsets = tl.arange(0, BLOCK_C)
    pivot = tl.load(x_ptr).to(tl.float32)
    mean = tl.load(stats_ptr + 2 * pid)
    rstd = tl.load(stats_ptr + 2 * pid + 1)

    # Pass 1: sum(w g) and sum(w g x-hat) over the group; sum(g x-hat) and sum(g) per channel.
    sum_wg = 0.0
    sum_wg_xhat = 0.0
    for c_start in range(0, channels_per_group, BLOCK_C):
        cs = c_start + c_offsets
        c_mask = cs < channels_per_group
        w = tl.full((BLOCK_C,), 1.0, tl.float32)
        b = tl.zeros((BLOCK_C,), tl.float32)
        if HAS_AFFINE:
            w = tl.load(weight_ptr + first_channel + cs, mask=c_mask, other=0.0).to(tl.float32)
            b = tl.load(bias_ptr + first_channel + cs, mask=c_mask, other=0.0).to(tl.float32)
        channel_g_xhat = tl.zeros((BLOCK_C,), tl.float32)
        channel_g = tl.zeros((BLOCK_C,), tl.float32)
        for hw_start in range(0, HW, BLOCK_HW):
            hws = hw_start + hw_offsets
            mask = (hws[:, None] < HW) & c_mask[None, :]
            offsets = hws[:, None] * stride_hw + cs[None, :] * stride_c
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            xhat = ((x - pivot) - mean) * rstd
            if APPLY_SILU:
                a = xhat * w[None, :] + b[None, :]
                sig = tl.sigmoid(a)
                g = g * sig * (1.0 + a * (1.0 - sig))
            g = tl.where(mask, g, 0.0)
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
            partial = sample.to(tl.int64) * C + first_channel + cs
            tl.store(dweight_ptr + partial, channel_g_xhat, mask=c_mask)
            tl.store(dbias_ptr + partial, channel_g, mask=c_mask)
    count = (HW * channels_per_group).to(tl.float32)
    mean_wg = sum_wg / count
    mean_wg_xhat = sum_wg_xhat / count

    # Pass 2: dx, in x's dtype and memory format.
    for c_start in range(0, channels_per_group, BLOCK_C):
        cs = c_start + c_offsets
        c_mask = cs < channels_per_group
        w = tl.full((BLOCK_C,), 1.0, tl.float32)
        b = tl.zeros((BLOCK_C,), tl.float32)
        if HAS_AFFINE:
            w = tl.load(weight_ptr + first_channel + cs, mask=c_mask, other=0.0).to(tl.float32)
            b = tl.load(bias_ptr + first_channel + cs, mask=c_mask, other=0.0).to(tl.float32)
        for hw_start in range(0, HW, BLOCK_HW):
            hws = hw_start + hw_offsets
            mask = (hws[:, None] < HW) & c_mask[None, :]
            offsets = hws[:, None] * stride_hw + cs[None, :] * stride_c
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            xhat = ((x - pivot) - mean) * rstd
            if APPLY_SILU:
                a = xhat * w[None, :] + b[None, :]
                sig = tl.sigmoid(a)
                g = g * sig * (1.0 + a * (1.0 - sig))
            dx = rstd * (g * w[None, :] - mean_wg - xhat * mean_wg_xhat)
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)



def _block_config(channels_per_group: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) for a group with channels_per_group channels."""
    block_c = min(max(triton.next_power_of_2(channels_per_group), MIN_BLOCK_C), MAX_BLOCK_C)
    return block_c, TILE_ELEMENTS // block_c


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    apply_silu: bool,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernel on already-validated arguments; returns y in x's dtype and memory format.
    ``stats``: an (N * num_groups, 2) float32 tensor that receives each group's [mean of
    x - pivot, rstd] (training; see :func:`group_norm_silu_backward`), or None.

    NCHW- and channels_last-contiguous inputs are read in place; any other layout is copied to NCHW
    first (the op layer has already made sliced channels_last inputs channels_last-contiguous). With
    only one of weight/bias given, the other is filled with ones/zeros so one affine switch covers both.
    """
    channels_last = _is_channels_last(x)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=memory_format)
    y = torch.empty_like(x, memory_format=memory_format)
    n, c, h, w = x.shape
    if y.numel() == 0:
        return y
    has_affine = weight is not None or bias is not None
    if has_affine:
        weight = weight.contiguous() if weight is not None else x.new_ones(c)
        bias = bias.contiguous() if bias is not None else x.new_zeros(c)
    else:
        weight = bias = x  # never read: HAS_AFFINE is False
    channels_per_group = c // num_groups
    block_c, block_hw = _block_config(channels_per_group)
    group_norm_silu_kernel[(n * num_groups,)](
        x, y, weight, bias, x if stats is None else stats, c, h * w, channels_per_group, num_groups, eps,
        BLOCK_C=block_c, BLOCK_HW=block_hw, CHANNELS_LAST=channels_last, HAS_AFFINE=has_affine,
        APPLY_SILU=apply_silu, STORE_STATS=stats is not None, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
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
    has_affine = weight is not None or bias is not None
    partial_w = torch.zeros((n, c), dtype=torch.float32, device=x.device)
    partial_b = torch.zeros((n, c), dtype=torch.float32, device=x.device)
    if dx.numel():
        affine_weight = (weight.contiguous() if weight is not None else x.new_ones(c)) if has_affine else x
        affine_bias = (bias.contiguous() if bias is not None else x.new_zeros(c)) if has_affine else x
        channels_per_group = c // num_groups
        block_c, block_hw = _block_config(channels_per_group)
        group_norm_silu_backward_kernel[(n * num_groups,)](
            x, dy, dx, affine_weight, affine_bias, stats, partial_w, partial_b, c, h * w, channels_per_group,
            num_groups, BLOCK_C=block_c, BLOCK_HW=block_hw, CHANNELS_LAST=channels_last, HAS_AFFINE=has_affine,
            APPLY_SILU=apply_silu, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )  # fmt: skip
    dweight = partial_w.sum(0).to(weight.dtype) if weight is not None else None
    dbias = partial_b.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias


def aot_specs():
    """Every configuration the launchers can pick, forward (inference and training, which stores
    the statistics) and backward, for the ahead-of-time compile report.

    Listed for bf16 tensors (the GPU serving dtype); fp16/fp32 change only the load/store width.
    """
    from fastdiff.kernels.aot import AotSpec

    scalars = {"C": "i32", "HW": "i32", "channels_per_group": "i32", "num_groups": "i32"}
    kernels = {
        "group_norm_silu": (group_norm_silu_kernel, ("CHANNELS_LAST", "HAS_AFFINE", "APPLY_SILU", "STORE_STATS"), {
            "x_ptr": "*bf16", "y_ptr": "*bf16", "weight_ptr": "*bf16", "bias_ptr": "*bf16", "stats_ptr": "*fp32",
            **scalars, "eps": "fp32"}),
        "group_norm_silu_backward": (group_norm_silu_backward_kernel, ("CHANNELS_LAST", "HAS_AFFINE", "APPLY_SILU"), {
            "x_ptr": "*bf16", "dy_ptr": "*bf16", "dx_ptr": "*bf16", "weight_ptr": "*bf16", "bias_ptr": "*bf16",
            "stats_ptr": "*fp32", "dweight_ptr": "*fp32", "dbias_ptr": "*fp32", **scalars}),
    }  # fmt: skip
    specs = []
    for prefix, (fn, switches, signature) in kernels.items():
        block_c = MIN_BLOCK_C
        while block_c <= MAX_BLOCK_C:
            for values in itertools.product((False, True), repeat=len(switches)):
                constexprs = {"BLOCK_C": block_c, "BLOCK_HW": TILE_ELEMENTS // block_c, **dict(zip(switches, values))}
                flags = "".join(f"_{name.lower()}" for name, on in zip(switches, values) if on)
                specs.append(
                    AotSpec(
                        name=f"{prefix}_c{block_c}{flags}",
                        fn=fn,
                        signature={**signature, **{name: "constexpr" for name in constexprs}},
                        constexprs=constexprs,
                        num_warps=NUM_WARPS,
                        num_stages=NUM_STAGES,
                    )
                )
            block_c *= 2
    return specs
