"""Per-device export of personalized submodels (ONNX, TFLite, any registered format), verified
against torch.

The format registry (`formats.py`) is importable without torch, for config validation and the
CLI; everything else loads on first use.
"""

import importlib

from .formats import (PRECISIONS, ExportError, Exporter, ExportFormatName, check_registered,
                      export_formats, exporter, register_exporter, unregister_exporter)

_LAZY = {"export_bundle": "bundle", "check_variants": "bundle", "exporter_versions": "bundle",
         "OPSET": "onnx_export", "onnx_precision": "onnx_export", "to_onnx": "onnx_export",
         "TOLERANCES": "parity", "Tolerance": "parity",
         "tflite_precision": "tflite_export", "to_tflite": "tflite_export"}

__all__ = ["OPSET", "PRECISIONS", "TOLERANCES", "ExportError", "ExportFormatName", "Exporter",
           "Tolerance", "check_registered", "check_variants", "export_bundle", "export_formats", "exporter",
           "exporter_versions", "onnx_precision", "register_exporter", "tflite_precision",
           "to_onnx", "to_tflite", "unregister_exporter"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
