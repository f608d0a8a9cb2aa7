"""``fastdiff::q_sample``: the forward-diffusion sample x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps.

Semantics are :func:`fastdiff.ops.reference.q_sample`; the kernel is :mod:`fastdiff.kernels.q_sample`.
No value of a CUDA tensor is read on the host (an out-of-range CUDA ``t`` gives NaN rows, see the
kernel); CPU ``t`` is checked and raises ValueError (RuntimeError under torch.compile, whose
graphs keep the check rather than wrap -1 to t = T - 1).

Not differentiable: training feeds data x0 that needs no gradient, so no autograd formula is
registered (on the registered-op path, a backward through x_t raises).
"""
from __future__ import annotations

import torch

from fastdiff.ops import backend, reference
from fastdiff.ops._checks import check_index_values, check_rng, check_same_device, check_same_shape, check_tensor

INDEX_DTYPES = (torch.int32, torch.int64)


def q_sample(
    x0: torch.Tensor,
    t: torch.Tensor,
    coefs: torch.Tensor,
    noise: torch.Tensor | None = None,
    rng: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (x_t, eps): x_t in x0's dtype, eps the noise used.

    x0: (B, ...) float; t: (B,) integer timesteps on x0's device; coefs: (T, 2) float32
    :meth:`NoiseSchedule.q_sample_table`. eps is ``noise`` if given, else Philox keyed by
    (element in sample, sample, offset low word, offset high word) with key seed from ``rng``
    (int64 [seed, offset]), returned in x0's dtype for the loss.
    """
    _check_args(x0, t, coefs, noise, rng)
    if x0.numel() == 0:
        eps_dtype = x0.dtype if noise is None else noise.dtype
        return x0.new_empty(x0.shape), x0.new_empty(x0.shape, dtype=eps_dtype)
    if backend.kernel_path(x0.device) == "reference" and noise is not None:
        # Plain torch code that torch.compile can trace and fuse. Philox keying needs the seed
        # on the host, so that case runs the opaque op (the same reference, eagerly).
        check_index_values("t", t, coefs.shape[0])
        return reference.q_sample(x0, t, coefs, noise, rng)
    return torch.ops.fastdiff.q_sample(x0, t, coefs, noise, rng)


def _check_args(x0, t, coefs, noise, rng) -> None:
    check_tensor("x0", x0)
    if x0.dim() == 0:
        raise ValueError("x0 must have a leading sample dimension, got a 0-dim tensor")
    check_tensor("t", t, dtypes=INDEX_DTYPES)
    if t.shape != x0.shape[:1]:
        raise ValueError(f"t must have shape ({x0.shape[0]},), one timestep per sample of x0, got {tuple(t.shape)}")
    check_tensor("coefs", coefs, dtypes=(torch.float32,), rank=2)
    if coefs.shape[0] == 0 or coefs.shape[1] != 2:
        raise ValueError(f"coefs must have shape (T, 2) with T >= 1, got {tuple(coefs.shape)}")
    if noise is None and rng is None:
        raise ValueError("noise or rng must be given: the noise tensor, or an int64 [seed, offset] to draw it")
    if noise is not None:
        check_tensor("noise", noise)
        check_same_shape("x0", x0, noise=noise)
    if rng is not None:
        check_rng("rng", rng)
    check_same_device("x0", x0, t=t, coefs=coefs, noise=noise, rng=rng)


@torch.library.custom_op(
    "fastdiff::q_sample",
    mutates_args=(),
    schema="(Tensor x0, Tensor t, Tensor coefs, Tensor? noise, Tensor? rng) -> (Tensor, Tensor)",
)
def _q_sample_op(x0, t, coefs, noise, rng):
    check_index_values("t", t, coefs.shape[0])
    if backend.kernel_path(x0.device) == "reference":
        x_t, eps = reference.q_sample(x0, t, coefs, noise, rng)
        if noise is not None:  # the reference hands back noise itself; op outputs may not alias inputs
            eps = eps.clone(memory_format=torch.contiguous_format)
        return x_t.contiguous(), eps
    # the kernels need triton, which is optional: imported when a kernel runs
    from fastdiff.kernels.q_sample import q_sample as launch

    with backend.on_device(x0.device):
        return launch(x0, t, coefs, noise, rng)


@_q_sample_op.register_fake
def _(x0, t, coefs, noise, rng):
    eps_dtype = x0.dtype if noise is None else noise.dtype
    return x0.new_empty(x0.shape), x0.new_empty(x0.shape, dtype=eps_dtype)
