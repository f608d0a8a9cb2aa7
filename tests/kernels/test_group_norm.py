"""GroupNorm (+ SiLU) kernel vs the fp64 reference: Triton's interpreter on CPU, the GPU when there is one.

Accuracy follows FlashAttention's rule (tests/helpers.assert_within_2x_of_torch): the kernel's error
against fp64 truth may be at most twice PyTorch's own error in the same dtype, plus a small floor.
Under the interpreter, fp32 -> bf16 casts truncate instead of rounding to nearest (a GPU rounds),
which the floor absorbs.
"""
import pytest
import torch
from fastdiff.kernels import group_norm as gn
from helpers import assert_close, assert_within_2x_of_torch

from fastdiff.ops import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MEMORY_FORMATS = [torch.contiguous_format, torch.channels_last]

# (label, shape, num_groups, affine: "both" | "weight" | "bias" | "none", apply_silu)
CASES = [
    ("C/G=12: Ho up path, non-pow2 channels masked", (1, 48, 8, 8), 4, "both", True),
    ("C/G=1", (2, 8, 4, 4), 8, "both", True),
    ("C=96, G=32: C/G=3", (2, 96, 4, 4), 32, "both", False),
    ("1x1 spatial", (3, 32, 1, 1), 8, "both", True),
    ("7x7 spatial, no affine", (2, 24, 7, 7), 4, "none", True),
    ("weight only, odd HW", (2, 16, 5, 3), 4, "weight", False),
    ("bias only", (1, 16, 6, 6), 2, "bias", True),
    ("group spans several HW tiles", (1, 16, 32, 32), 2, "both", True),
    ("64x64 spatial, C/G=2", (1, 4, 64, 64), 2, "both", False),
    ("C/G=80 > largest channel tile", (1, 160, 3, 3), 2, "both", True),
]


def make_inputs(shape, affine, dtype, memory_format=torch.contiguous_format, seed=0):
    gen = torch.Generator().manual_seed(seed)
    channels = shape[1]
    x = (torch.randn(shape, generator=gen) * 3 + 2).to(dtype).to(memory_format=memory_format)
    weight = (1 + 0.5 * torch.randn(channels, generator=gen)).to(dtype) if affine in ("both", "weight") else None
    bias = torch.randn(channels, generator=gen).to(dtype) if affine in ("both", "bias") else None
    return x, weight, bias


def to_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def fp64_truth(x, weight, bias, num_groups, eps, apply_silu):
    x, weight, bias = (None if t is None else t.cpu().double() for t in (x, weight, bias))
    return reference.group_norm_silu(x, weight, bias, num_groups, eps, apply_silu)


def check_against_torch(x, weight, bias, num_groups, eps, apply_silu, what):
    """Kernel on DEVICE vs fp64 truth, within 2x of PyTorch's error in x's dtype."""
    dx, dweight, dbias = to_device(x, weight, bias)
    out = gn.group_norm_silu(dx, dweight, dbias, num_groups, eps, apply_silu)
    torch_out = reference.group_norm_silu(dx, dweight, dbias, num_groups, eps, apply_silu)
    assert out.dtype == x.dtype and out.shape == x.shape
    truth = fp64_truth(x, weight, bias, num_groups, eps, apply_silu)
    assert_within_2x_of_torch(out.cpu(), torch_out.cpu(), truth, what)
    return out


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label,shape,num_groups,affine,apply_silu", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(label, shape, num_groups, affine, apply_silu, dtype, memory_format):
    x, weight, bias = make_inputs(shape, affine, dtype, memory_format)
    out = check_against_torch(x, weight, bias, num_groups, 1e-5, apply_silu, label)
    assert out.is_contiguous(memory_format=memory_format), "output must keep the input's memory format"


def test_large_mean_does_not_cancel():
    # E[x^2] - E[x]^2 in fp32 loses every digit of a unit variance on a mean of 1e4.
    gen = torch.Generator().manual_seed(1)
    x = 1e4 + torch.randn(2, 16, 12, 12, generator=gen)
    check_against_torch(x, None, None, 4, 1e-6, False, "mean 1e4, std 1")


