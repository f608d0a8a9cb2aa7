"""Eager PyTorch ground truth for every fastdiff op, in the order and with the signatures of
``fastdiff.ops``. Kernel tests compare against these (in fp32/fp64 on CPU), and on CPU the
ops run them.

The Philox generator here reproduces Triton's ``tl.randn`` stream (Philox4x32-10, the same
uniform mapping and Box-Muller), so a CPU run and a GPU run with in-kernel noise draw the
same z up to float rounding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- GroupNorm (+ SiLU)


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float = 1e-5,
    apply_silu: bool = True,
) -> torch.Tensor:
    """GroupNorm over (C/G, H, W) per (n, group), optional affine, then optional SiLU.

    Statistics are fp32: a group whose sum of squared deviations overflows fp32 (|x - mean| from
    about 1e19) has no meaningful normalised value and comes out NaN, as on the kernel route
    (PyTorch's CPU kernel would return the bias there, a silently wrong constant).
    """
    y = F.group_norm(x, num_groups, weight, bias, eps)
    y = _overflowed_groups_to_nan(x, y, num_groups)
    return F.silu(y) if apply_silu else y


def _overflowed_groups_to_nan(x: torch.Tensor, y: torch.Tensor, num_groups: int) -> torch.Tensor:
    if x.numel() == 0:
        return y
    n, channels = x.shape[:2]
    groups = x.float().reshape(n, num_groups, -1)
    m2 = groups.var(-1, correction=0) * groups.shape[-1]
    overflowed = m2 == float("inf")
    per_channel = overflowed[:, :, None].expand(n, num_groups, channels // num_groups).reshape(n, channels)
    return y.masked_fill(per_channel.reshape(n, channels, *([1] * (x.dim() - 2))), float("nan"))


# ---------------------------------------------------------------- attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over the last two dims; q, k, v: (B, heads, N, D).

    NaN propagates as the formula says: a query row holding NaN gives a NaN output row (PyTorch's
    CPU SDPA kernel returns zeros for it; the math and the Triton kernel give NaN).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return nan_query_rows(F.scaled_dot_product_attention(q, k, v, scale=scale), q)


def nan_query_rows(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``out`` with every row whose query holds a NaN set to NaN, as the formula says (an SDPA
    backend may return zeros or an unnormalised row there)."""
    return out.masked_fill(torch.isnan(q).any(-1, keepdim=True), float("nan"))


# ---------------------------------------------------------------- Philox noise

_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _umulhi32(a: int, b: torch.Tensor) -> torch.Tensor:
    # b < 2^32 and a < 2^32: the product can exceed int64, so split a into 16-bit halves.
    a_hi, a_lo = a >> 16, a & 0xFFFF
    lo = b * a_lo
    hi = b * a_hi + (lo >> 16)
    return hi >> 16


def philox4x32(seed: int | torch.Tensor, c0, c1, c2, c3, rounds: int = 10):
    """Philox4x32 (Salmon et al. 2011) on int64 tensors holding uint32 words, as Triton runs it."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0, c1, c2, c3 = (torch.as_tensor(c).to(torch.int64) & _MASK32 for c in (c0, c1, c2, c3))
    for _ in range(rounds):
        new_c0 = _umulhi32(_PHILOX_ROUND_B, c2) ^ c1 ^ k0
        new_c2 = _umulhi32(_PHILOX_ROUND_A, c0) ^ c3 ^ k1
        c1 = (c2 * _PHILOX_ROUND_B) & _MASK32
        c3 = (c0 * _PHILOX_ROUND_A) & _MASK32
        c0, c2 = new_c0, new_c2
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    signed = torch.where(x >= 2**31, x - 2**32, x)  # bitcast to int32
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * 4.6566127342e-10


def philox_normal(seed: int, c0, c1, c2, c3) -> torch.Tensor:
    """Standard normals from Philox counters: Triton's ``randn`` with explicit counter words."""
    r0, r1, _, _ = philox4x32(seed, c0, c1, c2, c3)
    u1 = _uint32_to_uniform(r0).clamp(min=1e-7)
    u2 = _uint32_to_uniform(r1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)


def philox_noise_like(x: torch.Tensor, seed: int, word2: int, word3: int, first_sample: int = 0) -> torch.Tensor:
    """Noise keyed by (element within its sample, sample index, word2, word3), shaped like x.

    Keying on the sample index (not the flat index) makes sample i's noise the same alone
    and in any batch. x[j] is sample ``first_sample + j``: a slice of a larger set keyed by
    global index (:mod:`fastdiff.scale.shards`).
    """
    n = x.shape[0]
    per_sample = x[0].numel() if n else 0
    element = torch.arange(per_sample, dtype=torch.int64).expand(n, per_sample)
    sample = torch.arange(first_sample, first_sample + n, dtype=torch.int64).unsqueeze(1).expand(n, per_sample)
    z = philox_normal(seed, element, sample, word2, word3)
    return z.reshape(x.shape).to(device=x.device)


def split_rng(rng: torch.Tensor) -> tuple[int, int]:
    """rng = int64 tensor [seed, offset] -> python ints (seed, offset)."""
    seed, offset = (int(v) for v in rng.tolist())
    return seed, offset


# ---------------------------------------------------------------- sampler step


def sampler_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    step_index: torch.Tensor,
    coefs: torch.Tensor,
    noise: torch.Tensor | None = None,
    rng: torch.Tensor | None = None,
    clip_range: float | None = None,
    history: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One update of :class:`fastdiff.schedulers.StepTable` form; returns (x_prev, x0).

    Noise: ``noise`` if given; else Philox keyed by (element, sample, rng offset, step index)
    if ``rng`` (int64 [seed, offset], or [seed, offset, first sample] where samples are
    numbered from rng[2]) is given; else none. Math in fp32 (fp64 for fp64 x_t: the verify
    command's float64 truth; ``compute_dtype`` chooses it: float64 for the ODE reference solution,
    :mod:`fastdiff.bench.ode_error`), cast on return.
    ``history`` (K, *x_t.shape), multistep tables: adds sum_k coefs[6 + k] * history[k]. With K
    data slots (coefs 6 + K wide) it is shifted in place so that history[0] = x0. With the
    corrector (coefs 8 + 2K wide) the step reads y = u . (x_t, x0, history) for x_t, the last slot
    takes y and the K - 1 others shift (see :mod:`fastdiff.schedulers.schedules`).
    """
    compute = compute_dtype or (torch.float64 if x_t.dtype == torch.float64 else torch.float32)
    # index_select (not coefs[step_index]): a 0-dim index tensor would be read on the host.
    c = coefs.index_select(0, step_index.long().reshape(1))[0].to(compute)
    x, e = x_t.to(compute), eps.to(compute)
    x0 = c[0] * x - c[1] * e
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    slots = 0 if history is None else history.shape[0]
    corrector = slots > 0 and c.shape[0] == 8 + 2 * slots
    y = c[6 + slots] * x + c[7 + slots] * x0 if corrector else x
    past = torch.zeros_like(x)  # the history's part of x_prev
    for k in range(slots):
        h = history[k].to(compute)
        past = past + c[6 + k] * h
        if corrector:
            y = y + c[8 + slots + k] * h
    out = c[2] * x0 + c[3] * y + c[4] * e
    if noise is not None:
        out = out + c[5] * noise.to(compute)
    elif rng is not None:
        seed, offset = split_rng(rng[:2])
        first_sample = int(rng[2]) if rng.numel() == 3 else 0
        out = out + c[5] * philox_noise_like(x, seed, offset, int(step_index), first_sample).to(compute)
    if slots:
        out = out + past
        data_slots = slots - corrector
        history[1:data_slots].copy_(history[:data_slots - 1].clone())
        history[0].copy_(x0)
        if corrector:
            history[-1].copy_(y)
    return out.to(x_t.dtype), x0.to(x_t.dtype)


# ---------------------------------------------------------------- q-sample


def q_sample(
    x0: torch.Tensor,
    t: torch.Tensor,
    coefs: torch.Tensor,
    noise: torch.Tensor | None = None,
    rng: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with a per-sample t; returns (x_t, eps).

    ``coefs`` is :meth:`NoiseSchedule.q_sample_table`, (T, 2). eps is ``noise`` if given,
    else Philox keyed by (element, sample, offset low word, offset high word) from ``rng``.
    """
    if noise is None:
        if rng is None:
            raise ValueError("q_sample needs noise or rng")
        seed, offset = split_rng(rng)
        noise = philox_noise_like(x0, seed, offset & 0xFFFFFFFF, offset >> 32).to(x0.dtype)
    c = coefs[t.long()].to(torch.float32).reshape(-1, 2, *([1] * (x0.dim() - 1)))
    x_t = c[:, 0] * x0.to(torch.float32) + c[:, 1] * noise.to(torch.float32)
    return x_t.to(x0.dtype), noise
