"""Autograd through the fused ops: float64 gradcheck on the reference route (the registered ops'
backward formulas included), and on the kernel route (Triton's interpreter here, the GPU in the
`gpu` test) gradients within FlashAttention's 2x rule of PyTorch's own in the same dtype,
against float64 autograd of the eager reference."""
import pytest
import torch
from helpers import assert_within_2x_of_torch

from fastdiff.ops import attention, backend, group_norm_silu, reference

GN_CASES = [  # (shape, groups, affine, silu, channels_last)
    pytest.param((2, 12, 5, 4), 3, True, True, False, id="affine-silu"),
    pytest.param((2, 12, 5, 4), 3, False, True, True, id="plain-silu-channels_last"),
    pytest.param((1, 16, 3, 3), 2, True, False, True, id="affine-channels_last"),
    pytest.param((2, 160, 3, 3), 2, True, True, False, id="C/G=80-several-channel-tiles"),
]


def gn_inputs(shape, affine, channels_last, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(shape, generator=g, dtype=torch.float64) + 1
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    weight = 1 + torch.randn(shape[1], generator=g, dtype=torch.float64) if affine else None
    bias = torch.randn(shape[1], generator=g, dtype=torch.float64) if affine else None
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    return [None if t is None else t.to(dtype) for t in (x, weight, bias)], grad.to(dtype)


def grads(fn, inputs, grad, *args):
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    fn(*leaves, *args).backward(grad)
    return [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("shape,groups,affine,silu,channels_last", GN_CASES[:3])
def test_group_norm_gradcheck_fp64_reference_route(shape, groups, affine, silu, channels_last):
    (x, weight, bias), _ = gn_inputs(shape, affine, channels_last)
    leaves = [None if t is None else t.requires_grad_() for t in (x, weight, bias)]
    # The registered training op and its backward op (fp64 reaches them on the reference route
    # only: the public wrapper takes the kernels' dtypes).
    op = torch.ops.fastdiff.group_norm_silu_train
    assert torch.autograd.gradcheck(lambda *a: op(*a, groups, 1e-5, silu)[0], leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,groups,affine,silu,channels_last", GN_CASES)
def test_group_norm_kernel_gradients_within_2x_of_torch(interpreted, shape, groups, affine, silu, channels_last, dtype):
    inputs64, grad64 = gn_inputs(shape, affine, channels_last)
    inputs, grad = gn_inputs(shape, affine, channels_last, dtype)
    truth = grads(reference.group_norm_silu, inputs64, grad64, groups, 1e-5, silu)
    with backend.interpreted_kernels():
        kernel = grads(group_norm_silu, inputs, grad, groups, 1e-5, silu)
    torch_grads = grads(reference.group_norm_silu, inputs, grad, groups, 1e-5, silu)
    for name, k, t, r in zip(("dx", "dweight", "dbias"), kernel, torch_grads, truth):
        if r is None:
            assert k is None
            continue
        assert k.dtype == dtype and k.shape == r.shape
        assert_within_2x_of_torch(k, t, r, f"{name} ({dtype})")
    if channels_last:
        assert kernel[0].is_contiguous(memory_format=torch.channels_last)


def test_group_norm_training_op_saves_the_kernel_statistics(interpreted):
    """The kernel's stored [mean of x - pivot, rstd] are the reference route's statistics."""
    (x, weight, bias), _ = gn_inputs((2, 12, 5, 4), True, False, torch.float32)
    op = torch.ops.fastdiff.group_norm_silu_train
    _, reference_stats = op(x, weight, bias, 3, 1e-5, True)
    with backend.interpreted_kernels():
        _, kernel_stats = op(x, weight, bias, 3, 1e-5, True)
    torch.testing.assert_close(kernel_stats, reference_stats, rtol=1e-5, atol=1e-5)


def test_inference_does_not_take_the_training_op(interpreted, monkeypatch):
    (x, weight, bias), _ = gn_inputs((2, 12, 5, 4), True, False, torch.float32)
    with backend.interpreted_kernels(), torch.no_grad():
        y = group_norm_silu(x, weight.requires_grad_(), bias, 3)
    assert not y.requires_grad


ATTENTION_SHAPES = [
    pytest.param((2, 2, 20, 24), 13, id="D24-nkv13"),
    pytest.param((1, 1, 9, 16), 9, id="D16"),
]


def qkv(shape, n_kv, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, n, d = shape
    q = torch.randn(shape, generator=g, dtype=torch.float64)
    k, v = (torch.randn((b, h, n_kv, d), generator=g, dtype=torch.float64) for _ in range(2))
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)], grad.to(dtype)


@pytest.mark.parametrize("shape,n_kv", [pytest.param((1, 2, 6, 8), 5, id="D8-nkv5")])
def test_attention_gradcheck_fp64_reference_route(shape, n_kv):
    (q, k, v), _ = qkv(shape, n_kv)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    # The registered op's own backward (the recomputation the kernel route uses), in float64.
    assert torch.autograd.gradcheck(lambda *a: torch.ops.fastdiff.attention(*a, 0.3), leaves)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.fastdiff.attention(*a, None), leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,n_kv", ATTENTION_SHAPES)
def test_attention_kernel_gradients_within_2x_of_torch(interpreted, shape, n_kv, dtype):
    inputs64, grad64 = qkv(shape, n_kv)
    inputs, grad = qkv(shape, n_kv, dtype)
    truth = grads(reference.attention, inputs64, grad64)
    with backend.interpreted_kernels():
        kernel = grads(attention, inputs, grad)
    torch_grads = grads(reference.attention, inputs, grad)
    for name, k, t, r in zip(("dq", "dk", "dv"), kernel, torch_grads, truth):
        assert k.dtype == dtype
        assert_within_2x_of_torch(k, t, r, f"{name} ({dtype})")


def test_opcheck_autograd_registration():
    (x, weight, bias), _ = gn_inputs((2, 12, 5, 4), True, False, torch.float32)
    torch.library.opcheck(torch.ops.fastdiff.group_norm_silu_train,
                          (x.requires_grad_(), weight.requires_grad_(), bias, 3, 1e-5, True))
    (q, k, v), _ = qkv((1, 2, 8, 16), 5, torch.float32)
    torch.library.opcheck(torch.ops.fastdiff.attention, (q.requires_grad_(), k, v.requires_grad_(), None))


@pytest.mark.gpu
def test_backward_through_the_accelerated_model_on_the_gpu():
    """Fine-tuning an accelerated UNet on a GPU: backward runs the kernels' autograd, compiled too."""
    from fastdiff.integrations.diffusers.accelerate import accelerate
    from fastdiff.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny()).cuda()
    fast = accelerate(model)
    x = torch.randn(2, 3, 16, 16, device="cuda")
    t = torch.tensor([3, 500], device="cuda")
    for step in (fast, torch.compile(fast)):
        model.zero_grad()
        step(x, t).square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