def test_constant_group_normalises_to_zero():
    # A constant group has zero variance: its normalised values are exactly 0, so the output is silu(bias).
    x = torch.full((1, 8, 3, 3), 5.0)
    x[:, 4:] = torch.randn(1, 4, 3, 3)
    weight, bias = torch.ones(8), torch.linspace(-1, 1, 8)
    check_against_torch(x, weight, bias, 2, 1e-2, True, "constant group")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
def test_nan_poisons_only_its_group():
    x, weight, bias = make_inputs((2, 16, 4, 4), "both", torch.float32)
    x[1, 5, 2, 3] = float("nan")  # sample 1, group 1 (channels 4..7)
    out = gn.group_norm_silu(*to_device(x, weight, bias), 4, 1e-5, True).cpu()
    expected = reference.group_norm_silu(x, weight, bias, 4, 1e-5, True)
    assert out[1, 4:8].isnan().all()
    assert not out[0].isnan().any() and not out[1, :4].isnan().any() and not out[1, 8:].isnan().any()
    assert_close(out, expected)


@pytest.mark.parametrize(
    "make_view",
    [
        pytest.param(lambda x: x[:, :, ::2], id="sliced NCHW"),
        pytest.param(lambda x: x.transpose(2, 3), id="H and W transposed"),
        pytest.param(lambda x: x.to(memory_format=torch.channels_last)[:, :, :, 1:], id="sliced channels_last"),
    ],
)
def test_non_contiguous_input(make_view):
    x, weight, bias = make_inputs((2, 12, 6, 6), "both", torch.float32)
    view = make_view(x)
    assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
    check_against_torch(view, weight, bias, 3, 1e-5, True, "non-contiguous input")


def test_mixed_precision_affine():
    # bf16 activations with fp32 affine parameters (a model whose norms were kept in fp32).
    x, _, _ = make_inputs((2, 16, 4, 4), "none", torch.bfloat16)
    weight, bias = torch.randn(16), torch.randn(16)
    check_against_torch(x, weight, bias, 4, 1e-5, True, "bf16 x, fp32 affine")


def test_empty_input_launches_nothing(monkeypatch):
    monkeypatch.setattr(gn, "group_norm_silu_kernel", None)  # indexing it would raise
    x = torch.empty(0, 8, 4, 4, device=DEVICE)
    out = gn.group_norm_silu(x, None, None, 4, 1e-5, True)
    assert out.shape == x.shape and out.numel() == 0


