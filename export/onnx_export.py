"""Export a device's submodel to ONNX, and refuse to publish it unless onnxruntime agrees.

A device runs the exported file, not our torch model, so parity is checked at export time on
real inputs: the largest absolute logit difference and the top-1 agreement with torch are
measured in onnxruntime and recorded; an artifact outside tolerance is deleted, never published.
The file is written next to its destination and renamed into place only after it passes.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

OPSET = 18


class ExportError(RuntimeError):
    """The model could not be exported, or the export disagrees with torch."""


@dataclass(frozen=True)
class OnnxArtifact:
    path: str
    bytes: int
    sha256: str
    opset: int
    max_abs_diff: float
    top1_agreement: float
    verified_on: int

    def to_dict(self) -> dict:
        return asdict(self)


def export_onnx(model: torch.nn.Module, path: str | Path, example_inputs: torch.Tensor,
                metadata: dict[str, str] | None = None, tolerance: float = 1e-4) -> OnnxArtifact:
    """Export with a dynamic batch dimension, embed `metadata` as metadata_props, verify."""
    import onnxruntime as ort

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    model = model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example_inputs[:1],), None, input_names=["input"], output_names=["logits"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, external_data=False,
                opset_version=OPSET, verbose=False)
    except Exception as exc:  # the exporter raises many types; name the model and the cause
        raise ExportError(f"torch.onnx could not export {type(model).__name__}: {exc}") from exc
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    staging.write_bytes(proto.SerializeToString())
    try:
        session = ort.InferenceSession(str(staging), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": example_inputs.numpy()})[0]
        with torch.no_grad():
            want = model(example_inputs).numpy()
        diff = float(np.abs(got - want).max())
        agreement = float((got.argmax(1) == want.argmax(1)).mean())
        if not diff <= tolerance or agreement < 1.0:
            raise ExportError(f"ONNX export disagrees with torch: max |logit difference| {diff:.3g} "
                              f"(tolerance {tolerance:g}), top-1 agreement {agreement:.4f} on "
                              f"{len(example_inputs)} inputs; not published")
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    data = path.read_bytes()
    return OnnxArtifact(str(path), len(data), hashlib.sha256(data).hexdigest(), OPSET, diff,
                        agreement, len(example_inputs))
