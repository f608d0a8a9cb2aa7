"""One fixture decides where the kernel tests run: on a machine with a CUDA GPU the Triton
launchers get CUDA tensors (the compiled kernels run), elsewhere Triton's interpreter runs them
on the CPU tensors the tests build (TRITON_INTERPRET=1, set in tests/conftest.py).

The tests build their inputs and references on the CPU; on a GPU machine every launcher of
``fastdiff.kernels`` is wrapped so CPU tensor arguments go to the GPU and the results come
back to the CPU, where the tests compare them. CUDA tensors a test passes itself stay as they are.
"""
import pytest
from kernel_routing import kernel_device, launchers, routed_to


@pytest.fixture(autouse=True)
def kernels_on_the_test_device(monkeypatch):
    device = kernel_device()
    if device.type == "cuda":
        for module, name in launchers():
            monkeypatch.setattr(module, name, routed_to(getattr(module, name), device))
    yield device
