"""The fused forward-diffusion sample for training: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.

Each sample has its own timestep t[i]; its two coefficients come from the (T, 2) table
``NoiseSchedule.q_sample_table()`` loaded in-kernel, so nothing is gathered on the host. eps is
either given or drawn in-kernel from Philox keyed by (element in sample, sample, offset low
word, offset high word) with key = seed, and is written out for the loss. Drawn noise is
rounded to x0's dtype before use, so the returned eps is exactly the eps x_t was built from.

The grid is (blocks within a sample, sample), as in the sampler step. An out-of-range t[i] is
not clamped: that sample's coefficient loads are masked and read NaN, so its x_t is NaN (and
``tl.device_assert`` fires in Triton debug mode); the op checks t on the host for CPU tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastdiff.kernels.philox import philox_normal, sample_block

NOISE_MODES = ("given", "philox")
BLOCK = 1024
NUM_WARPS = 4
NUM_STAGES = 1
MAX_SAMPLES = 65535  # CUDA's limit on grid axis 1, the sample axis


@triton.jit
def q_sample_kernel(
    x0_ptr,  # (B, N) clean samples, contiguous, any float dtype; each element read once
    t_ptr,  # (B,) integer timesteps; one read per program
    coefs_ptr,  # (T, 2) float32 [sqrt(abar), sqrt(1 - abar)]; one row per program, in registers
    noise_ptr,  # (B, N) given eps when NOISE == "given"; unused otherwise
    rng_ptr,  # (2,) int64 [seed, offset] when NOISE == "philox"; unused otherwise
    x_t_ptr,  # (B, N) output x_t, x0's dtype
    eps_ptr,  # (B, N) output eps: the given noise (in its dtype) or the drawn one (x0's dtype)
    n_per_sample,
    num_timesteps,
    BLOCK: tl.constexpr,
    NOISE: tl.constexpr,
):
    sample, element, mask, offsets = sample_block(n_per_sample, BLOCK)

    t = tl.load(t_ptr + sample)
    t_ok = (t >= 0) & (t < num_timesteps)
    tl.device_assert(t_ok, "t out of range")
    signal = tl.load(coefs_ptr + t * 2, mask=t_ok, other=float("nan"))
    noise_scale = tl.load(coefs_ptr + t * 2 + 1, mask=t_ok, other=float("nan"))

    x0 = tl.load(x0_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if NOISE == "given":
        eps = tl.load(noise_ptr + offsets, mask=mask, other=0.0)
    else:
        seed = tl.load(rng_ptr)
        offset = tl.load(rng_ptr + 1)
        eps = philox_normal(seed, element, sample, offset, offset >> 32).to(eps_ptr.dtype.element_ty)
    x_t = signal * x0 + noise_scale * eps.to(tl.float32)

    tl.store(x_t_ptr + offsets, x_t.to(x_t_ptr.dtype.element_ty), mask=mask)
    tl.store(eps_ptr + offsets, eps.to(eps_ptr.dtype.element_ty), mask=mask)


def q_sample(
    x0: torch.Tensor,
    t: torch.Tensor,
    coefs: torch.Tensor,
    noise: torch.Tensor | None = None,
    rng: torch.Tensor | None = None,
    *,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch on already-validated arguments (noise or rng given; noise wins); returns (x_t, eps).

    x_t is contiguous in x0's dtype; eps is a new contiguous tensor, in the given noise's dtype
    or x0's. ``block`` (a power of two) exists for tests: large blocks cut the interpreter's cost.
    """
    batch = x0.shape[0]
    if batch > MAX_SAMPLES:
        raise ValueError(f"x0 has {batch} samples; the kernel's grid takes at most {MAX_SAMPLES}")
    mode = "given" if noise is not None else "philox"
    x_t = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    eps = torch.empty(x0.shape, dtype=noise.dtype if mode == "given" else x0.dtype, device=x0.device)
    if x_t.numel() == 0:
        return x_t, eps
    x0 = x0.contiguous()
    n_per_sample = x0.numel() // batch
    grid = (triton.cdiv(n_per_sample, block), batch)
    q_sample_kernel[grid](
        x0, t.contiguous(), coefs.contiguous(),
        noise.contiguous() if mode == "given" else x0,  # never read unless given
        rng if mode == "philox" else t,  # never read unless philox
        x_t, eps, n_per_sample, coefs.shape[0],
        BLOCK=block, NOISE=mode, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return x_t, eps


#: The launch the report compiles each config at: CIFAR-10 images (3 x 32 x 32 values per
#: sample) and a 1000-step schedule table, so ints carry the JIT's specialisation of that launch.
AOT_VALUES_PER_SAMPLE, AOT_TIMESTEPS = 3 * 32 * 32, 1000


def aot_specs():
    """Every config the launcher picks for same-dtype x0 and noise: dtype x noise mode, each with
    the specialisation Triton's JIT gives the launch above (fastdiff.kernels.aot.launch_spec)."""
    # triton's compiler: only the AOT report needs it
    from fastdiff.kernels.aot import launch_spec
    from triton.runtime.jit import MockTensor

    ptr = {name: MockTensor(dtype) for name, dtype in
           (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16), ("i64", torch.int64))}
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        for mode in NOISE_MODES:
            args = dict(x0_ptr=ptr[dtype], t_ptr=ptr["i64"], coefs_ptr=ptr["fp32"], noise_ptr=ptr[dtype],
                        rng_ptr=ptr["i64"], x_t_ptr=ptr[dtype], eps_ptr=ptr[dtype],
                        n_per_sample=AOT_VALUES_PER_SAMPLE, num_timesteps=AOT_TIMESTEPS, BLOCK=BLOCK, NOISE=mode)
            specs.append(launch_spec(f"q_sample_{dtype}_{mode}", q_sample_kernel, args, NUM_WARPS, NUM_STAGES))
    return specs
