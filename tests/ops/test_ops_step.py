"""The registered ``fastdiff::sampler_step`` op: routes, argument checks, torch.library and
torch.compile integration, equivalence with diffusers' schedulers, and CUDA graph replay."""
import fastdiff.kernels.sampler_step as step_kernel
import pytest
import torch
from helpers import assert_close, count_launches

from fastdiff.ops import reference, sampler_step
from fastdiff.schedulers import ddim_table, ddpm_table, linear_schedule
from fastdiff.schedulers.dpmsolver import dpmsolver_table
from fastdiff.schedulers.unipc import unipc_table

SCHEDULE = linear_schedule()
TABLE = ddpm_table(SCHEDULE, steps=10, form="diffusers")
#: DPM-Solver++(3M) SDE: two history columns and noise.
MULTISTEP = dpmsolver_table(SCHEDULE, steps=10, order=3, algorithm="sde-dpmsolver++")
#: UniPC of order 3: three data predictions and the corrected sample, 8 + 2 * 4 columns.
CORRECTOR = unipc_table(SCHEDULE, steps=10, order=3)
SHAPE = (3, 3, 7, 5)


def make_inputs(shape=SHAPE, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(2 * torch.randn(shape, generator=g)).to(dtype) for _ in range(3)]  # x_t, eps, noise


@pytest.fixture
def launches(monkeypatch):
    return count_launches(monkeypatch, step_kernel, "sampler_step")


NOISE_ARGS = {
    "none": lambda noise: {},
    "given": lambda noise: {"noise": noise},
    "philox": lambda noise: {"rng": torch.tensor([2024, 3])},
    "philox-first-sample": lambda noise: {"rng": torch.tensor([2024, 3, 40])},  # samples numbered from 40
}


@pytest.mark.parametrize("mode", NOISE_ARGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(route, launches, dtype, mode):
    x_t, eps, noise = make_inputs(dtype=dtype)
    extra = NOISE_ARGS[mode](noise)
    for step_index in (torch.tensor(4), torch.tensor([7], dtype=torch.int32)):
        x_prev, x0 = sampler_step(x_t, eps, step_index, TABLE.coefs, clip_range=TABLE.clip, **extra)
        ref_prev, ref_x0 = reference.sampler_step(x_t, eps, step_index, TABLE.coefs, clip_range=TABLE.clip, **extra)
        assert x_prev.dtype == x0.dtype == dtype
        assert_close(x_prev, ref_prev)
        assert_close(x0, ref_x0)
    assert len(launches) == (2 if route == "interpreted" else 0)


def test_non_contiguous_and_nan(route):
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(3, 5, 7, 4, generator=g).transpose(1, 3)
    eps = torch.randn(3, 4, 7, 10, generator=g)[..., ::2]
    x_t[1, 2, 3, 4] = float("nan")
    rng = torch.tensor([5, 5])
    x_prev, x0 = sampler_step(x_t, eps, torch.tensor(2), TABLE.coefs, rng=rng, clip_range=1.0)
    ref_prev, ref_x0 = reference.sampler_step(x_t, eps, torch.tensor(2), TABLE.coefs, rng=rng, clip_range=1.0)
    assert x_prev[1, 2, 3, 4].isnan() and x0[1, 2, 3, 4].isnan() and x_prev.isnan().sum() == 1
    assert_close(x_prev, ref_prev)
    assert_close(x0, ref_x0)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (3, 0)], ids=["no-samples", "empty-samples"])
def test_empty_input_gives_empty_outputs_without_a_launch(route, launches, shape):
    x_t, eps, _ = make_inputs(shape, torch.bfloat16)
    x_prev, x0 = sampler_step(x_t, eps, torch.tensor(1), TABLE.coefs, rng=torch.tensor([1, 1]), clip_range=1.0)
    assert x_prev.shape == x0.shape == shape and x_prev.dtype == x0.dtype == torch.bfloat16
    assert launches == []


@pytest.mark.parametrize("step", [-1, TABLE.num_steps])
@pytest.mark.parametrize("mode", NOISE_ARGS)
def test_cpu_step_index_out_of_range_raises(route, step, mode):
    x_t, eps, noise = make_inputs()
    with pytest.raises(ValueError, match=r"^step_index must lie in \[0, 10\)"):
        sampler_step(x_t, eps, torch.tensor(step), TABLE.coefs, **NOISE_ARGS[mode](noise))


