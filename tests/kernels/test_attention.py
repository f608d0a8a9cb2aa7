"""Flash attention kernel vs the fp64 reference: Triton's interpreter on CPU, the GPU when there is one.

Accuracy follows FlashAttention's rule (tests/helpers.assert_within_2x_of_torch): the kernel's error
against fp64 truth may be at most twice PyTorch SDPA's error in the same dtype, plus a small floor.
Under the interpreter, fp32 -> bf16 casts of p and of the output truncate instead of rounding to
nearest (a GPU rounds), which the floor absorbs. Shapes stay small there: each program instance
costs ~0.1 ms per key block, bf16 several times more.
"""
import pytest
import torch
from fastdiff.kernels import attention as attn
from helpers import assert_close, assert_within_2x_of_torch

from fastdiff.ops import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (label, (B, heads, N_q, N_kv, D), scale); scale None means 1/sqrt(D)
CASES = [
    ("N=16, D=32", (1, 2, 16, 16, 32), None),
    ("N=49 (7x7): partial key block, D=64", (2, 1, 49, 49, 64), None),
    ("N=257: one row past the block, D=48 padded to 64", (1, 1, 257, 257, 48), None),
    ("D=256 (Ho CIFAR attention)", (1, 1, 40, 40, 256), None),
    ("D=512 (256px DDPMs)", (1, 1, 20, 20, 512), None),
    ("D=5 padded to the 16 tl.dot needs", (1, 1, 20, 20, 5), None),
    ("D=96, several heads", (1, 3, 18, 18, 96), None),
    ("cross lengths: N_q=33, N_kv=70", (1, 1, 33, 70, 64), None),
    ("peaked softmax: max moves across key blocks", (1, 1, 24, 100, 32), 2.0),
]


def make_qkv(batch, heads, n_q, n_kv, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n_q, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, heads, n_kv, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, heads, n_kv, head_dim, generator=gen).to(dtype)
    return q, k, v


def run_kernel(q, k, v, scale):
    return attn.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), scale).cpu()


def fp64_truth(q, k, v, scale):
    return reference.attention(*(t.to(DEVICE, torch.float64) for t in (q, k, v)), scale).cpu()


def sorted_shape(t):
    """t's sizes from its outermost to its innermost dimension (by stride)."""
    return [t.shape[d] for d in sorted(range(t.dim()), key=lambda d: -t.stride(d))]


def check_against_torch(q, k, v, scale, what):
    out = run_kernel(q, k, v, scale)
    torch_out = reference.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), scale).cpu()
    assert out.dtype == q.dtype and out.shape == q.shape and out.stride(-1) == 1
    assert sorted(out.stride(), reverse=True) == list(torch.empty(sorted_shape(out)).stride()), "dense"
    assert_within_2x_of_torch(out, torch_out, fp64_truth(q, k, v, scale), what)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label,shape,scale", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(label, shape, scale, dtype):
    check_against_torch(*make_qkv(*shape, dtype), scale, label)


def test_peaked_softmax_matches_fp64_in_fp32():
    # Logits of order 100: without the running-max rescale exp() overflows; a wrong rescale shows up here.
    q, k, v = make_qkv(1, 1, 16, 80, 16, torch.float32, seed=3)
    out = run_kernel(q, k, v, 10.0)
    assert_close(out, fp64_truth(q, k, v, 10.0), dtype=torch.float32)


def test_strided_inputs():
    # (B, N, heads, D) projections viewed as (B, heads, N, D): the kernel reads them through strides.
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 20, 3, 32, generator=gen).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    out = check_against_torch(q, k, v, None, "transposed heads")
    assert out.stride() == q.stride(), "the output is laid out (B, N, heads, D) like q"
    assert out.transpose(1, 2).is_contiguous()
    # A last dimension that is not contiguous is copied first.
    q2, k2, v2 = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v))
    check_against_torch(q2, k2, v2, None, "column-major head dim")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's NaN warnings under the interpreter
@pytest.mark.parametrize("poisoned", ["q", "k", "v"])
def test_nan_propagates_like_sdpa(poisoned):
    # A NaN in q poisons its output row, in k every row, in v its column of every row (as in SDPA),
    # and only in its own head.
    qkv = dict(zip("qkv", make_qkv(1, 2, 40, 40, 32, torch.float32)))
    qkv[poisoned][0, 0, 7, 1] = float("nan")
    out = run_kernel(*qkv.values(), None)
    expected = reference.attention(*qkv.values())
    assert expected[0, 0].isnan().any() and not expected[0, 1].isnan().any()
    assert torch.equal(out.isnan(), expected.isnan())
    assert_close(out, expected)


def test_no_keys_gives_zeros_like_sdpa(monkeypatch):
    monkeypatch.setattr(attn, "attention_kernel", None)  # indexing it would raise
    q, k, v = make_qkv(1, 2, 5, 0, 16, torch.float32)
    out = run_kernel(q, k, v, None)
    assert_close(out, reference.attention(q, k, v))
    assert out.shape == q.shape and (out == 0).all()


def test_empty_queries_launch_nothing(monkeypatch):
    monkeypatch.setattr(attn, "attention_kernel", None)
    q, k, v = make_qkv(0, 2, 5, 5, 16, torch.float32)
    assert run_kernel(q, k, v, None).shape == q.shape


@pytest.mark.parametrize("head_dim,block_d", [(1, 16), (16, 16), (17, 32), (48, 64), (64, 64), (192, 256), (512, 512)])
def test_head_dim_padding(head_dim, block_d):
    assert attn.padded_head_dim(head_dim) == block_d


def test_configs_keep_tl_dot_minimum():
    for (block_d, _), cfg in attn.CONFIGS.items():
        assert min(cfg.block_m, cfg.block_n, block_d) >= 16


def test_aot_specs_cover_every_launch_config():
    listed = {
        (s.constexprs["BLOCK_D"], s.signature["q_ptr"] == "*fp32", s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"],
         s.num_warps, s.num_stages)
        for s in attn.aot_specs()
    }
    for head_dim in range(1, 513):
        for dtype in DTYPES:
            block_d, cfg = attn.pick_config(head_dim, dtype)
            assert (block_d, dtype == torch.float32, *cfg) in listed
    assert all(s.constexprs["BF16_DOT_IN_FP32"] is False for s in attn.aot_specs())


# ---------------------------------------------------------------- GPU: the Ho UNet's shapes


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape,dtype",
    [
        pytest.param((4, 1, 256, 256, 256), torch.bfloat16, id="Ho CIFAR 16x16 attention, bf16"),
        pytest.param((4, 1, 256, 256, 256), torch.float32, id="Ho CIFAR 16x16 attention, fp32 (ieee dots)"),
        pytest.param((4, 1, 256, 256, 512), torch.bfloat16, id="256px DDPM 16x16 attention D=512, bf16"),
        pytest.param((2, 1, 1024, 1024, 512), torch.float16, id="D=512 at N=1024, fp16"),
        pytest.param((1, 1, 256, 256, 512), torch.float32, id="fp32 D=512"),
        pytest.param((1, 8, 4096, 4096, 64), torch.bfloat16, id="many heads, N=4096, D=64, bf16"),
    ],
)
def test_gpu_ho_shapes(shape, dtype):
    check_against_torch(*make_qkv(*shape, dtype), None, f"{shape} {dtype}")
