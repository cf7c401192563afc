"""torch -> TFLite with litert-torch, and fp16 / int8 dynamic-range variants with ai-edge-quantizer.

litert-torch traces a fixed batch of one: a dynamic batch does not survive flatten on this
toolchain, and on-device inference is batch-one anyway; the edge runtime loops over a batch.
fp16 stores weights as float16 (FLOAT_CASTING); int8 is dynamic-range (int8 channel-wise
weights, activations quantized at run time), the TFLite analogue of the ONNX int8 variant.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from typing import TYPE_CHECKING

from .formats import ExportError, register_exporter

if TYPE_CHECKING:
    import torch

TFLITE_BATCH = 1


def _require(module: str, package: str):
    # litert-torch prints a progress tree and the converter logs every pass; a CLI wants neither.
    # Set before the toolchain's first import, which reads them.
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise ExportError(f"TFLite export needs {package}: pip install 'fedprune[tflite]'") from exc


@contextlib.contextmanager
def _native_stderr_kept():
    """Keep what is written to fd 2 meanwhile (absl, oneDNN and torchao announce themselves there
    while the toolchain loads), and show it only if the block fails. Only for a command line's
    own thread before anything else runs: another thread's log lines would be kept too."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as kept:
        os.dup2(kept.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            kept.seek(0)
            sys.stderr.write(kept.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def load_toolchain_quietly() -> None:
    """Import the TFLite toolchain (if installed) with its start-up notices kept out of a
    command's output; `fedprune export` calls it first. A failure is shown in full."""
    with _native_stderr_kept():
        for module in ("litert_torch", "ai_edge_litert.interpreter"):
            try:
                _require(module, module)
            except ExportError:  # not installed: the export that needs it says so
                pass
        _first_interpreter()


def _first_interpreter() -> None:
    """Run a one-ADD model once. The runtime says "Created TensorFlow Lite XNNPACK delegate for
    CPU" on fd 2 the first time a process delegates a graph, whatever TF_CPP_MIN_LOG_LEVEL says;
    here it says it into the kept output, not into the verification table."""
    try:
        import flatbuffers
        import numpy as np
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return
    tensors = []
    for name in ("x", "y"):
        tensor = schema.TensorT()
        tensor.shape, tensor.type, tensor.buffer, tensor.name = [1], schema.TensorType.FLOAT32, 0, name
        tensors.append(tensor)
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.ADD
    code.version = 1
    add = schema.OperatorT()
    add.opcodeIndex, add.inputs, add.outputs = 0, [0, 0], [1]
    graph = schema.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = tensors, [0], [1], [add]
    model = schema.ModelT()
    model.version, model.subgraphs, model.buffers, model.operatorCodes = 3, [graph], [schema.BufferT()], [code]
    builder = flatbuffers.Builder(256)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    interpreter = Interpreter(model_content=bytes(builder.Output()))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], np.ones(1, np.float32))
    interpreter.invoke()


def tflite_precision(model: bytes, precision: str) -> bytes:
    """The fp32 TFLite flatbuffer `model` at fp16 or int8."""
    if precision not in ("fp16", "int8"):
        raise ExportError(f"unknown precision {precision!r}; use fp32, fp16 or int8")
    quantizer = _require("ai_edge_quantizer.quantizer", "ai-edge-quantizer")
    from ai_edge_quantizer import recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName

    q = quantizer.Quantizer(bytearray(model))
    if precision == "int8":
        q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    else:
        q.add_weight_only_config(regex=".*", operation_name=TFLOperationName.ALL_SUPPORTED,
                                 num_bits=16, algorithm_key=AlgorithmName.FLOAT_CASTING)
    with contextlib.redirect_stdout(io.StringIO()):
        return bytes(q.quantize().quantized_model)


@register_exporter("tflite", precisions=("fp32", "fp16", "int8"), batch=TFLITE_BATCH,
                   packages=("litert-torch", "ai-edge-quantizer", "ai-edge-litert"),
                   variant=tflite_precision)
def to_tflite(model: torch.nn.Module, example: torch.Tensor,
              metadata: dict[str, str] | None = None) -> bytes:
    """The fp32 TFLite flatbuffer (`metadata` is not embedded: the manifest carries it)."""
    litert_torch = _require("litert_torch", "litert-torch")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            converted = litert_torch.convert(model.eval(), (example[:TFLITE_BATCH],))
            return bytes(converted.model_content())
    except Exception as exc:
        raise ExportError(f"litert-torch could not convert {type(model).__name__}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
