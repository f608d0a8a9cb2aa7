"""In-kernel standard normals from explicit Philox counters, and the per-sample grid layout that
keys them, shared by the noise-drawing kernels.

``philox_normal(seed, c0, c1, c2, c3)`` is ``fastdiff.ops.reference.philox_normal`` in Triton: the
four 32-bit counter words go through Philox4x32-10 keyed by the 64-bit seed, the first two
outputs become uniforms and one Box-Muller cosine gives z. This is ``tl.randn`` with all four
counter words under the caller's control, so noise can be keyed by (element, sample, ...)
instead of a flat offset, and a second word keeps long runs from overflowing 32 bits.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def philox_normal(seed, c0, c1, c2, c3):
    """Standard normals shaped like ``c0`` (a block); c1..c3 may be scalars. Counter words of any
    integer type are reduced modulo 2^32, as the reference does."""
    c0 = c0.to(tl.uint32)
    # Broadcast every word to c0's shape: philox's rounds mix the words, and a scalar word would
    # otherwise leave some outputs scalar-shaped.
    zero = c0 * 0
    c1 = zero + c1.to(tl.uint32)
    c2 = zero + c2.to(tl.uint32)
    c3 = zero + c3.to(tl.uint32)
    r0, r1, _, _ = tl.random.philox(seed, c0, c1, c2, c3)
    u1 = tl.random.uint_to_uniform_float(r0)
    u2 = tl.random.uint_to_uniform_float(r1)
    z, _ = tl.random.pair_uniform_to_normal(u1, u2)
    return z


@triton.jit
def sample_block(n_per_sample, BLOCK: tl.constexpr):
    """The (blocks within a sample, sample) grid: returns (sample, element, mask, offsets) where
    ``element`` is the index within the sample (the noise key's first word), ``sample`` the
    program's sample (its second word) and ``offsets`` the flat (B, N) index."""
    sample = tl.program_id(1)
    element = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = element < n_per_sample
    offsets = sample.to(tl.int64) * n_per_sample + element
    return sample, element, mask, offsets
