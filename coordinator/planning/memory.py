"""Predicted peak resident memory of one local DP-SGD epoch of a submodel.

    peak = baseline
         + bytes_per_parameter x parameters
         + activation_factor x 4 bytes x activation elements per sample x physical batch
         + 4 bytes x input elements x local samples                         (the local data)
         [+ 4 bytes x parameters x physical batch   only in Opacus "hooks" mode]

- baseline: the interpreter with torch, Opacus and the dataset loader imported and run;
- bytes_per_parameter: weights, gradients, optimizer and DP-optimizer state (momentum buffer,
  summed clipped gradient, noise), in bytes per parameter;
- activation_factor: how many copies of the forward activations the backward pass and ghost
  clipping's per-sample norm computation keep alive (activations and their gradients).

The three coefficients are fitted (non-negative least squares) to peaks measured by
`benchmarks/calibrate_memory.py` on this machine kind and stored in `memory_calibration.json`
with the command and machine; docs/BENCHMARKS.md records the fit. Ghost clipping never holds
per-sample gradients, which is why the fedprune default avoids the batch x parameters term.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_sdk.models import ModelSpec
from edge_sdk.models.cost import ModelFootprint, footprint  # noqa: F401  (re-exported for the planner)

CALIBRATION_FILE = Path(__file__).with_name("memory_calibration.json")


@dataclass(frozen=True)
class MemoryCoefficients:
    baseline_bytes: float
    bytes_per_parameter: float
    activation_factor: float
    source: str = "uncalibrated defaults"

    @classmethod
    def load(cls, path: Path = CALIBRATION_FILE) -> MemoryCoefficients:
        if not path.exists():
            # Conservative defaults until calibrated: 400 MB runtime, 24 B/param, 3 copies.
            return cls(400e6, 24.0, 3.0)
        data = json.loads(path.read_text())
        return cls(**{k: data[k] for k in ("baseline_bytes", "bytes_per_parameter",
                                           "activation_factor", "source")})

    def to_dict(self) -> dict:
        return asdict(self)


def predict_peak_bytes(spec: ModelSpec, physical_batch: int, local_samples: int,
                       coefficients: MemoryCoefficients, per_sample_gradients: bool = False) -> int:
    fp = footprint(spec)
    peak = (coefficients.baseline_bytes
            + coefficients.bytes_per_parameter * fp.parameters
            + coefficients.activation_factor * 4 * fp.activation_elements * physical_batch
            + 4 * fp.input_elements * local_samples)
    if per_sample_gradients:
        peak += 4 * fp.parameters * physical_batch
    return int(peak)
