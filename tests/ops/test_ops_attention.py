"""The registered ``fastdiff::attention`` op: routes, argument checks, torch.library and
torch.compile integration. Kernel accuracy lives in tests/kernels/test_attention.py."""
import importlib

import fastdiff.kernels.attention as attention_kernel
import pytest
import torch
from fastdiff.kernels.layouts import output_like
from helpers import assert_close, count_launches

from fastdiff.ops import attention, reference

# The module, not the function fastdiff.ops re-exports under the same name.
attention_op = importlib.import_module("fastdiff.ops.attention")

SHAPE = (2, 2, 24, 32)  # (B, heads, N, D)


def make_qkv(shape=SHAPE, n_kv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv_shape = (*shape[:2], shape[2] if n_kv is None else n_kv, shape[3])
    return [torch.randn(s, generator=g).to(dtype) for s in (shape, kv_shape, kv_shape)]


@pytest.fixture
def launches(monkeypatch):
    return count_launches(monkeypatch, attention_kernel, "attention")


@pytest.mark.parametrize(
    "n_kv,scale,dtype",
    [
        pytest.param(None, None, torch.float32, id="self-attention, default scale"),
        pytest.param(40, 0.5, torch.float32, id="cross lengths, explicit scale"),
        pytest.param(None, None, torch.bfloat16, id="bf16"),
    ],
)
def test_matches_reference(route, launches, n_kv, scale, dtype):
    q, k, v = make_qkv(n_kv=n_kv, dtype=dtype)
    out = attention(q, k, v, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, reference.attention(q.double(), k.double(), v.double(), scale))
    assert len(launches) == (1 if route == "interpreted" else 0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
def test_strided_heads_and_nan(route):
    # (B, N, heads, D) projections viewed as (B, heads, N, D), with one NaN query.
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 24, 2, 32, generator=g).transpose(1, 2) for _ in range(3))
    q[1, 0, 5, 3] = float("nan")
    out = attention(q, k, v)
    assert out[1, 0, 5].isnan().all() and out.isnan().sum() == 32
    assert_close(out, reference.attention(q, k, v))


@pytest.mark.parametrize(
    "q_shape,n_kv",
    [pytest.param((0, 2, 24, 32), None, id="no-batch"), pytest.param((2, 2, 0, 32), 7, id="no-queries"),
     pytest.param((2, 2, 24, 32), 0, id="no-keys")],
)
def test_empty_input_launches_nothing(route, launches, q_shape, n_kv):
    q, k, v = make_qkv(q_shape, n_kv=n_kv)
    out = attention(q, k, v)
    assert out.shape == q.shape
    assert_close(out, reference.attention(q, k, v))  # SDPA gives zeros when there are no keys
    assert launches == []


# ---------------------------------------------------------------- bad arguments


def _valid_args():
    q, k, v = make_qkv()
    return {"q": q, "k": k, "v": v, "scale": None}


BAD_ARGUMENTS = [
    # (argument, bad value, error type)
    ("q", [[1.0]], TypeError),
    ("q", torch.zeros(2, 24, 32), ValueError),
    ("q", torch.zeros(SHAPE, dtype=torch.float64), TypeError),
    ("q", torch.zeros(2, 2, 24, 513), ValueError),
    ("q", torch.zeros(2, 2, 24, 0), ValueError),
    ("k", torch.zeros(1, 2, 2, 24, 32), ValueError),
    ("k", torch.zeros(3, 2, 24, 32), ValueError),
    ("k", torch.zeros(2, 1, 24, 32), ValueError),
    ("k", torch.zeros(2, 2, 24, 16), ValueError),
    ("k", torch.zeros(SHAPE, dtype=torch.float16), TypeError),
    ("k", torch.zeros(SHAPE, device="meta"), RuntimeError),
    ("v", torch.zeros(2, 2, 23, 32), ValueError),
    ("v", torch.zeros(SHAPE, dtype=torch.bfloat16), TypeError),
    ("v", torch.zeros(SHAPE, device="meta"), RuntimeError),
    ("scale", "0.1", TypeError),
]


@pytest.mark.parametrize(
    "name, value, error", BAD_ARGUMENTS, ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(BAD_ARGUMENTS)]
)
def test_bad_argument_raises_naming_it(name, value, error):
    args = {**_valid_args(), name: value}
    with pytest.raises(error, match=rf"^{name}\b"):
        attention(**args)


def test_bad_head_dim_with_matching_shapes_names_q():
    q, k, v = (torch.zeros(1, 1, 4, 600) for _ in range(3))
    with pytest.raises(ValueError, match=r"^q has head dim 600"):
        attention(q, k, v)


# ---------------------------------------------------------------- torch.library and torch.compile


@pytest.mark.parametrize(
    "n_kv,scale,dtype",
    [
        pytest.param(None, None, torch.float32, id="default scale"),
        pytest.param(40, 0.25, torch.float32, id="cross lengths"),
        pytest.param(None, 0.1, torch.bfloat16, id="bf16"),
    ],
)
def test_opcheck(route, n_kv, scale, dtype):
    q, k, v = make_qkv((1, 2, 16, 16), n_kv=n_kv, dtype=dtype)
    torch.library.opcheck(torch.ops.fastdiff.attention.default, (q, k, v, scale))


