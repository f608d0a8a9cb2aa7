"""Flash-style self-attention forward: softmax(q k^T * scale) v without materialising N x N.

One Triton program per (BLOCK_M query rows, batch x head), on a flat grid. The program keeps its q tile
([BLOCK_M, BLOCK_D]), the fp32 output accumulator and the running row max m / row sum l on
chip, and streams k and v in [BLOCK_N, BLOCK_D] tiles (online softmax: each new tile rescales
acc and l by exp(m_old - m_new)). Head dims that are not a power of two (48, 96, 192, ...) are
padded to the next one with masked loads (zeros add nothing to q k^T or p v).

fp32 inputs use ``input_precision="ieee"`` in both dots, so a GPU computes them in exact fp32 like
the interpreter does, not in TF32 (which would drop 13 mantissa bits). fp16/bf16 inputs run on the
tensor cores with fp32 accumulation; p is rounded to the input dtype for the p v product, as in
FlashAttention.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from fastdiff.kernels.layouts import output_like

LOG2_E = 1.4426950408889634
MIN_BLOCK_D = 16  # tl.dot needs every dimension >= 16


class AttentionConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (padded head dim, fp32 inputs?) -> tiles. Every entry fits the shared memory of sm_80 (166,912 B)
# and sm_90 (232,448 B); `python -m fastdiff.kernels.report --kernel attention` recompiles them all
# with the JIT's specialisation of the UNet's launch (triton 3.9: shared bytes sm_80 / sm_90 in the
# comments; compiled without that specialisation, the 16-bit tiles showed up to 2.5x less shared
# memory: the old figures were not what runs). fp32 tiles are smaller: ieee dots run on the FMA
# units and hold twice the bytes per element on chip.
CONFIGS = {
    (16, False): AttentionConfig(64, 64, 4, 2),  # 6,144 / 10,240
    (32, False): AttentionConfig(64, 64, 4, 2),  # 12,288 / 20,480
    (64, False): AttentionConfig(64, 64, 4, 2),  # 24,576 / 40,960
    (128, False): AttentionConfig(64, 32, 4, 2),  # 36,864 / 49,152
    (256, False): AttentionConfig(64, 32, 8, 2),  # 69,632 / 98,304
    (512, False): AttentionConfig(32, 16, 8, 2),  # 66,560 / 66,560; sm_90 spills 8 B (32x32 tiles spill on sm_80)
    (16, True): AttentionConfig(32, 32, 4, 2),  # 10,368 / 10,368
    (32, True): AttentionConfig(32, 32, 4, 2),  # 16,384 / 16,384
    (64, True): AttentionConfig(32, 32, 4, 2),  # 28,800 / 28,800
    (128, True): AttentionConfig(32, 32, 8, 2),  # 53,248 / 53,248
    (256, True): AttentionConfig(32, 16, 8, 2),  # 67,712 / 67,712 (64x64 tiles: 213,504 / 327,680)
    (512, True): AttentionConfig(16, 16, 8, 2),  # 99,392 / 99,392
}


@triton.jit
def attention_kernel(
    q_ptr,  # (B, heads, N_q, D), last dim contiguous; one [BLOCK_M, BLOCK_D] tile stays on chip
    k_ptr,  # (B, heads, N_kv, D), last dim contiguous; streamed in [BLOCK_N, BLOCK_D] tiles
    v_ptr,  # (B, heads, N_kv, D), like k_ptr
    o_ptr,  # (B, heads, N_q, D) output in q's dtype, last dim contiguous; written once per tile
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_on,
    num_heads,
    n_q,
    n_kv,
    head_dim,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2 (exp2)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BF16_DOT_IN_FP32: tl.constexpr,  # only under the interpreter, whose tl.dot cannot read bf16
):
    # One flat grid, query blocks fastest: the programs that run together share a head's k and v
    # in L2, and batch x heads is not capped by the 65,535 limit of grid axes 1 and 2.
    num_m_blocks = tl.cdiv(n_q, BLOCK_M)
    batch_head = tl.program_id(0) // num_m_blocks
    pid_m = tl.program_id(0) % num_m_blocks
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    q_ptr += batch * stride_qb + head * stride_qh
    k_ptr += batch * stride_kb + head * stride_kh
    v_ptr += batch * stride_vb + head * stride_vh
    o_ptr += batch * stride_ob + head * stride_oh

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_mask = rows < n_q
    dim_mask = dims < head_dim
    q_mask = row_mask[:, None] & dim_mask[None, :]
    q = tl.load(q_ptr + rows[:, None] * stride_qn + dims[None, :], mask=q_mask, other=0.0)
    if BF16_DOT_IN_FP32:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for kv_start in range(0, n_kv, BLOCK_N):
        kv_rows = kv_start + tl.arange(0, BLOCK_N)
        kv_mask = kv_rows < n_kv
        tile_mask = kv_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_ptr + kv_rows[:, None] * stride_kn + dims[None, :], mask=tile_mask, other=0.0)
        if BF16_DOT_IN_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        # Every key tile holds at least one real key, so m_new is finite for finite inputs.
        s = tl.where(kv_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_rows[:, None] * stride_vn + dims[None, :], mask=tile_mask, other=0.0)
        p = p.to(v.dtype)  # rounded like the tensor-core operand it is on a GPU
        if BF16_DOT_IN_FP32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(o_ptr + rows[:, None] * stride_on + dims[None, :], out.to(o_ptr.dtype.element_ty), mask=q_mask)


def padded_head_dim(head_dim: int) -> int:
    return max(MIN_BLOCK_D, triton.next_power_of_2(head_dim))


def pick_config(head_dim: int, dtype: torch.dtype) -> tuple[int, AttentionConfig]:
    """(BLOCK_D, tiles) for a head dim and input dtype."""
    block_d = padded_head_dim(head_dim)
    return block_d, CONFIGS[(block_d, dtype == torch.float32)]


def kernel_args(q, k, v, out, scale: float, pointers=None) -> tuple[tuple[int], dict]:
    """(grid, every kernel argument by name) for validated (B, heads, N, D) tensors with a
    contiguous last dim; ``pointers`` (q, k, v, out stand-ins) replace the tensors' own for the
    ahead-of-time report, which passes meta tensors for their shapes and strides."""
    batch, heads, n_q, head_dim = q.shape
    block_d, cfg = pick_config(head_dim, q.dtype)
    q_ptr, k_ptr, v_ptr, o_ptr = pointers or (q, k, v, out)
    args = dict(
        q_ptr=q_ptr, k_ptr=k_ptr, v_ptr=v_ptr, o_ptr=o_ptr,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_on=out.stride(2),
        num_heads=heads, n_q=n_q, n_kv=k.shape[2], head_dim=head_dim, qk_scale=scale * LOG2_E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        # CPU tensors reach a kernel only through Triton's interpreter, which multiplies the raw
        # bits of bf16 dot operands (triton-lang/triton#11584); exact bf16 products fit fp32.
        BF16_DOT_IN_FP32=q.device.type == "cpu" and q.dtype == torch.bfloat16,
    )
    return (triton.cdiv(n_q, cfg.block_m) * batch * heads,), args


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Launch on validated (B, heads, N, D) tensors; returns the (B, heads, N_q, D) output laid
    out as :func:`fastdiff.kernels.layouts.output_like` says. Strided q/k/v are read in place when their last dim is contiguous."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = output_like(q)  # the layout rule the op's fake function shares
    if out.numel() == 0:
        return out
    if k.shape[2] == 0:  # no keys: SDPA returns zeros
        return out.zero_()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    grid, args = kernel_args(q, k, v, out, scale)
    cfg = pick_config(q.shape[-1], q.dtype)[1]
    attention_kernel[grid](**args, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


#: (B, heads, N, D) views the report compiles each config at: one head of D = BLOCK_D over a 16x16
#: map (N = 256) sliced out of a channels_last qkv convolution, as the Sampler runs the UNet on CUDA
#: (fastdiff.models.unet's attention reshape), so the strides and the one head are the JIT's real ones.
AOT_BATCH, AOT_POSITIONS = 64, 256


def _aot_views(head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    qkv = torch.empty(AOT_BATCH, 3 * head_dim, 16, 16, dtype=dtype, device="meta")
    qkv = qkv.to(memory_format=torch.channels_last)
    q, k, v = qkv.reshape(AOT_BATCH, 3, 1, head_dim, AOT_POSITIONS).transpose(-1, -2).unbind(1)
    return q, k, v, output_like(q)


def aot_specs():
    """Every configuration the launcher can pick, for the ahead-of-time compile report, each with
    the specialisation Triton's JIT gives the launch above (fastdiff.kernels.aot.launch_spec).
    The 16-bit tiles are listed for bf16: fp16 compiles to the same shared memory and registers."""
    # triton's compiler: only the AOT report needs it
    from fastdiff.kernels.aot import launch_spec
    from triton.runtime.jit import MockTensor

    specs = []
    for (block_d, is_fp32), cfg in CONFIGS.items():
        dtype = torch.float32 if is_fp32 else torch.bfloat16
        views = _aot_views(block_d, dtype)
        _, args = kernel_args(*views, 1.0 / math.sqrt(block_d), pointers=[MockTensor(dtype)] * 4)
        name = f"attention_{'fp32' if is_fp32 else 'bf16'}_d{block_d}_m{cfg.block_m}_n{cfg.block_n}"
        specs.append(launch_spec(name, attention_kernel, args, cfg.num_warps, cfg.num_stages))
    return specs
