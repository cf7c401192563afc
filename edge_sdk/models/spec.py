"""Model specs: the JSON both sides build the same network from.

A device never receives pickled modules or Python code, only a spec and tensors. Keeping the
architecture as a flat list of layer specs (rather than arbitrary nn.Modules) is what lets the
coordinator address a model layer by layer (FedP3 selects layers, later issues slice widths) and
lets a device rebuild exactly the network the coordinator planned for it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

LayerKind = Literal["conv", "fc", "resblock", "gap"]


class SpecError(ValueError):
    """A model spec that cannot be built; the message names the offending field."""


@dataclass(frozen=True)
class LayerSpec:
    """One addressable layer.

    `out` is the output width (channels or features). `pool` is a max-pool size applied after the
    activation (conv only). `act` is False only for the output layer. `norm` adds GroupNorm (not
    BatchNorm: Opacus cannot clip per-sample gradients through batch statistics).
    """

    kind: LayerKind
    out: int = 0
    kernel: int = 3
    stride: int = 1
    padding: int = 0
    pool: int = 0
    act: bool = True
    norm: bool = False
    # FedDP's per-sample channel gate (conv only): keep this share of output channels per input.
    gate: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.gate == 1.0:  # absent when unused, so specs without gates keep their digests
            del data["gate"]
        return data


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    layers: tuple[LayerSpec, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """Stable hash, so a device can tell whether the tensors it holds fit the spec it is sent."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        try:
            layers = tuple(LayerSpec(**layer) for layer in data["layers"])
            spec = cls(
                name=str(data["name"]),
                input_shape=tuple(int(v) for v in data["input_shape"]),  # type: ignore[arg-type]
                num_classes=int(data["num_classes"]),
                layers=layers,
            )
        except (KeyError, TypeError) as exc:
            raise SpecError(f"malformed model spec ({exc}); expected keys name, input_shape, "
                            "num_classes, layers[kind, out, ...]") from exc
        spec.validate()
        return spec

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls.from_dict(json.loads(text))

    def validate(self) -> None:
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise SpecError(f"input_shape must be (channels, height, width), got {self.input_shape}")
        if not self.layers:
            raise SpecError("a model spec needs at least one layer")
        for i, layer in enumerate(self.layers):
            if layer.kind not in ("conv", "fc", "resblock", "gap"):
                raise SpecError(f"layer {i}: unknown kind {layer.kind!r} (conv, fc, resblock, gap)")
            if layer.kind != "gap" and layer.out < 1:
                raise SpecError(f"layer {i} ({layer.kind}): out must be >= 1, got {layer.out}")
            if not 0 < layer.gate <= 1 or (layer.gate < 1 and layer.kind != "conv"):
                raise SpecError(f"layer {i}: gate must be in (0, 1] and only on conv layers, "
                                f"got {layer.gate} on {layer.kind}")
        last = self.layers[-1]
        if last.kind != "fc" or last.out != self.num_classes or last.act:
            raise SpecError("the last layer must be the output layer: fc with out == num_classes "
                            "and act=False")
