"""Model specs: what both sides agree a network is, without any code crossing the wire.

A spec names a registered model (`registry.py`) and the arguments it is built with (input shape,
number of classes), plus what the coordinator decided for one device: the channels it keeps per
channel group (`width.py`, empty for the whole model) and FedDP's gate ratio. `structure` is the
structural digest of the full model as the coordinator built it (`structure.py`); a device that
builds something else from the same name refuses the task with the difference, instead of
training tensors that only happen to fit.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any


class SpecError(ValueError):
    """A model spec that cannot be built; the message names the offending field."""


Keep = tuple[tuple[str, tuple[int, ...]], ...]  # (channel group, kept indices), sorted by group


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    keep: Keep = ()             # width: kept channels per group; () keeps every channel
    gate: float = 1.0           # FedDP: share of each conv's output channels a per-sample gate keeps
    structure: str = ""         # structural digest of the full model; "" = not checked

    def __post_init__(self) -> None:
        self.validate()

    @property
    def base(self) -> ModelSpec:
        """The full model this spec is a submodel of (no width, no gates)."""
        return ModelSpec(self.name, self.input_shape, self.num_classes, structure=self.structure)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "input_shape": list(self.input_shape),
                                "num_classes": self.num_classes}
        if self.keep:
            data["keep"] = {group: list(units) for group, units in self.keep}
        if self.gate != 1.0:
            data["gate"] = self.gate
        if self.structure:
            data["structure"] = self.structure
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """Stable hash, so a device can tell whether the tensors it holds fit the spec it is sent."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        if not isinstance(data, dict):
            raise SpecError("a model spec must be an object with name, input_shape, num_classes")
        try:
            keep = data.get("keep") or {}
            if not isinstance(keep, dict):
                raise TypeError("keep must map channel groups to lists of channel indices")
            return cls(
                name=_text(data["name"], "name"),
                input_shape=tuple(_integer(v, "input_shape") for v in data["input_shape"]),
                num_classes=_integer(data["num_classes"], "num_classes"),
                keep=tuple(sorted((_text(group, "keep group"),
                                   tuple(_integer(u, f"keep[{group}]") for u in units))
                                  for group, units in keep.items())),
                gate=float(data.get("gate", 1.0)),
                structure=_text(data.get("structure", ""), "structure"),
            )
        except (KeyError, TypeError) as exc:
            raise SpecError(f"malformed model spec ({exc}); expected keys name, input_shape, "
                            "num_classes and optionally keep, gate, structure") from None

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls.from_dict(json.loads(text))

    def validate(self) -> None:
        if not self.name or len(self.name) > 200:
            raise SpecError(f"model name must be 1 to 200 characters, got {self.name!r}")
        if not 1 <= len(self.input_shape) <= 4 or min(self.input_shape) < 1 \
                or math.prod(self.input_shape) > 2**26:
            raise SpecError(f"input_shape must be 1 to 4 positive sizes (at most 2^26 elements), "
                            f"got {self.input_shape}")
        if not 2 <= self.num_classes <= 100_000:
            raise SpecError(f"num_classes must be in [2, 100000], got {self.num_classes}")
        if isinstance(self.gate, bool) or not isinstance(self.gate, (int, float)) \
                or not 0 < self.gate <= 1:
            raise SpecError(f"gate must be a number in (0, 1], got {self.gate!r}")
        for group, units in self.keep:
            if not units or any(b <= a for a, b in zip(units, units[1:])) or units[0] < 0:
                raise SpecError(f"keep[{group}] must be a non-empty increasing list of channel "
                                "indices")
        if len({group for group, _ in self.keep}) != len(self.keep):
            raise SpecError("keep names a channel group twice")


def _integer(value: Any, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{label} must hold integers, got {value!r}")
    return value


def _text(value: Any, label: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{label} must be a string, got {value!r}")
    return value


__all__ = ["Keep", "ModelSpec", "SpecError"]
