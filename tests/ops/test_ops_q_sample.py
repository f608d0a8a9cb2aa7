"""The registered ``fastdiff::q_sample`` op: routes, argument checks, torch.library and
torch.compile integration, and equivalence with diffusers' ``DDPMScheduler.add_noise``."""
import fastdiff.kernels.q_sample as q_sample_kernel
import pytest
import torch
from helpers import assert_close, count_launches

from fastdiff.ops import q_sample, reference
from fastdiff.schedulers import linear_schedule

SCHEDULE = linear_schedule()
TABLE = SCHEDULE.q_sample_table()
T = SCHEDULE.num_timesteps
SHAPE = (3, 3, 7, 5)
TIMESTEPS = torch.tensor([999, 0, 421])


def make_inputs(shape=SHAPE, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(2)]  # x0, noise


@pytest.fixture
def launches(monkeypatch):
    return count_launches(monkeypatch, q_sample_kernel, "q_sample")


NOISE_ARGS = {
    "given": lambda noise: {"noise": noise},
    "philox": lambda noise: {"rng": torch.tensor([77, 2**32 + 9])},
}


@pytest.mark.parametrize("mode", NOISE_ARGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(route, launches, dtype, mode):
    x0, noise = make_inputs(dtype=dtype)
    extra = NOISE_ARGS[mode](noise)
    for t in (TIMESTEPS, TIMESTEPS.int()):
        x_t, eps = q_sample(x0, t, TABLE, **extra)
        ref_x_t, ref_eps = reference.q_sample(x0, t, TABLE, **extra)
        assert x_t.dtype == dtype and eps.dtype == dtype
        assert_close(x_t, ref_x_t)
        assert_close(eps, ref_eps)
    assert len(launches) == (2 if route == "interpreted" else 0)


def test_given_noise_comes_back_unchanged(route):
    x0, _ = make_inputs(dtype=torch.float16)
    noise = torch.randn(SHAPE)  # fp32 noise for fp16 samples keeps its dtype
    x_t, eps = q_sample(x0, TIMESTEPS, TABLE, noise=noise)
    assert x_t.dtype == torch.float16 and torch.equal(eps, noise)


def test_non_contiguous_and_nan(route):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 5, 7, 4, generator=g).transpose(1, 3)
    x0[2, 1, 0, 3] = float("nan")
    t = torch.tensor([3, 0, 500, 7, 999, 1])[::2]
    x_t, eps = q_sample(x0, t, TABLE, rng=torch.tensor([4, 4]))
    ref_x_t, ref_eps = reference.q_sample(x0, t, TABLE, rng=torch.tensor([4, 4]))
    assert x_t[2, 1, 0, 3].isnan() and x_t.isnan().sum() == 1
    assert_close(x_t, ref_x_t)
    assert_close(eps, ref_eps)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (3, 0)], ids=["no-samples", "empty-samples"])
@pytest.mark.parametrize("mode", NOISE_ARGS)
def test_empty_input_gives_empty_outputs_without_a_launch(route, launches, shape, mode):
    x0, noise = make_inputs(shape, torch.bfloat16)
    x_t, eps = q_sample(x0, torch.zeros(shape[0], dtype=torch.int64), TABLE, **NOISE_ARGS[mode](noise))
    assert x_t.shape == eps.shape == shape and x_t.dtype == eps.dtype == torch.bfloat16
    assert launches == []


@pytest.mark.parametrize("bad_t", [-1, T])
@pytest.mark.parametrize("mode", NOISE_ARGS)
def test_cpu_t_out_of_range_raises(route, bad_t, mode):
    x0, noise = make_inputs()
    with pytest.raises(ValueError, match=r"^t must lie in \[0, 1000\)"):
        q_sample(x0, torch.tensor([5, bad_t, 6]), TABLE, **NOISE_ARGS[mode](noise))


# ---------------------------------------------------------------- bad arguments


def _valid_args():
    x0, noise = make_inputs()
    return {"x0": x0, "t": TIMESTEPS, "coefs": TABLE, "noise": noise, "rng": torch.tensor([1, 2])}


