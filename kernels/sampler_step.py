"""The fused sampler step: x0 prediction, optional clamp, posterior mean and noise in one pass.

One update of the :class:`fastdiff.schedulers.StepTable` form::

    x0     = c0 * x_t - c1 * eps            (clamped to [-clip, clip] when CLIP)
    y      = x_t, or with CORRECTOR: u0 * x_t + u1 * x0 + sum_k u[2 + k] * h[k]   (u = c[6 + K:])
    x_prev = c2 * x0 + c3 * y + c4 * eps + c5 * z + sum_k c[6 + k] * h[k]      (k < K = HISTORY)
    h      = (x0, h[0], ...), or with CORRECTOR (x0, h[0], ..., h[K - 3], y)  (written back in place)

HISTORY (0-4, a constexpr) is the number of history slots a multistep solver reads: previous
data predictions (DPM-Solver++), and with CORRECTOR (a predictor-corrector solver, UniPC) the
previous corrected sample in the last slot; rows are 6 + K wide, 8 + 2K with CORRECTOR. Each
thread reads its elements of h[0..K) before writing them, so the in-place update needs no
other synchronisation.

The step index is read from device memory and the coefficient row is loaded in-kernel, so a
CUDA graph replays every step by updating one int64 on the device. z is a given tensor, Philox
noise drawn in-kernel, or nothing (a constexpr switch on one kernel). Each input element is read
once and each output written once; the math is fp32, cast to x_t's dtype on store.

The grid is (blocks within a sample, sample), so the sample index is a program id and Philox
noise keyed by (element in sample, sample, offset, step) is the same for sample i alone or in
any batch. A third rng word adds a base to the sample word, so a batch holding images
base .. base + B - 1 of a larger set draws each image's noise by its global index
(:mod:`fastdiff.scale.shards`).

An out-of-range step index is not clamped: the coefficient loads are masked and read NaN, so
every output is NaN (and ``tl.device_assert`` fires when Triton runs in debug mode). The op
checks the index on the host only for CPU tensors; on CUDA that check would sync, so the
sampler is responsible for building indices in [0, S).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastdiff.kernels.philox import philox_normal, sample_block

NOISE_MODES = ("none", "given", "philox")
#: Elements per program and warps: 8 elements per thread, enough bytes in flight per SM for a
#: bandwidth-bound kernel while tiny samples waste at most one block.
BLOCK = 1024
NUM_WARPS = 4
NUM_STAGES = 1  # no loop to pipeline
#: CUDA caps grid axis 1 (the sample axis here) at 65535.
MAX_SAMPLES = 65535


@triton.jit
def sampler_step_kernel(
    x_ptr,  # (B, N) x_t, contiguous, any float dtype; each element read once into registers
    eps_ptr,  # (B, N) model output eps, contiguous, any float dtype
    noise_ptr,  # (B, N) given z when NOISE == "given"; unused otherwise
    rng_ptr,  # (2,) int64 [seed, offset], or (3,) [seed, offset, first sample] with SAMPLE_BASE, when NOISE == "philox"
    step_ptr,  # (1,) integer step index, read by every program
    coefs_ptr,  # (S, 6 + K) or (S, 8 + 2K) float32 table; one row of scalars per program, kept in registers
    x_prev_ptr,  # (B, N) output x_{t-1}, x_t's dtype
    x0_ptr,  # (B, N) output x0 prediction (after the clamp), x_t's dtype; unused unless WRITE_X0
    history_ptr,  # (HISTORY, B, N) previous x0 predictions, newest first (+ the corrected sample), updated in place
    n_per_sample,
    history_stride,  # B * N: elements between history entries
    num_steps,
    clip_range,
    BLOCK: tl.constexpr,
    NOISE: tl.constexpr,
    CLIP: tl.constexpr,
    WRITE_X0: tl.constexpr,
    SAMPLE_BASE: tl.constexpr,  # the noise key's sample word is rng[2] + the sample's index in the batch
    HISTORY: tl.constexpr,
    CORRECTOR: tl.constexpr,  # predictor-corrector rows (8 + 2K wide); the last history slot holds y
):
    sample, element, mask, offsets = sample_block(n_per_sample, BLOCK)

    step = tl.load(step_ptr)
    step_ok = (step >= 0) & (step < num_steps)
    tl.device_assert(step_ok, "step_index out of range")
    row = coefs_ptr + step * (6 + HISTORY + CORRECTOR * (2 + HISTORY))
    c0 = tl.load(row + 0, mask=step_ok, other=float("nan"))
    c1 = tl.load(row + 1, mask=step_ok, other=float("nan"))
    c2 = tl.load(row + 2, mask=step_ok, other=float("nan"))
    c3 = tl.load(row + 3, mask=step_ok, other=float("nan"))
    c4 = tl.load(row + 4, mask=step_ok, other=float("nan"))
    c5 = tl.load(row + 5, mask=step_ok, other=float("nan"))

    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(eps_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    x0 = c0 * x - c1 * eps
    if CLIP:
        x0 = tl.clamp(x0, -clip_range, clip_range, propagate_nan=tl.PropagateNan.ALL)
    y = x
    if CORRECTOR:
        y = tl.load(row + 6 + HISTORY, mask=step_ok, other=float("nan")) * x
        y += tl.load(row + 7 + HISTORY, mask=step_ok, other=float("nan")) * x0
    past = tl.zeros_like(x)  # the history's part of x_prev
    newer = x0  # what the slot being read moves down to
    for k in tl.static_range(HISTORY):
        h_ptr = history_ptr + k * history_stride + offsets
        h = tl.load(h_ptr, mask=mask, other=0.0).to(tl.float32)
        past += tl.load(row + 6 + k, mask=step_ok, other=float("nan")) * h
        if CORRECTOR:
            y += tl.load(row + 8 + HISTORY + k, mask=step_ok, other=float("nan")) * h
        if k < HISTORY - CORRECTOR:  # a data slot: shifted down; the corrector's sample slot takes y below
            tl.store(h_ptr, newer.to(history_ptr.dtype.element_ty), mask=mask)
            newer = h
    x_prev = c2 * x0 + c3 * y + c4 * eps
    if NOISE == "given":
        z = tl.load(noise_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x_prev += c5 * z
    elif NOISE == "philox":
        seed = tl.load(rng_ptr)
        offset = tl.load(rng_ptr + 1)
        key_sample = sample + tl.load(rng_ptr + 2) if SAMPLE_BASE else sample
        x_prev += c5 * philox_normal(seed, element, key_sample, offset, step)
    if HISTORY > 0:
        x_prev += past
    if CORRECTOR:
        tl.store(history_ptr + (HISTORY - 1) * history_stride + offsets, y.to(history_ptr.dtype.element_ty), mask=mask)

    tl.store(x_prev_ptr + offsets, x_prev.to(x_prev_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + offsets, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def noise_mode(noise: torch.Tensor | None, rng: torch.Tensor | None) -> str:
    """A given noise tensor wins over rng, as in the reference; neither means no noise."""
    if noise is not None:
        return "given"
    return "philox" if rng is not None else "none"


def sampler_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    step_index: torch.Tensor,
    coefs: torch.Tensor,
    noise: torch.Tensor | None = None,
    rng: torch.Tensor | None = None,
    clip_range: float | None = None,
    history: torch.Tensor | None = None,
    *,
    write_x0: bool = True,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch on already-validated arguments; returns (x_prev, x0), x0 None unless write_x0.

    Outputs are contiguous in x_t's dtype; non-contiguous inputs are copied contiguous first
    (except ``history``, (K, *x_t.shape), contiguous, which is updated in place).
    ``block`` (a power of two) exists for tests: large blocks cut the interpreter's program count.
    """
    batch = x_t.shape[0]
    if batch > MAX_SAMPLES:
        raise ValueError(f"x_t has {batch} samples; the kernel's grid takes at most {MAX_SAMPLES}")
    x_prev = torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device)
    x0 = torch.empty_like(x_prev) if write_x0 else None
    if x_prev.numel() == 0:
        return x_prev, x0
    mode = noise_mode(noise, rng)
    slots = 0 if history is None else history.shape[0]
    x_t = x_t.contiguous()
    n_per_sample = x_t.numel() // batch
    grid = (triton.cdiv(n_per_sample, block), batch)
    sampler_step_kernel[grid](
        x_t, eps.contiguous(),
        noise.contiguous() if mode == "given" else x_t,  # never read unless given
        rng if mode == "philox" else step_index,  # never read unless philox
        step_index, coefs.contiguous(), x_prev, x0 if write_x0 else x_prev,
        history if history is not None else x_prev,  # never touched unless HISTORY > 0
        n_per_sample, x_t.numel(), coefs.shape[0], 0.0 if clip_range is None else float(clip_range),
        BLOCK=block, NOISE=mode, CLIP=clip_range is not None, WRITE_X0=write_x0,
        SAMPLE_BASE=mode == "philox" and rng.numel() == 3,
        HISTORY=slots, CORRECTOR=slots > 0 and coefs.shape[1] == 8 + 2 * slots,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return x_prev, x0


#: The launch the report compiles each config at: a batch of 256 CIFAR-10 images (3 x 32 x 32) and
#: a 50-step table, so ints carry the JIT's specialisation of that launch.
AOT_BATCH, AOT_VALUES_PER_SAMPLE, AOT_STEPS = 256, 3 * 32 * 32, 50


def aot_specs():
    """The configs the launcher picks: each dtype (x_t, eps and noise alike) x noise mode x
    clamp, writing x0 as the op does; plus an fp32 sample with a bf16 model output (autocast
    sampling) and an x0-less Philox step; and the multistep (DPM-Solver++) steps the sampler
    runs: fp32 x_t and history, fp32 or bf16 model output, 1 or 2 history entries, no noise
    (ODE form) or noise (SDE form); and the predictor-corrector (UniPC) steps: 2-4 history slots, no
    noise. Other dtype mixes compile the same code. Each is compiled
    with the specialisation Triton's JIT gives the launch above (fastdiff.kernels.aot.launch_spec)."""
    # triton's compiler: only the AOT report needs it
    from fastdiff.kernels.aot import launch_spec
    from triton.runtime.jit import MockTensor

    ptr = {name: MockTensor(dtype) for name, dtype in
           (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16), ("i64", torch.int64))}

    def spec(dtype: str, mode: str, clip: bool, write_x0: bool = True, eps_dtype: str | None = None,
             sample_base: bool = False, history: int = 0, corrector: bool = False):
        eps_dtype = eps_dtype or dtype
        args = dict(
            x_ptr=ptr[dtype], eps_ptr=ptr[eps_dtype], noise_ptr=ptr[dtype], rng_ptr=ptr["i64"], step_ptr=ptr["i64"],
            coefs_ptr=ptr["fp32"], x_prev_ptr=ptr[dtype], x0_ptr=ptr[dtype], history_ptr=ptr[dtype],
            n_per_sample=AOT_VALUES_PER_SAMPLE, history_stride=AOT_BATCH * AOT_VALUES_PER_SAMPLE,
            num_steps=AOT_STEPS, clip_range=1.0, BLOCK=BLOCK, NOISE=mode, CLIP=clip, WRITE_X0=write_x0,
            SAMPLE_BASE=sample_base, HISTORY=history, CORRECTOR=corrector,
        )
        name = f"sampler_step_{dtype}" + (f"_eps_{eps_dtype}" if eps_dtype != dtype else "") + f"_{mode}"
        name += ("_clip" if clip else "") + ("" if write_x0 else "_no_x0") + ("_sample_base" if sample_base else "")
        name += (f"_history{history}" if history else "") + ("_corrector" if corrector else "")
        return launch_spec(name, sampler_step_kernel, args, NUM_WARPS, NUM_STAGES)

    specs = [
        spec(dtype, mode, clip) for dtype in ("fp32", "bf16", "fp16") for mode in NOISE_MODES for clip in (False, True)
    ]
    specs.append(spec("fp32", "philox", clip=True, eps_dtype="bf16"))
    specs.append(spec("fp32", "philox", clip=True, write_x0=False))
    specs.append(spec("fp32", "philox", clip=False, sample_base=True))  # shards keyed by global image index
    specs += [
        spec("fp32", mode, clip=False, eps_dtype=eps_dtype, history=history)
        for history in (1, 2) for mode in NOISE_MODES for eps_dtype in ("fp32", "bf16")
    ]
    specs += [  # UniPC of order 1-3: as many data slots plus the corrected sample's
        spec("fp32", "none", clip=False, eps_dtype=eps_dtype, history=history, corrector=True)
        for history in (2, 3, 4) for eps_dtype in ("fp32", "bf16")
    ]
    return specs
