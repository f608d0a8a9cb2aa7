"""Test-wide set-up. Without a GPU, kernels run under Triton's interpreter, which must be
switched on before anything imports triton. The compiled-artifact cache is a temporary folder
of this session (subprocesses inherit it): no test reads or writes the user's cache."""
import atexit
import os
import shutil
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ["FASTDIFF_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastdiff-test-cache-")
atexit.register(shutil.rmtree, os.environ["FASTDIFF_CACHE_DIR"], True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def interpreted():
    """Run fastdiff ops on CPU tensors through the Triton kernels (interpreter). Skipped where
    the interpreter is off (a GPU machine): there the `gpu` tests run the real kernels."""
    from fastdiff.ops.backend import interpreted_kernels, interpreter_active

    if not interpreter_active():
        pytest.skip("TRITON_INTERPRET is off: the kernels run on the GPU instead")

    with interpreted_kernels():
        yield


@pytest.fixture(params=["reference", "interpreted"])
def route(request):
    """Runs an op test on the eager-reference route and on the interpreted-kernel route."""
    if request.param == "interpreted":
        request.getfixturevalue("interpreted")
    return request.param
