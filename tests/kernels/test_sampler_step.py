"""The fused sampler step kernel against fastdiff.ops.reference.sampler_step: the interpreter on CPU
tensors here, the compiled kernel in the @gpu tests."""
import pytest
import torch
from fastdiff.kernels import sampler_step as kernel
from helpers import DTYPES, TOLERANCES, assert_close, ks_statistic_normal
from helpers import ELEMENTWISE_SHAPES as SHAPES

from fastdiff.ops import reference
from fastdiff.schedulers import ddpm_table, linear_schedule
from fastdiff.schedulers.dpmsolver import dpmsolver_table
from fastdiff.schedulers.unipc import unipc_table

#: Diffusers-form DDPM over 10 of 1000 steps: x0 clipped, sigma > 0 except at the last step.
TABLE = ddpm_table(linear_schedule(), steps=10, form="diffusers")
#: A one-row table whose update is x_prev = z: isolates the noise.
NOISE_ONLY = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])


def make_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(2 * torch.randn(shape, generator=g)).to(dtype) for _ in range(3)]  # x_t, eps, noise


def draw_noise(shape, seed, offset, step, block=kernel.BLOCK, first_sample=None):
    """The kernel's Philox z for (seed, offset, step), through the NOISE_ONLY update; with
    ``first_sample``, the batch's samples are numbered from it (a third rng word)."""
    zeros = torch.zeros(shape)
    coefs = NOISE_ONLY.expand(step + 1, 6).contiguous()
    rng = torch.tensor([seed, offset] if first_sample is None else [seed, offset, first_sample])
    z, _ = kernel.sampler_step(zeros, zeros, torch.tensor(step), coefs, rng=rng, block=block)
    return z


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", kernel.NOISE_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(shape, mode, dtype):
    x_t, eps, noise = make_inputs(shape, dtype)
    noise_args = {"none": {}, "given": {"noise": noise}, "philox": {"rng": torch.tensor([1234, 5])}}[mode]
    for step in (0, 4, TABLE.num_steps - 1):
        for clip in (None, TABLE.clip):
            step_index = torch.tensor(step)
            x_prev, x0 = kernel.sampler_step(x_t, eps, step_index, TABLE.coefs, clip_range=clip, **noise_args)
            ref_prev, ref_x0 = reference.sampler_step(x_t, eps, step_index, TABLE.coefs, clip_range=clip, **noise_args)
            assert x_prev.dtype == x0.dtype == dtype
            what = f"step {step}, clip {clip}"
            assert_close(x_prev, ref_prev, msg=f"x_prev, {what}")
            assert_close(x0, ref_x0, msg=f"x0, {what}")


def test_small_blocks_cover_every_element():
    # 105 elements per sample in 32-element blocks: four programs per sample, the last ragged.
    x_t, eps, noise = make_inputs((3, 3, 7, 5), torch.float32)
    rng = torch.tensor([7, 0])
    x_prev, x0 = kernel.sampler_step(x_t, eps, torch.tensor(2), TABLE.coefs, rng=rng, clip_range=1.0, block=32)
    ref_prev, ref_x0 = reference.sampler_step(x_t, eps, torch.tensor(2), TABLE.coefs, rng=rng, clip_range=1.0)
    assert_close(x_prev, ref_prev)
    assert_close(x0, ref_x0)


def test_mixed_input_dtypes_follow_x_t():
    x_t, _, _ = make_inputs((3, 3, 7, 5), torch.float32)
    _, eps, _ = make_inputs((3, 3, 7, 5), torch.bfloat16, seed=1)
    _, _, noise = make_inputs((3, 3, 7, 5), torch.float16, seed=2)
    x_prev, x0 = kernel.sampler_step(x_t, eps, torch.tensor(3), TABLE.coefs, noise=noise, clip_range=1.0)
    ref_prev, ref_x0 = reference.sampler_step(x_t, eps, torch.tensor(3), TABLE.coefs, noise=noise, clip_range=1.0)
    assert x_prev.dtype == x0.dtype == torch.float32
    assert_close(x_prev, ref_prev)
    assert_close(x0, ref_x0)


