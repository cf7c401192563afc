"""Per-device export of personalized submodels to ONNX and TFLite, verified against torch."""

from .bundle import FORMATS, PRECISIONS, exporter_versions, export_bundle
from .onnx_export import OPSET, onnx_precision, to_onnx
from .parity import TOLERANCES, ExportError, Tolerance
from .tflite_export import tflite_precision, to_tflite

__all__ = ["FORMATS", "OPSET", "PRECISIONS", "TOLERANCES", "ExportError", "Tolerance",
           "export_bundle", "exporter_versions", "onnx_precision", "tflite_precision", "to_onnx",
           "to_tflite"]