BAD_ARGUMENTS = [
    # (argument, bad value, error type)
    ("x0", [[1.0]], TypeError),
    ("x0", torch.zeros(SHAPE, dtype=torch.float64), TypeError),
    ("x0", torch.tensor(1.0), ValueError),
    ("t", torch.tensor([1.0, 2.0, 3.0]), TypeError),
    ("t", torch.tensor([1, 2]), ValueError),
    ("t", torch.tensor([[1], [2], [3]]), ValueError),
    ("t", torch.tensor([1, 2, 3], device="meta"), RuntimeError),
    ("coefs", TABLE.double(), TypeError),
    ("coefs", torch.zeros(T, 3), ValueError),
    ("coefs", TABLE[:, 0], ValueError),
    ("coefs", torch.zeros(0, 2), ValueError),
    ("coefs", torch.zeros(T, 2, device="meta"), RuntimeError),
    ("noise", torch.zeros(3, 3, 7), ValueError),
    ("noise", torch.zeros(SHAPE, dtype=torch.int64), TypeError),
    ("noise", torch.zeros(SHAPE, device="meta"), RuntimeError),
    ("rng", torch.tensor([1, 2], dtype=torch.int32), TypeError),
    ("rng", torch.tensor([[1, 2]]), ValueError),
    ("rng", torch.tensor([1, 2], device="meta"), RuntimeError),
]


@pytest.mark.parametrize(
    "name, value, error", BAD_ARGUMENTS, ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(BAD_ARGUMENTS)]
)
def test_bad_argument_raises_naming_it(name, value, error):
    args = {**_valid_args(), name: value}
    with pytest.raises(error, match=rf"^{name}\b"):
        q_sample(**args)


def test_needs_noise_or_rng():
    x0, _ = make_inputs()
    with pytest.raises(ValueError, match=r"^noise or rng must be given"):
        q_sample(x0, TIMESTEPS, TABLE)


# ---------------------------------------------------------------- torch.library and torch.compile


@pytest.mark.parametrize("mode", NOISE_ARGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(dtype, mode):
    x0, noise = make_inputs(dtype=dtype)
    extra = NOISE_ARGS[mode](noise)
    args = (x0, TIMESTEPS, TABLE, extra.get("noise"), extra.get("rng"))
    torch.library.opcheck(torch.ops.fastdiff.q_sample.default, args)


@pytest.mark.parametrize("mode", NOISE_ARGS)
def test_compiles_without_graph_breaks(route, launches, mode):
    # As in training: x0 is data (no grad), t and rng are fresh device tensors each step.
    x0, noise = make_inputs()
    assert not x0.requires_grad
    extra = NOISE_ARGS[mode](noise)

    def noised(x0, t):
        return q_sample(x0, t, TABLE, **extra)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(noised)(x0, TIMESTEPS)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(noised, fullgraph=True, backend="aot_eager")(x0, TIMESTEPS)
    eager = noised(x0, TIMESTEPS)
    assert_close(compiled[0], eager[0])
    assert_close(compiled[1], eager[1])
    assert (len(launches) > 0) == (route == "interpreted")


# ---------------------------------------------------------------- diffusers


#: diffusers builds abar with a float32 cumprod; fastdiff in float64, rounding only the table.
DIFFUSERS_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def test_matches_diffusers_add_noise(interpreted):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T)
    x0, noise = make_inputs((4, 3, 8, 8))
    t = torch.tensor([0, 1, 500, 999])
    x_t, eps = q_sample(x0, t, TABLE, noise=noise)
    torch.testing.assert_close(x_t, scheduler.add_noise(x0, noise, t), **DIFFUSERS_TOLERANCE)
    # With in-kernel noise, the returned eps is the noise diffusers would have to add.
    x_t, eps = q_sample(x0, t, TABLE, rng=torch.tensor([3, 1]))
    torch.testing.assert_close(x_t, scheduler.add_noise(x0, eps, t), **DIFFUSERS_TOLERANCE)