def test_index_shapes_and_dtypes():
    x_t, eps, _ = make_inputs((3, 3, 7, 5), torch.float32)
    expected = reference.sampler_step(x_t, eps, torch.tensor(4), TABLE.coefs, rng=torch.tensor([3, 1]))
    for step_index in (torch.tensor([4]), torch.tensor(4, dtype=torch.int32)):
        got = kernel.sampler_step(x_t, eps, step_index, TABLE.coefs, rng=torch.tensor([3, 1]))
        assert_close(got[0], expected[0])
        assert_close(got[1], expected[1])


def test_without_x0_writes_the_same_x_prev():
    x_t, eps, noise = make_inputs((3, 3, 7, 5), torch.float32)
    with_x0, _ = kernel.sampler_step(x_t, eps, torch.tensor(1), TABLE.coefs, noise=noise, clip_range=1.0)
    x_prev, x0 = kernel.sampler_step(x_t, eps, torch.tensor(1), TABLE.coefs, noise=noise, clip_range=1.0,
                                     write_x0=False)
    assert x0 is None
    assert torch.equal(x_prev, with_x0)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(3, 5, 7, 4, generator=g).transpose(1, 3)  # (3, 4, 7, 5), permuted
    eps = torch.randn(3, 4, 7, 10, generator=g)[..., ::2]  # strided last dim
    noise = torch.randn(5, 3, 7, 4, generator=g).permute(1, 3, 2, 0)
    assert not (x_t.is_contiguous() or eps.is_contiguous() or noise.is_contiguous())
    for extra in ({"noise": noise}, {"rng": torch.tensor([9, 9])}):
        x_prev, x0 = kernel.sampler_step(x_t, eps, torch.tensor(5), TABLE.coefs, clip_range=1.0, **extra)
        ref_prev, ref_x0 = reference.sampler_step(x_t, eps, torch.tensor(5), TABLE.coefs, clip_range=1.0, **extra)
        assert x_prev.is_contiguous() and x0.is_contiguous()
        assert_close(x_prev, ref_prev)
        assert_close(x0, ref_x0)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_nan_propagates(clip):
    x_t, eps, noise = make_inputs((2, 16), torch.float32)
    x_t[0, 3] = float("nan")
    eps[1, 5] = float("nan")
    noise[1, 9] = float("nan")
    x_prev, x0 = kernel.sampler_step(x_t, eps, torch.tensor(2), TABLE.coefs, noise=noise, clip_range=clip)
    assert x0[0, 3].isnan() and x0[1, 5].isnan() and x_prev[0, 3].isnan() and x_prev[1, 5].isnan()
    assert x_prev[1, 9].isnan() and not x0[1, 9].isnan()
    assert x_prev.isnan().sum() == 3
    ref_prev, ref_x0 = reference.sampler_step(x_t, eps, torch.tensor(2), TABLE.coefs, noise=noise, clip_range=clip)
    assert_close(x_prev, ref_prev)
    assert_close(x0, ref_x0)


@pytest.mark.parametrize("step", [-1, TABLE.num_steps])
def test_out_of_range_step_gives_nan_not_a_clamped_row(step):
    x_t, eps, _ = make_inputs((2, 3, 4, 4), torch.float32)
    rng = torch.tensor([1, 2])
    x_prev, x0 = kernel.sampler_step(x_t, eps, torch.tensor(step), TABLE.coefs, rng=rng, clip_range=1.0)
    assert x_prev.isnan().all() and x0.isnan().all()


# ---------------------------------------------------------------- multistep history (DPM-Solver++)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("algorithm, mode", [("dpmsolver++", "none"), ("sde-dpmsolver++", "given"),
                                             ("sde-dpmsolver++", "philox")])
