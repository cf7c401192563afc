"""Artifact formats a device can run, each registered under its name, behind one `run(batch)` call.

A format is `@register_runtime("name")` on a class (or any callable) that takes the artifact's
bytes and a thread count and returns a `Backend`: `runtime` and `version` (recorded in the
manifest's parity), and `run(batch) -> logits`. The name is the one manifests, edge.toml and
REGISTER headers use and the artifact file's suffix (`model-fp32.onnx`). A runtime imports its
library when an artifact is opened, never at registration: every format is known everywhere, and
a device installs only the runtimes it uses. The export side registers a converter under the same
name (`export/formats.py`); a new format is that converter's module and a runtime here.

ONNX artifacts have a dynamic batch dimension and run in one call. TFLite artifacts are
converted with a fixed batch (litert-torch cannot trace a dynamic batch through flatten), so
the backend feeds them sample by sample; on a device that is the usual batch-1 inference anyway.
"""

from __future__ import annotations

import importlib.metadata
import re
import tempfile
from collections.abc import Callable
from typing import Annotated, Protocol

import numpy as np
from pydantic import AfterValidator

from .bundle_files import ManifestError

# Format names become file suffixes and config values: short, lower-case, nothing a path reads.
FORMAT_NAME = re.compile(r"[a-z][a-z0-9_]{0,15}")


class BackendUnavailable(ImportError):
    """No runtime for this format is installed; the message says which package to install."""


# The first onnxruntime that refuses absolute and escaping external data paths of a model
# loaded from bytes (microsoft/onnxruntime#26776, #27430: 1.24.3's "validation of external model
# data paths when loading models from memory").
MIN_ONNXRUNTIME = (1, 24, 3)
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"


class Backend(Protocol):
    runtime: str
    version: str

    def run(self, batch: np.ndarray) -> np.ndarray: ...


Opener = Callable[[bytes, "int | None"], Backend]
_RUNTIMES: dict[str, Opener] = {}


def register_runtime(name: str) -> Callable[[Opener], Opener]:
    """Register `opener(model_bytes, threads) -> Backend` as the runtime of format `name`."""
    if not isinstance(name, str) or not FORMAT_NAME.fullmatch(name):
        raise ValueError(f"format name {name!r} must match {FORMAT_NAME.pattern} "
                         "(it becomes the artifact's file suffix)")

    def decorate(opener: Opener) -> Opener:
        if _RUNTIMES.get(name, opener) is not opener:
            raise ValueError(f"artifact format {name!r} already has a runtime "
                             f"({_RUNTIMES[name].__qualname__}); unregister_runtime it first")
        _RUNTIMES[name] = opener
        return opener
    return decorate


def unregister_runtime(name: str) -> None:
    _RUNTIMES.pop(name, None)


def runtime_formats() -> tuple[str, ...]:
    """The artifact formats this build can run, in registration order."""
    return tuple(_RUNTIMES)


def check_runtime_format(name: str) -> str:
    if name not in _RUNTIMES:
        raise ValueError(f"unknown artifact format {name!r}; registered formats: "
                         f"{', '.join(_RUNTIMES) or 'none'}")
    return name


# A pydantic field type: a format name this build has a runtime for.
RuntimeFormatName = Annotated[str, AfterValidator(check_runtime_format)]


def open_backend(fmt: str, model: bytes, threads: int | None = None) -> Backend:
    return _RUNTIMES[check_runtime_format(fmt)](model, threads)


def _release(version: str) -> tuple[int, ...]:
    """(1, 24, 3) from "1.24.3" or "1.24.3.dev20260301"."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@register_runtime("onnx")
class OnnxBackend:
    runtime = "onnxruntime"

    def __init__(self, model: bytes, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable("ONNX artifacts need onnxruntime: pip install onnxruntime") from exc
        if _release(ort.__version__) < MIN_ONNXRUNTIME:
            raise BackendUnavailable(
                f"onnxruntime {ort.__version__} resolves a model's external data paths without "
                f"confining them; pip install 'onnxruntime>={'.'.join(map(str, MIN_ONNXRUNTIME))}'")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # A model loaded from bytes resolves external data against the working directory. An
        # artifact is one self-contained file (the manifest's sha256 covers nothing else), so
        # its external data is resolved in a fresh empty folder: any reference is refused.
        with tempfile.TemporaryDirectory(prefix="fedprune-onnx-") as empty:
            options.add_session_config_entry(EXTERNAL_DATA_FOLDER, empty)
            try:
                self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own types; name the cause
                raise ManifestError(f"onnxruntime cannot load this artifact ({_first_line(exc)}); an "
                                    "artifact is one self-contained file, external data is "
                                    "refused: re-export the bundle") from None
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


@register_runtime("tflite")
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