def test_compiles_without_graph_breaks(route, launches):
    q, k, v = make_qkv()

    def block(q, k, v):
        return attention(q * 2, k, v).transpose(1, 2) + 1

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(q, k, v)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(q, k, v)
    assert_close(compiled, block(q, k, v))
    assert (len(launches) > 0) == (route == "interpreted")


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize(
    "head_dim,dtype,expected",
    [
        pytest.param(256, torch.bfloat16, attention_op.SDPA_FLASH, id="D=256 bf16: SDPA flash"),
        pytest.param(64, torch.float16, attention_op.SDPA_FLASH, id="D=64 fp16: SDPA flash"),
        pytest.param(512, torch.bfloat16, attention_op.KERNEL, id="D=512: no flash backend, fastdiff kernel"),
        pytest.param(256, torch.float32, attention_op.KERNEL, id="fp32: fastdiff kernel"),
        pytest.param(48 + 4, torch.bfloat16, attention_op.KERNEL, id="D=52, not a multiple of 8: fastdiff kernel"),
    ],
)
def test_cuda_op_routes(launches, head_dim, dtype, expected):
    q, k, v = (t.cuda() for t in make_qkv((4, 1, 256, head_dim), dtype=dtype))
    with attention_op.recording_routes(set()) as recorded:
        out = attention(q, k, v)
    assert recorded == {f"{expected} (D={head_dim}, {str(dtype).removeprefix('torch.')})"}
    assert len(launches) == (expected == attention_op.KERNEL) and out.is_cuda
    assert_close(out, reference.attention(q.double(), k.double(), v.double()))
    torch.library.opcheck(torch.ops.fastdiff.attention.default, (q, k, v, None))


@pytest.mark.gpu
def test_cuda_sdpa_route_keeps_nan_semantics_and_layout():
    q, k, v = (t.cuda() for t in make_qkv((2, 2, 64, 64), dtype=torch.bfloat16))
    q[1, 0, 3, 5] = float("nan")
    out = attention(q, k, v)
    assert out[1, 0, 3].isnan().all() and out.isnan().sum() == 64
    k[0, 1, 7, 0] = float("nan")
    out = attention(q, k, v)
    assert out[0, 1].isnan().any(-1).all() and not out[0, 0].isnan().any()
    qkv = torch.randn(2, 3 * 64, 8, 8, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    q, k, v = qkv.reshape(2, 3, 1, 64, 64).transpose(-1, -2).unbind(1)  # the UNet's views of a channels_last conv
    out = attention(q, k, v)
    assert out.stride() == output_like(q).stride()


# ---------------------------------------------------------------- routes (CPU)


@pytest.mark.parametrize(
    "dtype,head_dim,contiguous,capability,takes",
    [
        (torch.bfloat16, 256, True, (9, 0), True),
        (torch.float16, 8, True, (8, 0), True),
        (torch.bfloat16, 512, True, (9, 0), False),  # no FlashAttention-2 past 256
        (torch.bfloat16, 260, True, (9, 0), False),
        (torch.bfloat16, 52, True, (9, 0), False),  # not a multiple of 8
        (torch.float32, 64, True, (9, 0), False),
        (torch.bfloat16, 64, False, (9, 0), False),
        (torch.float16, 64, True, (7, 5), False),  # Turing: no FlashAttention-2
    ],
)
def test_flash_takes(dtype, head_dim, contiguous, capability, takes):
    assert attention_op.flash_takes(dtype, head_dim, contiguous, capability) is takes


def test_route_on_cpu(route):
    q, k, v = make_qkv(dtype=torch.bfloat16)
    expected = attention_op.KERNEL if route == "interpreted" else attention_op.REFERENCE
    assert attention_op.route(q, k, v) == expected
    with attention_op.recording_routes(set()) as outer, attention_op.recording_routes(set()) as inner:
        attention(q, k, v)
    assert outer == inner == {f"{expected} (D=32, bfloat16)"}
    attention(q, k, v)  # outside the block: not recorded
    assert outer == {f"{expected} (D=32, bfloat16)"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sdpa_flash_route_on_cpu_tensors(dtype):
    # PyTorch's CPU flash kernel stands in for the CUDA one: the same restricted call, layout rule
    # and NaN fill (the CPU kernel gives zeros for a NaN query row; the route must give NaN).
    qkv = torch.randn(2, 3 * 32, 4, 6, generator=torch.Generator().manual_seed(3)).to(dtype)
    qkv = qkv.to(memory_format=torch.channels_last)
    q, k, v = qkv.reshape(2, 3, 2, 16, 24).transpose(-1, -2).unbind(1)  # strided (B, heads, N, D) views
    q = q.clone(memory_format=torch.preserve_format)
    q[1, 0, 5, 2] = float("nan")
    out = attention_op.sdpa_flash(q, k, v, 0.3)
    assert out.stride() == output_like(q).stride() and out.dtype == dtype
    expected = reference.attention(q.double(), k.double(), v.double(), 0.3)
    assert out[1, 0, 5].isnan().all() and out.isnan().sum() == 16
    assert_close(out, expected, msg="SDPA flash route vs fp64 reference")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
def test_nan_query_row_is_nan_on_every_route(route):
    """Contiguous inputs take PyTorch's CPU flash kernel, which gave 0.0 for a NaN query row."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 4, 8, generator=g) for _ in range(3))
    q[0, 0, 1, 0] = float("nan")
    out = attention(q, k, v)
    assert out[0, 0, 1].isnan().all() and out.isnan().sum() == 8