@pytest.mark.parametrize("order", [2, 3])
def test_history_steps_match_reference(shape, algorithm, mode, order):
    """A whole multistep run: x_prev, x0 and the in-place history agree with the reference at
    every step (each step starts both from the reference's state, so errors do not compound)."""
    table = dpmsolver_table(linear_schedule(), steps=6, order=order, algorithm=algorithm)
    x, eps, noise = make_inputs(shape, torch.float32)
    noise_args = {"none": {}, "given": {"noise": noise}, "philox": {"rng": torch.tensor([5, 1])}}[mode]
    history, ref_history = table.new_history(shape), table.new_history(shape)
    for step in range(table.num_steps):
        step_index = torch.tensor(step)
        history.copy_(ref_history)
        x_prev, x0 = kernel.sampler_step(x, eps, step_index, table.coefs, history=history, **noise_args)
        x, ref_x0 = reference.sampler_step(x, eps, step_index, table.coefs, history=ref_history, **noise_args)
        assert_close(x_prev, x, msg=f"x_prev, step {step}")
        assert_close(x0, ref_x0, msg=f"x0, step {step}")
        assert_close(history, ref_history, msg=f"history, step {step}")
        assert torch.equal(history[0], x0)  # the newest data prediction went in first
        eps = torch.sin(3 * x)  # a new model output per step


@pytest.mark.parametrize("table", [dpmsolver_table(linear_schedule(), steps=5, order=3),
                                   unipc_table(linear_schedule(), steps=5, order=3)], ids=["dpmsolver++", "unipc"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_history_update_in_half_dtypes(dtype, table):
    x_t, eps, _ = make_inputs((3, 3, 7, 5), dtype)
    history = torch.randn((table.history_size, 3, 3, 7, 5), generator=torch.Generator().manual_seed(4)).to(dtype)
    ref_history = history.clone()
    x_prev, x0 = kernel.sampler_step(x_t, eps, torch.tensor(3), table.coefs, history=history, block=32)
    ref_prev, ref_x0 = reference.sampler_step(x_t, eps, torch.tensor(3), table.coefs, history=ref_history)
    assert_close(x_prev, ref_prev)
    assert_close(history, ref_history)


# ---------------------------------------------------------------- predictor-corrector history (UniPC)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order, begin, disable", [(1, 0, ()), (2, 0, (2,)), (3, 0, ()), (3, 2, ())])
def test_corrector_steps_match_reference(shape, order, begin, disable):
    """A whole UniPC run (order + 1 slots: data predictions, then the corrected sample): x_prev,
    x0 and the in-place history agree with the reference at every step."""
    table = unipc_table(linear_schedule(), steps=6, order=order, begin=begin, disable_corrector=disable)
    x, eps, _ = make_inputs(shape, torch.float32)
    history, ref_history = table.new_history(shape), table.new_history(shape)
    for step in range(table.num_steps):
        step_index = torch.tensor(step)
        history.copy_(ref_history)
        before = ref_history.clone()
        x_prev, x0 = kernel.sampler_step(x, eps, step_index, table.coefs, history=history)
        ref_prev, ref_x0 = reference.sampler_step(x, eps, step_index, table.coefs, history=ref_history)
        assert_close(x_prev, ref_prev, msg=f"x_prev, step {step}")
        assert_close(x0, ref_x0, msg=f"x0, step {step}")
        assert_close(history, ref_history, msg=f"history, step {step}")
        assert torch.equal(history[0], x0) and torch.equal(history[1:order], before[:order - 1])  # shifted
        if step == 0:  # no correction at a run's first step: the sample slot keeps x_t
            assert torch.equal(history[-1], x)
        x, eps = ref_prev, torch.sin(3 * ref_prev)  # a new model output per step


def test_corrector_out_of_range_step_gives_nan():
    table = unipc_table(linear_schedule(), steps=4, order=2)
    x_t, eps, _ = make_inputs((2, 3, 4, 4), torch.float32)
    x_prev, _ = kernel.sampler_step(x_t, eps, torch.tensor(4), table.coefs, history=table.new_history(x_t.shape))
    assert x_prev.isnan().all()


# ---------------------------------------------------------------- in-kernel Philox noise


@pytest.mark.parametrize(
    "seed, offset, step",
    [
        (0, 0, 0),
        (1234, 5, 7),
        (2**40 + 3, 2**31 + 11, 999),  # seed's high word in use; offset above int32
        (-1, -5, 3),  # negative values are taken modulo 2^64 / 2^32, as in the reference
    ],
)
def test_noise_matches_reference_philox(seed, offset, step):
    z = draw_noise((3, 3, 7, 5), seed, offset, step)
    expected = reference.philox_noise_like(z, seed, offset, step)
    # Same Philox words; only the fp32 log/sqrt/cos of Box-Muller may differ in the last bit.
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-6)


def test_first_sample_word_keys_noise_by_global_image_index():
    # Images 6..8 of a sharded run (fastdiff.scale.shards) draw, in the kernel, the z that
    # shards.image_noise gives them, whichever batch they sit in.
    from fastdiff.scale.shards import image_noise

    z = draw_noise((3, 1, 5, 5), seed=5, offset=0, step=2, first_sample=6)
    expected = image_noise(TABLE, 6, 3, (1, 5, 5), seed=5).z[2]
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-6)
    wider = draw_noise((5, 1, 5, 5), seed=5, offset=0, step=2, first_sample=4)
    torch.testing.assert_close(wider[2:], z, rtol=0, atol=0)
    assert (draw_noise((3, 1, 5, 5), seed=5, offset=0, step=2) == z).float().mean() < 1e-2