@pytest.mark.parametrize("mode", NOISE_ARGS)
def test_history_matches_reference_and_is_updated_in_place(route, launches, mode):
    x_t, eps, noise = make_inputs()
    extra = NOISE_ARGS[mode](noise)
    history = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(2))
    ref_history = history.clone()
    buffer = history.data_ptr()
    x_prev, x0 = sampler_step(x_t, eps, torch.tensor(6), MULTISTEP.coefs, history=history, **extra)
    ref_prev, ref_x0 = reference.sampler_step(x_t, eps, torch.tensor(6), MULTISTEP.coefs, history=ref_history, **extra)
    assert_close(x_prev, ref_prev)
    assert_close(x0, ref_x0)
    assert history.data_ptr() == buffer
    assert_close(history, ref_history)
    assert torch.equal(history[0], x0)
    assert len(launches) == (1 if route == "interpreted" else 0)


def test_corrector_history_matches_reference_and_is_updated_in_place(route, launches):
    x_t, eps, _ = make_inputs()
    history = torch.randn((4, *SHAPE), generator=torch.Generator().manual_seed(2))
    ref_history, before = history.clone(), history.clone()
    x_prev, x0 = sampler_step(x_t, eps, torch.tensor(6), CORRECTOR.coefs, history=history)
    ref_prev, _ = reference.sampler_step(x_t, eps, torch.tensor(6), CORRECTOR.coefs, history=ref_history)
    assert_close(x_prev, ref_prev)
    assert_close(history, ref_history)
    assert torch.equal(history[0], x0) and torch.equal(history[1:3], before[0:2])  # data slots shifted
    assert not torch.equal(history[3], before[3]) and not torch.equal(history[3], x_t)  # the corrected sample
    assert len(launches) == (1 if route == "interpreted" else 0)


# ---------------------------------------------------------------- bad arguments


def _valid_args():
    x_t, eps, noise = make_inputs()
    return {"x_t": x_t, "eps": eps, "step_index": torch.tensor(1), "coefs": TABLE.coefs, "noise": noise,
            "rng": torch.tensor([1, 2]), "clip_range": 1.0}


BAD_ARGUMENTS = [
    # (argument, bad value, error type)
    ("x_t", [[1.0]], TypeError),
    ("x_t", torch.zeros(SHAPE, dtype=torch.float64), TypeError),
    ("x_t", torch.zeros(SHAPE, dtype=torch.int64), TypeError),
    ("x_t", torch.tensor(1.0), ValueError),
    ("eps", torch.zeros(3, 3, 7, 4), ValueError),
    ("eps", torch.zeros(SHAPE, dtype=torch.int32), TypeError),
    ("step_index", torch.tensor(1.0), TypeError),
    ("step_index", torch.tensor([1, 2]), ValueError),
    ("step_index", torch.tensor([[1]]), ValueError),
    ("step_index", 1, TypeError),
    ("coefs", TABLE.coefs.double(), TypeError),
    ("coefs", TABLE.coefs[:, :5], ValueError),
    ("coefs", TABLE.coefs[0], ValueError),
    ("coefs", torch.zeros(0, 6), ValueError),
    ("coefs", torch.zeros(10, 6, device="meta"), RuntimeError),
    ("noise", torch.zeros(3, 3, 7), ValueError),
    ("noise", torch.zeros(SHAPE, dtype=torch.int64), TypeError),
    ("noise", torch.zeros(SHAPE, device="meta"), RuntimeError),
    ("rng", torch.tensor([1, 2], dtype=torch.int32), TypeError),
    ("rng", torch.tensor([1, 2, 3, 4]), ValueError),
    ("rng", torch.tensor([1, 2], device="meta"), RuntimeError),
    ("clip_range", 0.0, ValueError),
    ("clip_range", float("nan"), ValueError),
    ("clip_range", "1", TypeError),
    ("step_index", torch.tensor(1, device="meta"), RuntimeError),
    ("history", torch.zeros((1, *SHAPE)), ValueError),  # a DDPM table has no history columns
]


def _valid_multistep_args():
    return {**_valid_args(), "coefs": MULTISTEP.coefs, "history": MULTISTEP.new_history(SHAPE)}


BAD_HISTORIES = [
    (None, ValueError),
    (torch.zeros((1, *SHAPE)), ValueError),
    (torch.zeros((2, 3, 3, 7, 4)), ValueError),
    (torch.zeros(SHAPE), ValueError),
    (torch.zeros((2, *SHAPE), dtype=torch.float64), TypeError),
    (torch.zeros((2, 3, 3, 7, 10))[..., ::2], ValueError),
    (torch.zeros((2, *SHAPE), device="meta"), RuntimeError),
    ([[0.0]], TypeError),
]


@pytest.mark.parametrize("value, error", BAD_HISTORIES, ids=[f"history-{i}" for i in range(len(BAD_HISTORIES))])
def test_bad_history_raises_naming_it(value, error):
    with pytest.raises(error, match=r"^history\b"):
        sampler_step(**{**_valid_multistep_args(), "history": value})


