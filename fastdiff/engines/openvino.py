"""OpenVINO as the CPU engine of :class:`fastdiff.Sampler`'s model (optional: ``pip install fastdiff[cpu]``).

On a CPU in bf16 OpenVINO runs the UNet faster than torch.compile does (README, "Results"), so
there the sampler runs the *model* through OpenVINO; the step maths stay in PyTorch float32
(``fastdiff.ops.sampler_step``), as on every other path.

What is converted is the plain model (``ov.convert_model`` traces it: fastdiff's custom ops do
not convert, and OpenVINO fuses GroupNorm+SiLU and attention itself), once per sampler; each
(batch, class conditioning) key gets a static-shape compile of it. OpenVINO is imported only
when this engine runs.

With an :class:`~fastdiff.engines.cache.ArtifactCache` both are kept: the converted model as
OpenVINO IR (``ov.save_model``, uncompressed: converting is most of the time) and each compiled
model as OpenVINO's exported blob (``export_model`` / ``import_model``, which honours the same
config), so a later process imports the compiled model instead of converting and compiling.

With ``split_batch`` (the sampler's setting) a batch that divides evenly runs as one slice per
thread, each an OpenVINO stream with its own thread, in parallel: the threads then never wait
for each other inside a layer, which on this 2-core CPU ran the CIFAR-10 UNet's batch-16 forward
~5% faster than one 2-thread stream (OpenVINO's default LATENCY mode, which the bench's
OpenVINO peer keeps). Batch 1, or a batch no stream count divides, runs as one stream.
"""
from __future__ import annotations

import copy
import importlib.util
import io
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from fastdiff.engines.cache import ArtifactCache, Entry
from fastdiff.engines.keys import environment

#: OpenVINO's CPU inference precision for each model dtype the sampler takes.
PRECISIONS = {torch.bfloat16: "bf16", torch.float32: "f32", torch.float16: "f16"}


def available() -> bool:
    """Whether the ``openvino`` package is installed (nothing is imported)."""
    return importlib.util.find_spec("openvino") is not None


def default_precision() -> str:
    """OpenVINO's own default CPU inference precision here (bf16 where the CPU has it)."""
    # openvino is optional (fastdiff[cpu])
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()


def version() -> str:
    # openvino is optional (fastdiff[cpu])
    import openvino

    return openvino.__version__.split("-")[0]


class OpenVINOModel(nn.Module):
    """``model`` (an eps model ``(x, t[, class_labels]) -> eps``) run by OpenVINO on the CPU in
    ``dtype``'s precision (None: OpenVINO's default), with PyTorch float32 tensors in and out.
    Compiles per input shape on first use (``prepare``); ``threads`` is OpenVINO's inference
    thread count; ``split_batch``: run even slices of the batch as parallel streams
    (:func:`streams_for`). ``cache``: keep the converted and compiled models there under ``key``
    (what the model is) and the shapes, config and environment; ``on_entry(entry)`` hears of
    each compiled model found or built."""

    IR_FILE, BLOB_FILE = "model.xml", "compiled.blob"

    def __init__(self, model: nn.Module, dtype: torch.dtype | None, threads: int, split_batch: bool = False,
                 cache: ArtifactCache | None = None, key: dict | None = None,
                 on_entry: Callable[[Entry], None] = lambda entry: None):
        super().__init__()
        if dtype is not None and dtype not in PRECISIONS:
            raise ValueError(f"OpenVINO runs {', '.join(map(str, PRECISIONS))}, got {dtype}")
        self.source = [model]  # a list: not a submodule (OpenVINO holds its own copy of the weights)
        self.precision, self.threads, self.split_batch = PRECISIONS.get(dtype), threads, split_batch
        self.cache, self.key, self.on_entry = cache, key or {}, on_entry
        self._converted = None
        self._requests: dict[tuple, list] = {}

    def _convert(self, example: tuple):
        # openvino is optional (fastdiff[cpu])
        import openvino as ov

        if self._converted is None and self.cache is None:
            self._converted = self._convert_now(example)
        elif self._converted is None:
            inputs = [[str(i.dtype), list(i.shape[1:])] for i in example]  # the batch is reshaped per compile
            key = {**self.key, "inputs": inputs, "openvino": version(), "environment": environment("cpu")}
            entry = self.cache.entry("openvino-ir", key, lambda folder: ov.save_model(
                self._convert_now(example), folder / self.IR_FILE, compress_to_fp16=False))
            self._converted = ov.Core().read_model(entry.path / self.IR_FILE)
        return self._converted

    def _convert_now(self, example: tuple):
        # openvino is optional (fastdiff[cpu])
        import openvino as ov

        model = copy.deepcopy(self.source[0]).float().eval()  # the caller's model keeps its dtype and mode
        with torch.no_grad(), warnings.catch_warnings():
            # the trace's warnings about shape checks turned constants: the shapes are static
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return ov.convert_model(model, example_input=example)

    def streams(self, batch: int) -> int:
        return streams_for(batch, self.threads) if self.split_batch else 1

    def prepare(self, inputs: tuple[torch.Tensor, ...]) -> list:
        """The infer requests for these inputs' shapes (one per stream), compiled on first use."""
        key = tuple(tuple(i.shape) for i in inputs)
        if key not in self._requests:
            # openvino is optional (fastdiff[cpu])
            import openvino as ov

            streams = self.streams(key[0][0])
            config = {"INFERENCE_NUM_THREADS": self.threads}
            config.update({"PERFORMANCE_HINT": "LATENCY"} if streams == 1 else {"NUM_STREAMS": streams})
            if self.precision is not None:
                config["INFERENCE_PRECISION_HINT"] = self.precision
            shapes = {n: [shape[0] // streams, *shape[1:]] for n, shape in enumerate(key)}

            def compile_model():
                converted = self._convert(inputs)
                converted.reshape(shapes)
                return ov.Core().compile_model(converted, "CPU", config)

            if self.cache is None:
                compiled = compile_model()
            else:
                built = []

                def build(folder):
                    built.append(compile_model())
                    blob = io.BytesIO()
                    built[0].export_model(blob)
                    (folder / self.BLOB_FILE).write_bytes(blob.getvalue())

                entry_key = {**self.key, "shapes": list(shapes.values()), "config": config, "openvino": version(),
                             "environment": environment("cpu")}
                entry = self.cache.entry("openvino", entry_key, build)
                if built:
                    compiled = built[0]
                else:
                    blob = io.BytesIO((entry.path / self.BLOB_FILE).read_bytes())
                    compiled = ov.Core().import_model(blob, "CPU", config)
                self.on_entry(entry)
            self._requests[key] = [compiled.create_infer_request() for _ in range(streams)]
        return self._requests[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        inputs = (x.float().contiguous(), t) if class_labels is None else (x.float().contiguous(), t, class_labels)
        requests = self.prepare(inputs)
        slices = zip(*(i.tensor_split(len(requests)) for i in inputs))
        for request, part in zip(requests, slices):
            request.start_async([i.numpy() for i in part])  # inputs are copied in: the slices may go
        for request in requests:
            request.wait()
        # copies: the next infer reuses the requests' output buffers
        outputs = [torch.from_numpy(np.array(r.get_output_tensor(0).data, dtype=np.float32)) for r in requests]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def streams_for(batch: int, threads: int) -> int:
    """Streams for a batch on ``threads`` threads: the most, up to one per thread, that split the
    batch into equal slices (one compiled shape serves them all)."""
    return max(s for s in range(1, max(1, min(batch, threads)) + 1) if batch % s == 0)
