"""The two runtimes a device may have, behind one `run(batch) -> logits` call.

ONNX artifacts have a dynamic batch dimension and run in one call. TFLite artifacts are
converted with a fixed batch (litert-torch cannot trace a dynamic batch through flatten), so
the backend feeds them sample by sample; on a device that is the usual batch-1 inference anyway.
"""

from __future__ import annotations

import importlib.metadata
from typing import Protocol

import numpy as np


class BackendUnavailable(ImportError):
    """No runtime for this format is installed; the message says which package to install."""


class Backend(Protocol):
    runtime: str
    version: str

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class OnnxBackend:
    runtime = "onnxruntime"

    def __init__(self, model: bytes, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable("ONNX artifacts need onnxruntime: pip install onnxruntime") from exc
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.version = ort.__version__

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]


def _interpreter_class():
    """ai-edge-litert first (the maintained runtime), tflite-runtime where that is all there is."""
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter, "ai-edge-litert", _version("ai-edge-litert")
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, "tflite-runtime", _version("tflite-runtime")
    except ImportError as exc:
        raise BackendUnavailable("TFLite artifacts need ai-edge-litert (pip install ai-edge-litert) "
                                 "or tflite-runtime") from exc


class LiteRtBackend:
    def __init__(self, model: bytes, threads: int | None = None):
        interpreter_class, self.runtime, self.version = _interpreter_class()
        self.interpreter = interpreter_class(model_content=model, num_threads=threads)
        self.interpreter.allocate_tensors()
        inp = self.interpreter.get_input_details()[0]
        self.input_index = inp["index"]
        self.output_index = self.interpreter.get_output_details()[0]["index"]
        self.batch = int(inp["shape"][0])

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, np.float32)
        outputs = []
        for start in range(0, len(batch), self.batch):
            chunk = batch[start:start + self.batch]
            if len(chunk) < self.batch:  # pad the tail; the padded rows are dropped below
                chunk = np.concatenate([chunk, np.zeros((self.batch - len(chunk), *chunk.shape[1:]),
                                                        np.float32)])
            self.interpreter.set_tensor(self.input_index, chunk)
            self.interpreter.invoke()
            outputs.append(self.interpreter.get_tensor(self.output_index).copy())
        return np.concatenate(outputs)[:len(batch)]


def open_backend(fmt: str, model: bytes, threads: int | None = None) -> Backend:
    if fmt == "onnx":
        return OnnxBackend(model, threads)
    if fmt == "tflite":
        return LiteRtBackend(model, threads)
    raise ValueError(f"unknown artifact format {fmt!r}; use onnx or tflite")
