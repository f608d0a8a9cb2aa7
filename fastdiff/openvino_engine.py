"""OpenVINO as the CPU engine of :class:`fastdiff.Sampler`'s model (optional: ``pip install fastdiff[cpu]``).

Measured on this project's 2-core AVX-512-BF16 CPU (the CIFAR-10 UNet, one forward, batch 1,
one thread): OpenVINO with bf16 inference precision ran ~2.2x the fp32 eager forward, where
torch.compile (inductor, freezing, bf16, channels_last) reached ~1.7x. So on a CPU in bf16 the
sampler runs the *model* through OpenVINO; the step maths stay in PyTorch float32
(``fastdiff.ops.sampler_step``), as on every other path.

What is converted is the plain model (``ov.convert_model`` traces it: fastdiff's custom ops do
not convert, and OpenVINO fuses GroupNorm+SiLU and attention itself), once per sampler; each
(batch, class conditioning) key gets a static-shape compile of it. OpenVINO is imported only
when this engine runs.
"""
from __future__ import annotations

import copy
import importlib.util

import numpy as np
import torch
import torch.nn as nn

#: OpenVINO's CPU inference precision for each model dtype the sampler takes.
PRECISIONS = {torch.bfloat16: "bf16", torch.float32: "f32", torch.float16: "f16"}


def available() -> bool:
    """Whether the ``openvino`` package is installed (nothing is imported)."""
    return importlib.util.find_spec("openvino") is not None


def default_precision() -> str:
    """OpenVINO's own default CPU inference precision here (bf16 where the CPU has it)."""
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()


def version() -> str:
    import openvino

    return openvino.__version__.split("-")[0]


class OpenVINOModel(nn.Module):
    """``model`` (an eps model ``(x, t[, class_labels]) -> eps``) run by OpenVINO on the CPU in
    ``dtype``'s precision (None: OpenVINO's default), with PyTorch float32 tensors in and out.
    Compiles per input shape on first use (``prepare``); ``threads`` is OpenVINO's inference
    thread count."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None, threads: int):
        super().__init__()
        if dtype is not None and dtype not in PRECISIONS:
            raise ValueError(f"OpenVINO runs {', '.join(map(str, PRECISIONS))}, got {dtype}")
        self.source = [model]  # a list: not a submodule (OpenVINO holds its own copy of the weights)
        self.precision, self.threads = PRECISIONS.get(dtype), threads
        self._converted = None
        self._requests: dict[tuple, object] = {}

    def _convert(self, example: tuple):
        import openvino as ov

        if self._converted is None:
            model = copy.deepcopy(self.source[0]).float().eval()  # the caller's model keeps its dtype and mode
            with torch.no_grad():
                self._converted = ov.convert_model(model, example_input=example)
        return self._converted

    def prepare(self, inputs: tuple[torch.Tensor, ...]):
        """The infer request for these inputs' shapes, compiled on first use."""
        key = tuple(tuple(i.shape) for i in inputs)
        if key not in self._requests:
            import openvino as ov

            converted = self._convert(inputs)
            converted.reshape({n: list(shape) for n, shape in enumerate(key)})
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.threads}
            if self.precision is not None:
                config["INFERENCE_PRECISION_HINT"] = self.precision
            self._requests[key] = ov.Core().compile_model(converted, "CPU", config).create_infer_request()
        return self._requests[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        inputs = (x.float().contiguous(), t) if class_labels is None else (x.float().contiguous(), t, class_labels)
        request = self.prepare(inputs)
        outputs = request.infer([i.numpy() for i in inputs])
        return torch.from_numpy(np.array(outputs[0], dtype=np.float32))  # a copy: the next infer reuses the buffer