@pytest.mark.parametrize(
    "channels_per_group,block_c", [(1, 4), (3, 4), (4, 4), (12, 16), (16, 16), (64, 64), (80, 64), (512, 64)]
)
def test_block_config(channels_per_group, block_c):
    assert gn._block_config(channels_per_group) == (block_c, gn.TILE_ELEMENTS // block_c)


def test_aot_specs_cover_every_launch_config():
    specs = gn.aot_specs()
    for kernel in ("group_norm_silu_kernel", "group_norm_silu_backward_kernel"):
        listed = {tuple(s.constexprs[k] for k in ("BLOCK_C", "BLOCK_HW", "GROUP_ALIGN", "CHANNELS_LAST"))
                  for s in specs if s.fn.__name__ == kernel}
        for cpg in range(1, 300):
            for channels_last in (False, True):
                p = gn.plan(64, 32 * cpg, 256, 32, 2, channels_last, sm_count=None)
                assert (p.block_c, p.block_hw, p.group_align, channels_last) in listed, (kernel, cpg, channels_last)
    forward = [s for s in specs if s.fn.__name__ == "group_norm_silu_kernel"]
    switches = {tuple(s.constexprs[k] for k in ("CHANNELS_LAST", "HAS_AFFINE", "APPLY_SILU", "STORE_STATS")) for s in forward}
    assert len(switches) == 16
    split = {(s.fn.__name__, s.constexprs["CHANNELS_LAST"]) for s in specs if "slices" in s.signature}
    assert split == {(k, cl) for k in ("group_norm_partial_stats_kernel", "group_norm_silu_apply_kernel") for cl in (0, 1)}
    assert {(s.num_warps, s.num_stages) for s in specs} == {(gn.NUM_WARPS, gn.NUM_STAGES)}
    # Both layouts are held to 16-byte tile loads at the Ho UNet's C/G = 8 (bf16).
    ho = [s for s in forward if s.name.endswith("x256x256g32_affine_silu")]
    assert sorted((s.constexprs["CHANNELS_LAST"], s.vector_load_bytes) for s in ho) == [(False, 16), (True, 16)]


def test_aot_specs_carry_the_jit_specialisation():
    by_name = {s.name: s for s in gn.aot_specs()}
    spec = by_name["group_norm_silu_cl_bf16_1x256x256g32_affine_silu"]  # one tile: no split at batch 1
    names = list(spec.signature)
    divisible = {names[i] for (i,), attrs in spec.attrs.items() if ["tt.divisibility", 16] in attrs}
    # HW = 256 and num_groups = 32 are multiples of 16; C/G = 8 is not; every pointer is aligned.
    assert divisible == {"x_ptr", "y_ptr", "weight_ptr", "bias_ptr", "stats_ptr", "HW", "num_groups"}
    assert spec.signature["channels_per_group"] == "i32" and spec.signature["eps"] == "fp32"
    # C/G = 1 is specialised to a constant, as the JIT does with an integer argument equal to 1.
    one = [s for s in by_name.values() if s.constexprs.get("channels_per_group") == 1]
    assert one and all(s.signature["channels_per_group"] == "constexpr" for s in one)


@pytest.mark.parametrize(
    "channels_per_group,element_size,channels_last,align",
    [(4, 2, True, 4), (8, 2, True, 8), (12, 2, True, 4), (16, 2, True, 8), (16, 4, True, 4), (10, 2, True, 2),
     (3, 2, True, 1), (1, 4, True, 1), (8, 2, False, 1)],
)
def test_group_align(channels_per_group, element_size, channels_last, align):
    assert gn.group_align(channels_per_group, element_size, channels_last) == align


@pytest.mark.parametrize(
    "groups,tiles,sm_count,slices",
    [
        pytest.param(32, 8, None, 1, id="no SM count (CPU): one program per group"),
        pytest.param(32, 8, 132, 8, id="batch 1 on an H100: one slice per tile"),
        pytest.param(32, 40, 132, 17, id="enough slices for ~4 programs per SM"),
        pytest.param(128, 40, 132, 5, id="batch 4"),
        pytest.param(264, 40, 132, 1, id="2 programs per SM already: no split"),
        pytest.param(32, 1, 132, 1, id="a one-tile group is never split"),
    ],
)
def test_split_policy(groups, tiles, sm_count, slices):
    assert gn.slices_per_group(groups, tiles, sm_count) == slices


@pytest.mark.parametrize("hw", [16, 100, 512, 513, 1089, 4096, 4097, 65536])
@pytest.mark.parametrize("sm_count", [None, 8, 132, 10_000])
def test_plan_slices_cover_the_group_without_empty_slices(hw, sm_count):
    for channels_per_group in (1, 4, 12, 64):
        p = gn.plan(1, 32 * channels_per_group, hw, 32, 2, True, sm_count)
        if p.slices == 1:
            assert p.hw_per_slice == hw
            continue
        assert p.hw_per_slice % p.block_hw == 0
        assert (p.slices - 1) * p.hw_per_slice < hw <= p.slices * p.hw_per_slice
        assert p.slices <= gn.slices_per_group(32, triton_cdiv(hw, p.block_hw), sm_count)


def triton_cdiv(a, b):
    return -(-a // b)


# Split-group path: awkward shapes whose groups span several tiles, forced by a large SM count.
# (label, shape, num_groups, affine, apply_silu)
SPLIT_CASES = [
    ("C/G=4, 3 tiles, ragged last slice", (1, 8, 33, 33), 2, "both", True),
    ("C/G=12 (masked channels), 2 slices of 2 tiles", (2, 24, 20, 20), 2, "bias", False),
    ("C/G=2, no affine", (1, 6, 30, 30), 3, "none", True),
]


@pytest.fixture
def launched(monkeypatch):
    """Names of the kernels the launchers run, in order."""
    names = []
    run = gn._run

    def spy(launch):
        names.append(launch.kernel.__name__ if hasattr(launch.kernel, "__name__") else launch.kernel.fn.__name__)
        return run(launch)

    monkeypatch.setattr(gn, "_run", spy)
    return names


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label,shape,num_groups,affine,apply_silu", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_split_group_path_matches_reference(label, shape, num_groups, affine, apply_silu, dtype, memory_format, launched):
    x, weight, bias = make_inputs(shape, affine, dtype, memory_format)
    n, c, h, w = shape
    p = gn.plan(n, c, h * w, num_groups, x.element_size(), memory_format == torch.channels_last, 1000)
    assert p.slices > 1
    dx, dweight, dbias = to_device(x, weight, bias)
    out = gn.group_norm_silu(dx, dweight, dbias, num_groups, 1e-5, apply_silu, sm_count=1000)
    assert launched == ["group_norm_partial_stats_kernel", "group_norm_silu_apply_kernel"]
    torch_out = reference.group_norm_silu(dx, dweight, dbias, num_groups, 1e-5, apply_silu)
    assert_within_2x_of_torch(out.cpu(), torch_out.cpu(), fp64_truth(x, weight, bias, num_groups, 1e-5, apply_silu), label)
    assert out.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=["nchw", "channels_last"])
def test_split_group_path_stores_the_statistics_of_one_program(memory_format):
    # Training saves [mean of x - pivot, rstd] per group for the backward: the split path's merge
    # must give what the one-program kernel gives.
    x, weight, bias = make_inputs((2, 8, 33, 33), "both", torch.float32, memory_format)
    stats_one, stats_split = (torch.empty(2 * 2, 2, device=DEVICE) for _ in range(2))
    dx, dweight, dbias = to_device(x, weight, bias)
    one = gn.group_norm_silu(dx, dweight, dbias, 2, 1e-5, True, stats_one)
    split = gn.group_norm_silu(dx, dweight, dbias, 2, 1e-5, True, stats_split, sm_count=1000)
    torch.testing.assert_close(stats_split, stats_one, rtol=1e-5, atol=1e-6)
    assert_close(split, one)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
def test_split_group_path_nan_poisons_only_its_group():
    x, weight, bias = make_inputs((1, 8, 33, 33), "both", torch.float32)
    x[0, 5, 30, 2] = float("nan")  # group 1 (channels 4..7), in its last slice
    out = gn.group_norm_silu(*to_device(x, weight, bias), 2, 1e-5, True, sm_count=1000).cpu()
    assert out[0, 4:].isnan().all() and not out[0, :4].isnan().any()


# ---------------------------------------------------------------- GPU: the Ho UNet's shapes


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape,dtype,memory_format",
    [
        pytest.param((4, 256, 16, 16), torch.bfloat16, torch.channels_last, id="Ho 16x16 block, bf16 channels_last"),
        pytest.param((4, 384, 32, 32), torch.float16, torch.contiguous_format, id="Ho up path C=384 (C/G=12), fp16"),
        pytest.param((4, 128, 32, 32), torch.float32, torch.contiguous_format, id="Ho first block, fp32"),
        pytest.param((2, 512, 64, 64), torch.bfloat16, torch.channels_last, id="256px model 64x64, bf16 channels_last"),
    ],
)
def test_gpu_ho_shapes(shape, dtype, memory_format):
    x, weight, bias = make_inputs(shape, "both", dtype, memory_format)
    out = check_against_torch(x, weight, bias, 32, 1e-6, True, f"{shape} {dtype}")
    assert out.is_cuda and out.is_contiguous(memory_format=memory_format)


@pytest.mark.gpu
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 128, 32, 32), (1, 384, 16, 16), (2, 512, 64, 64)], ids=str)
def test_gpu_split_group_path_at_batch_1(shape, memory_format, launched):
    # The device's own SM count drives the policy: a batch-1 UNet's 32 groups take the split path.
    x, weight, bias = make_inputs(shape, "both", torch.bfloat16, memory_format)
    out = check_against_torch(x, weight, bias, 32, 1e-6, True, f"{shape} split")
    assert launched == ["group_norm_partial_stats_kernel", "group_norm_silu_apply_kernel"]
    assert out.is_contiguous(memory_format=memory_format)
