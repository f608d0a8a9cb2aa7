"""The kernel tests' device fixture (tests/kernels/conftest.py): it must reach every launcher."""
import torch
from kernel_routing import kernel_device, launchers, routed_to


def test_every_kernel_launcher_is_routed():
    names = {f"{module.__name__.rsplit('.', 1)[-1]}.{name}" for module, name in launchers()}
    for launcher in ("group_norm.group_norm_silu", "attention.attention", "q_sample.q_sample",
                     "sampler_step.sampler_step"):
        assert launcher in names
    assert not any(name.endswith("_kernel") or ".aot_" in name for name in names)


def test_kernel_device_follows_the_machine():
    assert kernel_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_on_device_moves_cpu_tensors_only():
    seen = []

    def launch(a, b, *, c=None, n=3):
        seen.extend(t.device.type for t in (a, b, c))
        return a + 1, n

    wrapped = routed_to(launch, torch.device("cpu"))
    out, n = wrapped(torch.zeros(2), torch.ones(2), c=torch.ones(1), n=5)
    assert seen == ["cpu"] * 3 and n == 5 and torch.equal(out, torch.ones(2))
