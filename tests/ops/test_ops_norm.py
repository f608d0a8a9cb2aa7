"""The registered ``fastdiff::group_norm_silu`` op: routes, memory formats, argument checks,
torch.library and torch.compile integration. Kernel accuracy lives in tests/kernels/test_group_norm.py."""
import fastdiff.kernels.group_norm as gn_kernel
import pytest
import torch
from helpers import assert_close, count_launches

from fastdiff.ops import group_norm_silu, reference

SHAPE = (2, 12, 5, 4)
GROUPS = 3


def make_inputs(shape=SHAPE, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(shape, generator=g) + 1).to(dtype)
    weight = (1 + torch.randn(shape[1], generator=g)).to(dtype)
    bias = torch.randn(shape[1], generator=g).to(dtype)
    return x, weight, bias


@pytest.fixture
def launches(monkeypatch):
    return count_launches(monkeypatch, gn_kernel, "group_norm_silu")


@pytest.mark.parametrize("affine", ["both", "none", "weight"])
@pytest.mark.parametrize("apply_silu", [True, False], ids=["silu", "no-silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(route, launches, dtype, apply_silu, affine):
    x, weight, bias = make_inputs(dtype=dtype)
    weight = weight if affine in ("both", "weight") else None
    bias = bias if affine == "both" else None
    out = group_norm_silu(x, weight, bias, GROUPS, 1e-6, apply_silu)
    assert out.dtype == dtype and out.shape == x.shape
    weight64, bias64 = (None if t is None else t.double() for t in (weight, bias))
    assert_close(out, reference.group_norm_silu(x.double(), weight64, bias64, GROUPS, 1e-6, apply_silu))
    assert len(launches) == (1 if route == "interpreted" else 0)


@pytest.mark.parametrize(
    "make_view,memory_format",
    [
        pytest.param(lambda x: x.to(memory_format=torch.channels_last), torch.channels_last, id="channels_last"),
        pytest.param(lambda x: x.to(memory_format=torch.channels_last)[..., 1:], torch.channels_last,
                     id="sliced channels_last"),
        pytest.param(lambda x: x[:, :, ::2], torch.contiguous_format, id="sliced NCHW"),
        pytest.param(lambda x: x.transpose(2, 3), torch.contiguous_format, id="H and W transposed"),
    ],
)
def test_layouts_and_output_format(route, make_view, memory_format):
    x, weight, bias = make_inputs()
    view = make_view(x)
    out = group_norm_silu(view, weight, bias, GROUPS, 1e-5, True)
    assert_close(out, reference.group_norm_silu(view.contiguous(), weight, bias, GROUPS, 1e-5, True))
    assert out.is_contiguous(memory_format=memory_format)
    op_out = torch.ops.fastdiff.group_norm_silu(view, weight, bias, GROUPS, 1e-5, True)
    assert op_out.is_contiguous(memory_format=memory_format), "the op must keep the layout it fakes"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
def test_nan_propagates(route):
    x, weight, bias = make_inputs()
    x[1, 0, 2, 2] = float("nan")
    out = group_norm_silu(x, weight, bias, GROUPS, 1e-5, True)
    assert out[1, :4].isnan().all() and out.isnan().sum() == 4 * 5 * 4
    assert_close(out, reference.group_norm_silu(x, weight, bias, GROUPS, 1e-5, True))


@pytest.mark.parametrize(
    "shape", [(0, 12, 4, 4), (2, 12, 0, 3), (2, 0, 4, 4)], ids=["no-samples", "no-pixels", "no-channels"]
)
def test_empty_input_gives_empty_output_without_a_launch(route, launches, shape):
    x = torch.empty(shape, dtype=torch.bfloat16)
    out = group_norm_silu(x, None, None, GROUPS, 1e-5, True)
    assert out.shape == shape and out.dtype == torch.bfloat16
    assert launches == []


# ---------------------------------------------------------------- bad arguments


def _valid_args():
    x, weight, bias = make_inputs()
    return {"x": x, "weight": weight, "bias": bias, "num_groups": GROUPS, "eps": 1e-5, "apply_silu": True}


BAD_ARGUMENTS = [
    # (argument, bad value, error type)
    ("x", [[1.0]], TypeError),
    ("x", torch.zeros(SHAPE, dtype=torch.float64), TypeError),
    ("x", torch.zeros(SHAPE, dtype=torch.int32), TypeError),
    ("x", torch.zeros(2, 12, 20), ValueError),
    ("x", torch.zeros(2, 12, 5, 4, 1), ValueError),
    ("weight", torch.ones(13), ValueError),
    ("weight", torch.ones(12, 1), ValueError),
    ("weight", torch.ones(12, dtype=torch.int64), TypeError),
    ("weight", torch.ones(12, device="meta"), RuntimeError),
    ("bias", torch.zeros(11), ValueError),
    ("bias", torch.zeros(12, device="meta"), RuntimeError),
    ("num_groups", 5, ValueError),
    ("num_groups", 0, ValueError),
    ("num_groups", 3.0, TypeError),
]


@pytest.mark.parametrize(
    "name, value, error", BAD_ARGUMENTS, ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(BAD_ARGUMENTS)]
)
def test_bad_argument_raises_naming_it(name, value, error):
    args = {**_valid_args(), name: value}
    with pytest.raises(error, match=rf"^{name}\b"):
        group_norm_silu(**args)


# ---------------------------------------------------------------- torch.library and torch.compile


@pytest.mark.parametrize(
    "make_args",
    [
        pytest.param(lambda x, w, b: (x, w, b, GROUPS, 1e-5, True), id="affine, silu"),
        pytest.param(lambda x, w, b: (x.to(memory_format=torch.channels_last), None, None, GROUPS, 1e-5, False),
                     id="no affine, channels_last"),
        pytest.param(lambda x, w, b: (x.bfloat16(), w.bfloat16(), None, 4, 1e-6, True), id="weight only, bf16"),
    ],
)
def test_opcheck(route, make_args):
    torch.library.opcheck(torch.ops.fastdiff.group_norm_silu.default, make_args(*make_inputs()))


def test_compiles_without_graph_breaks(route, launches):
    x, weight, bias = make_inputs()

    def block(x):
        return group_norm_silu(x, weight, bias, GROUPS, 1e-5, True) * 2 + 1

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    assert_close(compiled, block(x))
    assert (len(launches) > 0) == (route == "interpreted")


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_cuda_op_runs_the_kernel(launches, memory_format):
    x, weight, bias = (t.cuda() for t in make_inputs((4, 256, 16, 16), torch.bfloat16))
    x = x.to(memory_format=memory_format)
    out = group_norm_silu(x, weight, bias, 32, 1e-6, True)
    assert len(launches) == 1 and out.is_cuda and out.is_contiguous(memory_format=memory_format)
    assert_close(out, reference.group_norm_silu(x.double(), weight.double(), bias.double(), 32, 1e-6, True))
    torch.library.opcheck(torch.ops.fastdiff.group_norm_silu.default, (x, weight, bias, 32, 1e-6, True))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_group_whose_statistics_overflow_is_nan_on_every_route(route):
    """|x| ~ 1e20 overflows fp32 sums of squares: NaN on both routes (the CPU route used to give
    the bias, the kernel NaN); |x| ~ 1e17 still normalises to the fp64 answer."""
    x, weight, bias = make_inputs()
    x[0, :4] *= 1e20  # group 0 of sample 0
    x[1, 4:8] *= 1e17  # group 1 of sample 1
    out = group_norm_silu(x, weight, bias, GROUPS, 1e-5, False)
    assert out[0, :4].isnan().all() and out.isnan().sum() == 4 * 5 * 4
    truth = torch.nn.functional.group_norm(x.double(), GROUPS, weight.double(), bias.double(), 1e-5)
    assert_close(out[1], truth[1], dtype=torch.float32)


@pytest.mark.parametrize("x_dtype, param_dtype, ok", [
    (torch.float32, torch.float16, False), (torch.float32, torch.bfloat16, False),
    (torch.float16, torch.bfloat16, False), (torch.bfloat16, torch.float32, True), (torch.float16, torch.float16, True),
])
def test_parameter_dtype_rule_is_the_same_on_every_route(route, x_dtype, param_dtype, ok):
    x, weight, bias = make_inputs(dtype=x_dtype)
    weight, bias = weight.to(param_dtype), bias.to(param_dtype)
    if ok:
        assert group_norm_silu(x, weight, bias, GROUPS).dtype == x_dtype
    else:
        with pytest.raises(TypeError, match=r"^weight must have x's dtype"):
            group_norm_silu(x, weight, bias, GROUPS)
