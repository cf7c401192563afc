"""Robust aggregation rules, usable by every strategy: coordinate-wise median, trimmed mean and
centered clipping, each optionally over buckets.

Unlike the streaming mean these rules need every update at once (a median is not a running
sum), so the aggregator holds one dense row per update and tensor; memory grows with the number
of devices per round, which is why the mean stays the default. Entries a device did not upload
are NaN in its row and ignored, so partial uploads (FedP3, width-sliced submodels) still
aggregate per entry over the devices that covered it.

Bucketing (Karimireddy, He, Jaggi, ICLR 2022): updates are shuffled into buckets of `bucket`
and averaged per bucket before the rule, which keeps the rules effective under heterogeneous
(non-IID) honest updates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
from pydantic import Field

from edge_sdk.codec import SparseTensor
from edge_sdk.settings import Settings

from .aggregation import AggregationError, StreamingAggregator

Rule = Literal["mean", "median", "trimmed_mean", "centered_clip"]


class AggregatorSettings(Settings):
    """The run's `[aggregator]` section."""

    rule: Rule = "mean"
    trim: float = Field(0.2, ge=0, lt=0.5)   # trimmed mean: share cut from each end
    clip_radius: float = Field(1.0, gt=0)    # centered clipping: tau, in L2 norm of the whole update
    clip_iterations: int = Field(3, ge=1)
    bucket: int = Field(0, ge=0)             # 0 or 1: no bucketing
    # k: no device weighs more than k times the round's (lower) median weight, whatever it claims
    # (combine.weight_cap); None: weights as planned (FedAvg exactly, for reproducing papers).
    max_weight_ratio: float | None = Field(3.0, ge=1)


class RobustAggregator(StreamingAggregator):
    """Same interface as the streaming mean; `apply` runs the configured rule."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], settings: AggregatorSettings, seed: int = 0):
        """`seed`: the run's; it shuffles updates into buckets."""
        super().__init__(shapes)
        self.settings = settings
        self.seed = seed
        self._rows: dict[str, list[np.ndarray]] = {name: [] for name in self.shapes}

    def add_update(self, tensors: Mapping[str, SparseTensor], weight: float = 1.0) -> None:
        super().add_update(tensors, weight)  # validates whole first, keeps coverage counts
        for name in self.shapes:
            numel = int(np.prod(self.shapes[name], dtype=np.int64))
            row = np.full(numel, np.nan)
            tensor = tensors.get(name)
            if tensor is not None:
                row[slice(None) if tensor.indices is None else tensor.indices] = tensor.values
            self._rows[name].append(row)

    def apply(self, global_state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.settings.rule == "mean" or self.updates == 0:
            return super().apply(global_state)
        order = np.random.default_rng(self.seed).permutation(self.updates)
        stacked = {name: self._bucketed(np.stack(rows)[order]) for name, rows in self._rows.items()}
        if self.settings.rule == "centered_clip":
            combined = self._centered_clip(stacked, global_state)
        else:
            combined = {name: self._rule(rows) for name, rows in stacked.items()}
        result = {}
        for name, old in global_state.items():
            new = combined[name].reshape(old.shape)
            result[name] = np.where(np.isnan(new), old, new).astype(old.dtype)
        return result

    def _bucketed(self, rows: np.ndarray) -> np.ndarray:
        size = self.settings.bucket
        if size <= 1:
            return rows
        with np.errstate(invalid="ignore"), _quiet_nan():
            return np.stack([np.nanmean(rows[i:i + size], axis=0) for i in range(0, len(rows), size)])

    def _rule(self, rows: np.ndarray) -> np.ndarray:
        with _quiet_nan():
            if self.settings.rule == "median":
                return np.nanmedian(rows, axis=0)
            # Trimmed mean per entry over the rows that cover it: sort (NaN last), cut k each end.
            covered = np.sum(~np.isnan(rows), axis=0)
            ordered = np.sort(rows, axis=0)
            cut = np.floor(self.settings.trim * covered).astype(int)
            index = np.arange(len(rows))[:, None]
            keep = (index >= cut) & (index < covered - cut)
            total = np.where(keep, ordered, 0.0).sum(axis=0)
            count = keep.sum(axis=0)
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def _centered_clip(self, stacked: dict[str, np.ndarray],
                       global_state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """v <- v + mean_i clip(x_i - v, tau), from the current global model, over all tensors."""
        center = {name: global_state[name].reshape(-1).astype(np.float64) for name in stacked}
        count = len(next(iter(stacked.values())))
        for _ in range(self.settings.clip_iterations):
            diffs = {name: np.nan_to_num(rows - center[name]) for name, rows in stacked.items()}
            norms = np.sqrt(sum((d ** 2).sum(axis=1) for d in diffs.values()))
            scale = np.minimum(1.0, self.settings.clip_radius / np.maximum(norms, 1e-12))
            for name, diff in diffs.items():
                covered = np.maximum((~np.isnan(stacked[name])).sum(axis=0), 1)
                center[name] = center[name] + (diff * scale[:, None]).sum(axis=0) / covered
        if count == 0:
            raise AggregationError("no updates to aggregate")
        return center


class _quiet_nan:
    """numpy warns on all-NaN columns (entries nobody covered); they are handled explicitly."""

    def __enter__(self):
        import warnings
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def make_aggregator(shapes: Mapping[str, tuple[int, ...]],
                    settings: AggregatorSettings | None, seed: int = 0) -> StreamingAggregator:
    if settings is None or settings.rule == "mean":
        return StreamingAggregator(shapes)
    return RobustAggregator(shapes, settings, seed)
