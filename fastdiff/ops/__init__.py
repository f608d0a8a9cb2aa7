"""The ``fastdiff::*`` ops: registered with torch.library (schema + fake function), checked
here once, dispatched by :mod:`fastdiff.ops.backend` to the Triton kernels or the eager reference.

Each public function below is the entry point the models call. On a plain CPU run it calls
the eager reference directly, so torch.compile (inductor) can see and fuse it; on CUDA (and
under the interpreter) it calls the registered op, which runs the Triton kernel.
"""
from fastdiff.ops.attention import attention
from fastdiff.ops.norm import group_norm_silu
from fastdiff.ops.q_sample import q_sample
from fastdiff.ops.step import sampler_step

__all__ = ["group_norm_silu", "attention", "sampler_step", "q_sample"]
