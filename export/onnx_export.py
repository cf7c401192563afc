"""torch -> ONNX (opset 18, dynamic batch), and its fp16 and int8 dynamic-range variants.

The dynamo exporter gives one self-contained file (no external data) whose batch dimension is
symbolic, so a device can batch as it likes. fp16 is onnxruntime's float16 converter with fp32
inputs and outputs kept, so callers never change; int8 is onnxruntime's dynamic quantization
(int8 weights, activations quantized on the fly), which needs no calibration data.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .formats import ExportError, register_exporter

if TYPE_CHECKING:
    import torch

OPSET = 18


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def onnx_precision(model: bytes, precision: str) -> bytes:
    """The fp32 ONNX model `model` at fp16 or int8."""
    import onnx
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return convert_float_to_float16(onnx.load_from_string(model),
                                            keep_io_types=True).SerializeToString()
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic
        # It logs a generic "consider pre-processing" warning on the root logger every call.
        with tempfile.TemporaryDirectory() as tmp, _quiet_root_logger():
            source, target = Path(tmp, "fp32.onnx"), Path(tmp, "int8.onnx")
            source.write_bytes(model)
            quantize_dynamic(source, target, weight_type=QuantType.QInt8)
            quantized = onnx.load(target)
        # quantize_dynamic keeps metadata_props only on some versions; carry them over.
        original = onnx.load_from_string(model)
        if not quantized.metadata_props:
            quantized.metadata_props.extend(original.metadata_props)
        return quantized.SerializeToString()
    raise ExportError(f"unknown precision {precision!r}; use fp32, fp16 or int8")


@register_exporter("onnx", precisions=("fp32", "fp16", "int8"), opset=OPSET,
                   packages=("onnx", "onnxruntime"), variant=onnx_precision)
def to_onnx(model: torch.nn.Module, example: torch.Tensor,
            metadata: dict[str, str] | None = None) -> bytes:
    """Serialized ONNX model with `metadata` as metadata_props; input `input`, output `logits`."""
    import torch

    # The exporter warns about every optional op library it does not find (torchvision, ...).
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model.eval(), (example[:1],), None, input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
                opset_version=OPSET, verbose=False)
    except Exception as exc:  # the exporter raises many types; name the model and the cause
        raise ExportError(f"torch.onnx could not export {type(model).__name__}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()
