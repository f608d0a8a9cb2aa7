"""The registered ``fastdiff::attention`` op: routes, argument checks, torch.library and
torch.compile integration. Kernel accuracy lives in tests/kernels/test_attention.py."""
import pytest
import torch
from helpers import assert_close, count_launches

import fastdiff.kernels.attention as attention_kernel
from fastdiff import reference
from fastdiff.ops import attention

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
)  # fmt: skip
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
@pytest.mark.parametrize("head_dim", [256, 512])
def test_cuda_op_runs_the_kernel(launches, head_dim):
    q, k, v = (t.cuda() for t in make_qkv((4, 1, 256, head_dim), dtype=torch.bfloat16))
    out = attention(q, k, v)
    assert len(launches) == 1 and out.is_cuda
    assert_close(out, reference.attention(q.double(), k.double(), v.double()))
    torch.library.opcheck(torch.ops.fastdiff.attention.default, (q, k, v, None))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
def test_nan_query_row_is_nan_on_every_route(route):
    """Contiguous inputs take PyTorch's CPU flash kernel, which gave 0.0 for a NaN query row."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 4, 8, generator=g) for _ in range(3))
    q[0, 0, 1, 0] = float("nan")
    out = attention(q, k, v)
    assert out[0, 0, 1].isnan().all() and out.isnan().sum() == 8