def test_noise_statistics():
    # 2^20 draws in four 2^18-element programs: cheap in the interpreter.
    z = draw_noise((4, 2**18), seed=2024, offset=3, step=5, block=2**18)
    assert abs(z.mean().item()) < 1e-2
    assert abs(z.std().item() - 1) < 1e-2
    assert ks_statistic_normal(z) < 1e-2
    per_sample_means = z.mean(dim=1)
    assert per_sample_means.abs().max() < 1e-2  # no sample is shifted


def test_noise_is_reproducible_and_keyed_by_seed_offset_and_step():
    shape = (3, 3, 7, 5)
    z = draw_noise(shape, seed=11, offset=4, step=6)
    assert torch.equal(z, draw_noise(shape, seed=11, offset=4, step=6))
    for changed in ({"seed": 12}, {"offset": 5}, {"step": 7}):
        other = draw_noise(shape, **{"seed": 11, "offset": 4, "step": 6, **changed})
        assert (other == z).float().mean() < 1e-2, f"noise did not change with {changed}"


def test_offset_keys_on_its_low_32_bits():
    shape = (2, 50)
    assert torch.equal(draw_noise(shape, 5, 7, 1), draw_noise(shape, 5, 2**32 + 7, 1))


def test_sample_noise_does_not_depend_on_batch_size():
    alone = draw_noise((1, 3, 7, 5), seed=8, offset=2, step=3)
    pair = draw_noise((2, 3, 7, 5), seed=8, offset=2, step=3)
    batch = draw_noise((3, 3, 7, 5), seed=8, offset=2, step=3)
    assert torch.equal(batch[:1], alone)
    assert torch.equal(batch[:2], pair)
    assert (batch[1] == batch[2]).float().mean() < 1e-2  # samples get different noise


# ---------------------------------------------------------------- compiled kernel on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["given", "philox"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_matches_reference(dtype, mode):
    x_t, eps, noise = make_inputs((256, 3, 32, 32), dtype)
    noise_args = {"noise": noise} if mode == "given" else {"rng": torch.tensor([77, 2**33 + 1])}
    cuda_args = {k: v.cuda() for k, v in noise_args.items()}
    coefs = TABLE.coefs.cuda()
    for step in (0, 5, TABLE.num_steps - 1):
        step_index = torch.tensor(step)
        x_prev, x0 = kernel.sampler_step(x_t.cuda(), eps.cuda(), step_index.cuda(), coefs, clip_range=1.0, **cuda_args)
        ref_prev, ref_x0 = reference.sampler_step(x_t, eps, step_index, TABLE.coefs, clip_range=1.0, **noise_args)
        # The GPU may fuse multiply-adds: up to a rounding step of x_t's dtype from the CPU reference.
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(x_prev.cpu(), ref_prev, rtol=rtol, atol=atol)
        torch.testing.assert_close(x0.cpu(), ref_x0, rtol=rtol, atol=atol)