@pytest.mark.parametrize("slots", [1, 3, 5], ids=["too-few", "too-many", "over-max"])
def test_history_that_does_not_fit_a_corrector_table_raises(slots):
    with pytest.raises(ValueError, match=r"^history must have shape \(K, \*x_t.shape\)"):
        sampler_step(**{**_valid_args(), "coefs": CORRECTOR.coefs, "history": torch.zeros((slots, *SHAPE))})


def test_coefs_with_too_many_history_columns_raise():
    coefs = torch.zeros(10, 17)  # the corrector's layout with K = 5 > MAX_HISTORY
    with pytest.raises(ValueError, match=r"^coefs must have shape \(S, 6 \+ K\)"):
        sampler_step(**{**_valid_multistep_args(), "coefs": coefs, "history": torch.zeros((5, *SHAPE))})


@pytest.mark.parametrize(
    "name, value, error", BAD_ARGUMENTS, ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(BAD_ARGUMENTS)]
)
def test_bad_argument_raises_naming_it(name, value, error):
    args = {**_valid_args(), name: value}
    with pytest.raises(error, match=rf"^{name}\b"):
        sampler_step(**args)


# ---------------------------------------------------------------- torch.library and torch.compile


@pytest.mark.parametrize("mode", NOISE_ARGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(dtype, mode):
    x_t, eps, noise = make_inputs(dtype=dtype)
    extra = NOISE_ARGS[mode](noise)
    args = (x_t, eps, torch.tensor(3), TABLE.coefs, extra.get("noise"), extra.get("rng"), TABLE.clip)
    torch.library.opcheck(torch.ops.fastdiff.sampler_step.default, args)
    history = torch.randn((2, *x_t.shape)).to(dtype)
    args = (x_t, eps, torch.tensor(3), MULTISTEP.coefs, extra.get("noise"), extra.get("rng"), None, history)
    torch.library.opcheck(torch.ops.fastdiff.sampler_step.default, args)


@pytest.mark.parametrize("mode", NOISE_ARGS)
def test_multistep_compiles_without_graph_breaks(route, launches, mode):
    x_t, eps, noise = make_inputs()
    extra = NOISE_ARGS[mode](noise)

    def step(x_t, eps, step_index, history):
        x_prev, _ = sampler_step(x_t, eps, step_index, MULTISTEP.coefs, history=history, **extra)
        return x_prev

    torch._dynamo.reset()
    history = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(5))
    explanation = torch._dynamo.explain(step)(x_t, eps, torch.tensor(5), history.clone())
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled_history, eager_history = history.clone(), history.clone()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x_t, eps, torch.tensor(5), compiled_history)
    eager = step(x_t, eps, torch.tensor(5), eager_history)
    assert_close(compiled, eager)
    assert_close(compiled_history, eager_history)
    assert not torch.equal(compiled_history, history)  # the mutation reached the caller's buffer


@pytest.mark.parametrize("mode", NOISE_ARGS)
def test_compiles_without_graph_breaks(route, launches, mode):
    x_t, eps, noise = make_inputs()
    extra = NOISE_ARGS[mode](noise)

    def step(x_t, eps, step_index):
        return sampler_step(x_t, eps, step_index, TABLE.coefs, clip_range=TABLE.clip, **extra)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(x_t, eps, torch.tensor(5))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x_t, eps, torch.tensor(5))
    eager = step(x_t, eps, torch.tensor(5))
    assert_close(compiled[0], eager[0])
    assert_close(compiled[1], eager[1])
    assert (len(launches) > 0) == (route == "interpreted")


# ---------------------------------------------------------------- diffusers' schedulers


def _diffusers_cases():
    from diffusers import DDIMScheduler, DDPMScheduler

    return {
        "ddpm-fixed_large-clip": (DDPMScheduler(variance_type="fixed_large", clip_sample=True), {},
                                  ddpm_table(SCHEDULE, 10, "fixed_large", form="diffusers")),
        "ddpm-fixed_small": (DDPMScheduler(variance_type="fixed_small", clip_sample=False), {},
                             ddpm_table(SCHEDULE, 10, "fixed_small", form="diffusers", clip_sample=False)),
        "ddim-eta0": (DDIMScheduler(clip_sample=False), {"eta": 0.0}, ddim_table(SCHEDULE, 10, eta=0.0)),
        "ddim-eta0.5-clip": (DDIMScheduler(clip_sample=True), {"eta": 0.5},
                             ddim_table(SCHEDULE, 10, eta=0.5, clip_sample=True)),
        "ddim-eta0.5-clipped-eps": (
            DDIMScheduler(clip_sample=True, set_alpha_to_one=False), {"eta": 0.5, "use_clipped_model_output": True},
            ddim_table(SCHEDULE, 10, eta=0.5, clip_sample=True, set_alpha_to_one=False, use_clipped_model_output=True)),
    }


