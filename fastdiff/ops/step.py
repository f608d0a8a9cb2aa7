"""``fastdiff::sampler_step``: one fused sampler update (x0, clamp, posterior mean, noise,
and for multistep solvers the history of previous data predictions, updated in place).

Semantics are :func:`fastdiff.ops.reference.sampler_step`; the kernel is
:mod:`fastdiff.kernels.sampler_step`. No value of a CUDA tensor is read on the host, so the op
can be captured in a CUDA graph and replayed with ``step_index`` (and ``rng``) updated in place.
An out-of-range CUDA ``step_index`` is therefore not caught here: the kernel writes NaN (see
its module docstring); CPU indices are checked and raise ValueError (RuntimeError under
torch.compile, whose graphs keep the check rather than wrap -1 to the last row).

Not differentiable: sampling needs no gradients, so no autograd formula is registered.
"""
from __future__ import annotations

import torch

from fastdiff.ops import backend, reference
from fastdiff.ops._checks import check_index_values, check_rng, check_same_device, check_same_shape, check_tensor

INDEX_DTYPES = (torch.int32, torch.int64)
NUM_COEFS = 6  # columns of fastdiff.schedulers.STEP_COLUMNS
#: History slots a step may read (DPM-Solver++ of order 3 reads two previous data predictions;
#: UniPC of order 3 three, plus the previous corrected sample).
MAX_HISTORY = 4


def sampler_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    step_index: torch.Tensor,
    coefs: torch.Tensor,
    noise: torch.Tensor | None = None,
    rng: torch.Tensor | None = None,
    clip_range: float | None = None,
    history: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (x_prev, x0) in x_t's dtype for row ``coefs[step_index]`` of a StepTable.

    x_t, eps (and noise): (B, ...) float tensors of one shape; step_index: one-element integer
    tensor on x_t's device; coefs: (S, 6 + K), or (S, 8 + 2K) for a predictor-corrector table,
    float32. Noise is ``noise`` if given, else Philox
    keyed by (element in sample, sample, rng[1], step_index) with key rng[0] if ``rng`` (int64
    [seed, offset], or [seed, offset, first sample] to number the samples from rng[2]) is
    given, else none. ``clip_range``: clamp x0 to [-clip_range, clip_range].
    ``history``: (K, *x_t.shape) float buffer of the K previous data predictions (newest first),
    required exactly when K > 0 (multistep tables); the step adds ``coefs[6 + k] * history[k]``
    and shifts x0 into it in place. With 8 + 2K columns the last slot holds the corrected sample
    instead (:mod:`fastdiff.schedulers.schedules`). Start it zeroed: unused entries are multiplied by 0.
    """
    _check_args(x_t, eps, step_index, coefs, noise, rng, clip_range, history)
    if x_t.numel() == 0:
        return x_t.new_empty(x_t.shape), x_t.new_empty(x_t.shape)
    draws_philox = noise is None and rng is not None
    if backend.kernel_path(x_t.device) == "reference" and not draws_philox:
        # Plain torch code that torch.compile can trace and fuse. Philox keying needs the seed
        # and step on the host, so that case runs the opaque op (the same reference, eagerly).
        check_index_values("step_index", step_index, coefs.shape[0])
        return reference.sampler_step(x_t, eps, step_index, coefs, noise, rng, clip_range, history)
    return torch.ops.fastdiff.sampler_step(x_t, eps, step_index, coefs, noise, rng, clip_range, history)


def _check_args(x_t, eps, step_index, coefs, noise, rng, clip_range, history) -> None:
    check_tensor("x_t", x_t)
    if x_t.dim() == 0:
        raise ValueError("x_t must have a leading sample dimension, got a 0-dim tensor")
    check_tensor("eps", eps)
    check_same_shape("x_t", x_t, eps=eps)
    check_tensor("step_index", step_index, dtypes=INDEX_DTYPES, rank=(0, 1))
    if step_index.numel() != 1:
        raise ValueError(f"step_index must hold exactly one element, got shape {tuple(step_index.shape)}")
    check_tensor("coefs", coefs, dtypes=(torch.float32,), rank=2)
    if coefs.shape[0] == 0 or not NUM_COEFS <= coefs.shape[1] <= NUM_COEFS + 2 + 2 * MAX_HISTORY:
        raise ValueError(
            f"coefs must have shape (S, {NUM_COEFS} + K), or (S, {NUM_COEFS + 2} + 2K) with a corrector, with S >= 1 "
            f"and K history slots in 0..{MAX_HISTORY}, got {tuple(coefs.shape)}"
        )
    _check_history(history, coefs.shape[1], x_t)
    if noise is not None:
        check_tensor("noise", noise)
        check_same_shape("x_t", x_t, noise=noise)
    if rng is not None:
        check_rng("rng", rng, first_sample=True)
    check_same_device("x_t", x_t, eps=eps, step_index=step_index, coefs=coefs, noise=noise, rng=rng, history=history)
    if clip_range is not None:
        if not isinstance(clip_range, (int, float)) or isinstance(clip_range, bool):
            raise TypeError(f"clip_range must be a float or None, got {type(clip_range).__name__}")
        if not clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {clip_range!r}")


def _check_history(history, width: int, x_t) -> None:
    """``history`` fits ``coefs`` of ``width`` columns: K slots for 6 + K or 8 + 2K columns."""
    if history is None:
        if width != NUM_COEFS:
            raise ValueError(f"history is required: coefs has {width} columns (a multistep table); pass a zeroed "
                             f"(K, {', '.join(map(str, x_t.shape))}) buffer, K = table.history_size")
        return
    check_tensor("history", history)
    slots = history.shape[0] if history.dim() else 0
    if not 1 <= slots <= MAX_HISTORY or width not in (NUM_COEFS + slots, NUM_COEFS + 2 + 2 * slots):
        raise ValueError(
            f"history must have shape (K, *x_t.shape) with K in 1..{MAX_HISTORY} and coefs {NUM_COEFS} + K or "
            f"{NUM_COEFS + 2} + 2K wide; coefs has {width} columns, history has shape {tuple(history.shape)}"
        )
    if history.shape != (slots, *x_t.shape):
        raise ValueError(f"history must have shape (K, *x_t.shape) = {(slots, *x_t.shape)}, "
                         f"got {tuple(history.shape)}")
    if not history.is_contiguous():
        raise ValueError("history must be contiguous (the step updates it in place)")


@torch.library.custom_op(
    "fastdiff::sampler_step",
    mutates_args=("history",),
    schema="(Tensor x_t, Tensor eps, Tensor step_index, Tensor coefs, Tensor? noise, Tensor? rng, "
    "float? clip_range, Tensor(a!)? history=None) -> (Tensor, Tensor)",
)
def _sampler_step_op(x_t, eps, step_index, coefs, noise, rng, clip_range, history=None):
    check_index_values("step_index", step_index, coefs.shape[0])
    if backend.kernel_path(x_t.device) == "reference":
        x_prev, x0 = reference.sampler_step(x_t, eps, step_index, coefs, noise, rng, clip_range, history)
        return x_prev.contiguous(), x0.contiguous()
    # the kernels need triton, which is optional: imported when a kernel runs
    from fastdiff.kernels.sampler_step import sampler_step as launch

    with backend.on_device(x_t.device):
        return launch(x_t, eps, step_index, coefs, noise, rng, clip_range, history)


@_sampler_step_op.register_fake
def _(x_t, eps, step_index, coefs, noise, rng, clip_range, history=None):
    return x_t.new_empty(x_t.shape), x_t.new_empty(x_t.shape)
