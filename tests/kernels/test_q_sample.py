"""The fused q-sample kernel against fastdiff.ops.reference.q_sample: the interpreter on CPU tensors
here, the compiled kernel in the @gpu tests."""
import pytest
import torch
from fastdiff.kernels import q_sample as kernel
from helpers import DTYPES, TOLERANCES, assert_close, ks_statistic_normal
from helpers import ELEMENTWISE_SHAPES as SHAPES

from fastdiff.ops import reference
from fastdiff.schedulers import linear_schedule

TABLE = linear_schedule().q_sample_table()  # (1000, 2) [sqrt(abar), sqrt(1 - abar)]
T = TABLE.shape[0]


def make_inputs(shape, dtype, seed=0):
    """x0, noise and per-sample timesteps that include both ends of the table."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g).to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype)
    t = torch.randint(0, T, (shape[0],), generator=g)
    t[0] = T - 1
    t[-1] = 0
    return x0, t, noise


def draw_eps(shape, seed, offset, block=kernel.BLOCK):
    x0 = torch.zeros(shape)
    _, eps = kernel.q_sample(x0, torch.zeros(shape[0], dtype=torch.int64), TABLE, rng=torch.tensor([seed, offset]),
                             block=block)
    return eps


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", kernel.NOISE_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(shape, mode, dtype):
    x0, t, noise = make_inputs(shape, dtype)
    noise_args = {"noise": noise} if mode == "given" else {"rng": torch.tensor([99, 2**32 * 3 + 17])}
    x_t, eps = kernel.q_sample(x0, t, TABLE, **noise_args)
    ref_x_t, ref_eps = reference.q_sample(x0, t, TABLE, **noise_args)
    assert x_t.dtype == dtype and eps.dtype == dtype  # drawn eps is rounded to x0's dtype
    assert_close(x_t, ref_x_t, msg="x_t")
    assert_close(eps, ref_eps, msg="eps")
    if mode == "given":
        assert torch.equal(eps, noise)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_x_t_is_built_from_the_returned_eps(dtype):
    # Drawn noise is rounded to x0's dtype before use, so the loss sees the eps of x_t. (Exact:
    # the interpreter's fp32 math and fp16 rounding are torch's; its bf16 rounding is not.)
    x0, t, _ = make_inputs((3, 3, 7, 5), dtype)
    x_t, eps = kernel.q_sample(x0, t, TABLE, rng=torch.tensor([6, 6]))
    c = TABLE[t].reshape(-1, 2, 1, 1, 1)
    assert torch.equal(x_t, (c[:, 0] * x0.float() + c[:, 1] * eps.float()).to(dtype))


def test_small_blocks_cover_every_element():
    x0, t, _ = make_inputs((3, 3, 7, 5), torch.float32)
    rng = torch.tensor([5, 6])
    x_t, eps = kernel.q_sample(x0, t, TABLE, rng=rng, block=32)  # four programs per sample
    ref_x_t, ref_eps = reference.q_sample(x0, t, TABLE, rng=rng)
    assert_close(x_t, ref_x_t)
    assert_close(eps, ref_eps)


def test_given_noise_keeps_its_dtype():
    x0, t, _ = make_inputs((3, 3, 7, 5), torch.bfloat16)
    noise = torch.randn(3, 3, 7, 5)
    x_t, eps = kernel.q_sample(x0, t, TABLE, noise=noise)
    ref_x_t, _ = reference.q_sample(x0, t, TABLE, noise=noise)
    assert x_t.dtype == torch.bfloat16 and eps.dtype == torch.float32
    assert torch.equal(eps, noise)
    assert_close(x_t, ref_x_t)


def test_int32_timesteps():
    x0, t, noise = make_inputs((3, 3, 7, 5), torch.float32)
    x_t, _ = kernel.q_sample(x0, t.int(), TABLE, noise=noise)
    assert_close(x_t, reference.q_sample(x0, t, TABLE, noise=noise)[0])


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(3, 5, 7, 4, generator=g).transpose(1, 3)
    noise = torch.randn(3, 4, 7, 10, generator=g)[..., ::2]
    t = torch.tensor([1, 10, 100, 999, 0, 5])[::2]
    assert not (x0.is_contiguous() or noise.is_contiguous() or t.is_contiguous())
    for extra in ({"noise": noise}, {"rng": torch.tensor([1, 1])}):
        x_t, eps = kernel.q_sample(x0, t, TABLE, **extra)
        ref_x_t, ref_eps = reference.q_sample(x0, t, TABLE, **extra)
        assert x_t.is_contiguous() and eps.is_contiguous()
        assert_close(x_t, ref_x_t)
        assert_close(eps, ref_eps)


def test_nan_propagates():
    x0, t, noise = make_inputs((2, 16), torch.float32)
    x0[0, 3] = float("nan")
    noise[1, 5] = float("nan")
    x_t, eps = kernel.q_sample(x0, t, TABLE, noise=noise)
    assert x_t[0, 3].isnan() and x_t[1, 5].isnan() and x_t.isnan().sum() == 2
    assert_close(x_t, reference.q_sample(x0, t, TABLE, noise=noise)[0])


def test_out_of_range_t_gives_nan_for_that_sample_only():
    x0, _, _ = make_inputs((3, 2, 4, 4), torch.float32)
    x_t, eps = kernel.q_sample(x0, torch.tensor([0, T, -1]), TABLE, rng=torch.tensor([1, 2]))
    assert not x_t[0].isnan().any()
    assert x_t[1:].isnan().all()
    assert not eps.isnan().any()


# ---------------------------------------------------------------- in-kernel Philox noise


@pytest.mark.parametrize(
    "seed, offset",
    [(0, 0), (1234, 5), (2**40 + 3, 2**35 + 2**31 + 11), (-7, -3)],
    ids=["zero", "small", "high-words", "negative"],
)
def test_noise_matches_reference_philox(seed, offset):
    eps = draw_eps((3, 3, 7, 5), seed, offset)
    expected = reference.philox_noise_like(eps, seed, offset & 0xFFFFFFFF, offset >> 32)
    torch.testing.assert_close(eps, expected, rtol=1e-6, atol=1e-6)


def test_noise_statistics():
    eps = draw_eps((4, 2**18), seed=31, offset=7, block=2**18)
    assert abs(eps.mean().item()) < 1e-2
    assert abs(eps.std().item() - 1) < 1e-2
    assert ks_statistic_normal(eps) < 1e-2
    assert eps.mean(dim=1).abs().max() < 1e-2


def test_noise_is_reproducible_and_keyed_by_seed_and_both_offset_words():
    shape = (3, 3, 7, 5)
    eps = draw_eps(shape, seed=11, offset=4)
    assert torch.equal(eps, draw_eps(shape, seed=11, offset=4))
    for seed, offset in ((12, 4), (11, 5), (11, 2**32 + 4)):  # seed, low word, high word
        other = draw_eps(shape, seed, offset)
        assert (other == eps).float().mean() < 1e-2, f"noise did not change for seed {seed}, offset {offset}"


def test_sample_noise_does_not_depend_on_batch_size():
    alone = draw_eps((1, 3, 7, 5), seed=8, offset=2)
    batch = draw_eps((3, 3, 7, 5), seed=8, offset=2)
    assert torch.equal(batch[:1], alone)
    assert (batch[1] == batch[2]).float().mean() < 1e-2


# ---------------------------------------------------------------- compiled kernel on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("mode", kernel.NOISE_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_matches_reference(dtype, mode):
    x0, t, noise = make_inputs((256, 3, 32, 32), dtype)
    noise_args = {"noise": noise} if mode == "given" else {"rng": torch.tensor([77, 2**33 + 1])}
    x_t, eps = kernel.q_sample(x0.cuda(), t.cuda(), TABLE.cuda(), **{k: v.cuda() for k, v in noise_args.items()})
    ref_x_t, ref_eps = reference.q_sample(x0, t, TABLE, **noise_args)
    # The GPU may fuse multiply-adds: up to a rounding step of x0's dtype from the CPU reference.
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(x_t.cpu(), ref_x_t, rtol=rtol, atol=atol)
    torch.testing.assert_close(eps.cpu(), ref_eps, rtol=rtol, atol=atol)