#: diffusers builds abar with a float32 cumprod; fastdiff in float64, rounding only the final
#: coefficients. Measured: x0 and x_prev agree to ~2e-7 relative, 1e-5 absolute.
DIFFUSERS_TOLERANCE = {"rtol": 1e-5, "atol": 5e-5}


@pytest.mark.parametrize("case", ["ddpm-fixed_large-clip", "ddpm-fixed_small", "ddim-eta0", "ddim-eta0.5-clip",
                                  "ddim-eta0.5-clipped-eps"])
def test_matches_diffusers_scheduler_step(interpreted, case):
    pytest.importorskip("diffusers")
    scheduler, step_kwargs, table = _diffusers_cases()[case]
    scheduler.set_timesteps(10)
    assert torch.equal(scheduler.timesteps, table.timesteps)
    shape = (2, 3, 8, 8)
    for i, t in enumerate(scheduler.timesteps):
        x_t, eps, _ = make_inputs(shape, seed=i)
        # diffusers draws its noise with torch.randn(shape, generator=...) on CPU: draw the same.
        out = scheduler.step(eps, t, x_t, generator=torch.Generator().manual_seed(100 + i), **step_kwargs)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(100 + i))
        x_prev, x0 = sampler_step(x_t, eps, torch.tensor(i), table.coefs, noise=noise, clip_range=table.clip)
        torch.testing.assert_close(x0, out.pred_original_sample, **DIFFUSERS_TOLERANCE, msg=f"x0 at t={int(t)}")
        torch.testing.assert_close(x_prev, out.prev_sample, **DIFFUSERS_TOLERANCE, msg=f"x_prev at t={int(t)}")


# ---------------------------------------------------------------- CUDA graphs


@pytest.mark.gpu
def test_cuda_graph_replays_every_step_with_fresh_noise():
    """Capture the step once, replay it per step with only the device step index updated."""
    table = TABLE.to("cuda")
    # x_prev = z: shows the noise itself, drawn in the same graph as the real update.
    noise_only = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]], device="cuda").expand(TABLE.num_steps, 6).contiguous()
    x_t, eps, _ = (t.cuda() for t in make_inputs((4, 3, 32, 32)))
    step_index = torch.zeros((), dtype=torch.int64, device="cuda")
    rng = torch.tensor([123, 4], device="cuda")

    def step():
        x_prev, _ = sampler_step(x_t, eps, step_index, table.coefs, rng=rng, clip_range=table.clip)
        z, _ = sampler_step(x_t, eps, step_index, noise_only, rng=rng)
        return x_prev, z

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles the kernels outside the capture
        torch.cuda.set_sync_debug_mode("error")  # the step must never sync with the host
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x_prev, z = step()

    results = []
    for i in range(TABLE.num_steps):
        step_index.copy_(torch.tensor(i))
        graph.replay()
        results.append((x_prev.clone(), z.clone()))
    torch.cuda.synchronize()

    x_cpu, eps_cpu = x_t.cpu(), eps.cpu()
    for i, (got_prev, got_z) in enumerate(results):
        ref_prev, _ = reference.sampler_step(x_cpu, eps_cpu, torch.tensor(i), TABLE.coefs, rng=rng.cpu(),
                                             clip_range=TABLE.clip)
        assert_close(got_prev.cpu(), ref_prev, msg=f"x_prev at step {i}")
        torch.testing.assert_close(got_z.cpu(), reference.philox_noise_like(x_cpu, 123, 4, i), rtol=1e-5, atol=1e-5)
    for i in range(1, TABLE.num_steps):
        assert (results[i][1] == results[i - 1][1]).float().mean() < 1e-2, f"noise repeated at step {i}"


def test_out_of_range_indices_raise_under_torch_compile():
    """Inductor wrapped -1 to the last row (step 9, t = 999); the check now survives compilation."""
    from fastdiff.ops import q_sample
    from fastdiff.schedulers import linear_schedule

    x_t, eps, noise = make_inputs()
    q_table = linear_schedule().q_sample_table()

    def step_and_q_sample(step_index, t):
        x_prev, _ = sampler_step(x_t, eps, step_index, TABLE.coefs, noise=noise)
        x_q, _ = q_sample(x_t, t, q_table, noise=noise)
        return x_prev + x_q

    torch._dynamo.reset()
    compiled = torch.compile(step_and_q_sample)
    good_t = torch.zeros(x_t.shape[0], dtype=torch.int64)
    assert_close(compiled(torch.tensor(9), good_t), step_and_q_sample(torch.tensor(9), good_t))
    with pytest.raises(RuntimeError, match=r"step_index must lie in \[0, 10\)"):
        compiled(torch.tensor(-1), good_t)
    with pytest.raises(RuntimeError, match=r"t must lie in \[0, 1000\)"):
        compiled(torch.tensor(9), good_t - 1)
