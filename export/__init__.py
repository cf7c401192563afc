"""Per-device export of personalized submodels, verified against torch (issue 4: ONNX so far)."""

from .onnx_export import OPSET, ExportError, OnnxArtifact, export_onnx

__all__ = ["OPSET", "ExportError", "OnnxArtifact", "export_onnx"]
