"""Streaming, coverage-aware aggregation of sparse updates.

Each device uploads values for some entries of some tensors. The new value of an entry is the
weighted mean over the devices that uploaded that entry; entries nobody covered keep their value.
Updates are folded in as they arrive into one weighted sum and one weight total per tensor, so
memory is a small constant multiple of the model, whatever the number of devices.

With weight 1 this is FedP3's per-tensor mean; with a per-device weight it is FedP3's weighted
mean, normalised per entry (the released code forgot to normalise); with dense uploads and weight
= sample count it is FedAvg; with partial-width uploads it is HeteroFL's coverage-count averaging.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_sdk.codec import SparseTensor


class AggregationError(ValueError):
    """An update that does not fit the global model; it is refused whole, nothing is applied."""


class StreamingAggregator:
    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self._sums: dict[str, np.ndarray] = {}
        self._weights: dict[str, np.ndarray] = {}
        self._counts: dict[str, np.ndarray] = {}
        self.updates = 0

    def add_update(self, tensors: Mapping[str, SparseTensor], weight: float = 1.0) -> None:
        """Fold in one device's update: validated whole first, so a bad update changes nothing."""
        if not np.isfinite(weight) or weight <= 0:
            raise AggregationError(f"aggregation weight must be a positive finite number, got {weight}")
        self.check(tensors)
        for name, tensor in tensors.items():
            self._add(name, tensor, weight)
        self.updates += 1

    def check(self, tensors: Mapping[str, SparseTensor]) -> None:
        """AggregationError unless every tensor of the update fits the global model (a caller
        that folds updates in later still refuses a bad one when it arrives)."""
        for name, tensor in tensors.items():
            self._validate(name, tensor)

    def _validate(self, name: str, tensor: SparseTensor) -> None:
        if name not in self.shapes:
            raise AggregationError(f"update names tensor {name!r}, which the global model lacks")
        if tuple(tensor.shape) != self.shapes[name]:
            raise AggregationError(f"tensor {name!r}: update shape {tuple(tensor.shape)} != global "
                                   f"shape {self.shapes[name]}")
        if not np.all(np.isfinite(tensor.values)):
            raise AggregationError(f"tensor {name!r}: update holds NaN or Inf")
        if tensor.indices is not None and len(tensor.indices):
            numel = int(np.prod(self.shapes[name], dtype=np.int64))
            if tensor.indices.min() < 0 or tensor.indices.max() >= numel:
                raise AggregationError(f"tensor {name!r}: index out of range")

    def _add(self, name: str, tensor: SparseTensor, weight: float) -> None:
        if name not in self._sums:
            numel = int(np.prod(self.shapes[name], dtype=np.int64))
            self._sums[name] = np.zeros(numel, dtype=np.float64)
            self._weights[name] = np.zeros(numel, dtype=np.float64)
            self._counts[name] = np.zeros(numel, dtype=np.int32)
        where = slice(None) if tensor.indices is None else tensor.indices
        self._sums[name][where] += weight * tensor.values.astype(np.float64)
        self._weights[name][where] += weight
        self._counts[name][where] += 1

    def coverage(self, name: str) -> np.ndarray:
        """How many devices uploaded each entry of `name` (zeros when nobody did)."""
        counts = self._counts.get(name)
        if counts is None:
            return np.zeros(self.shapes[name], dtype=np.int32)
        return counts.reshape(self.shapes[name])

    def apply(self, global_state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """New global state: weighted means where covered, old values elsewhere."""
        result: dict[str, np.ndarray] = {}
        for name, old in global_state.items():
            if name not in self._sums:
                result[name] = old
                continue
            flat = np.asarray(old, dtype=np.float32).reshape(-1).copy()
            covered = self._weights[name] > 0
            flat[covered] = (self._sums[name][covered] / self._weights[name][covered]).astype(np.float32)
            result[name] = flat.reshape(self.shapes[name])
        return result
