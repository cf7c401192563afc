"""Model checkpoints: the spec and weights of a global or personalized model, and where they came from.

A checkpoint carries its own spec so it can be rebuilt without knowing which width the planner
chose, and its provenance (device, round, dataset) so an export can name them. The file's
sha256 is what exported bundles cite. Loaded with `weights_only=True`: a checkpoint from an
untrusted place cannot run code.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch

from device_profiles.files import atomic_write

from .models import ModelSpec, SpecError, build_model

FORMAT = "fedprune-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a usable fedprune checkpoint; the message says why."""


@dataclass
class Checkpoint:
    spec: ModelSpec
    state: dict[str, torch.Tensor]
    model: str                      # zoo name of the full-width model, e.g. fedp3_cnn
    dataset: str
    device_id: str | None = None    # None: the global model
    round: int | None = None
    width_ratio: float = 1.0
    extra: dict = field(default_factory=dict)
    sha256: str | None = None       # set on save and load

    def build(self) -> torch.nn.Module:
        model = build_model(self.spec)
        model.load_state_dict(self.state)
        return model.eval()

    def save(self, path: str | Path) -> str:
        """Write atomically and durably (a crash or power cut leaves the old file or the new
        one, fsynced) and return the file's sha256."""
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, "version": VERSION, "spec": self.spec.to_json(),
                    "state": {k: v.detach().cpu().contiguous() for k, v in self.state.items()},
                    "model": self.model, "dataset": self.dataset, "device_id": self.device_id,
                    "round": self.round, "width_ratio": self.width_ratio, "extra": self.extra},
                   buffer)
        data = buffer.getvalue()
        atomic_write(path, data)
        self.sha256 = hashlib.sha256(data).hexdigest()
        return self.sha256


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    try:
        data = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fedprune checkpoint (no format marker {FORMAT!r}); "
                              "write one with `fedprune simulate --export-dir` or Checkpoint.save")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {data.get('version')}; this fedprune "
                              f"reads version {VERSION}")
    try:
        spec = ModelSpec.from_json(data["spec"])
        checkpoint = Checkpoint(spec, dict(data["state"]), data["model"], data["dataset"],
                                data["device_id"], data["round"], float(data["width_ratio"]),
                                dict(data["extra"]), hashlib.sha256(raw).hexdigest())
        checkpoint.build()  # every tensor present with the spec's shape, or a clear error
    except (KeyError, SpecError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is damaged: {exc}") from None
    return checkpoint
