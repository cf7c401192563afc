"""Magnitude pruning masks, shared by the server's global pruning Q_i and a device's local P_i."""

from __future__ import annotations

import math

import numpy as np


def is_prunable(shape: tuple[int, ...]) -> bool:
    """Only weight matrices and kernels are pruned: biases and norm scales are tiny and pruning them
    hurts accuracy out of proportion to the bytes saved (FedP3 exempts biases too)."""
    return len(shape) >= 2


def magnitude_mask(values: np.ndarray, keep: float) -> np.ndarray:
    """Boolean mask keeping the ceil(keep * n) entries of largest magnitude.

    Uses a stable sort so ties (e.g. freshly zeroed entries) resolve the same way on every device.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {keep}")
    flat = np.abs(np.asarray(values, dtype=np.float32)).ravel()
    mask = np.ones(flat.shape, dtype=bool)
    if keep < 1.0:
        k = math.ceil(keep * flat.size - 1e-9)  # 0.55 * 100 is 55.00000000000001 in floats
        order = np.argsort(-flat, kind="stable")
        mask[order[k:]] = False
    return mask.reshape(np.shape(values))


def top_changes_mask(before: np.ndarray, after: np.ndarray, allowed: np.ndarray, keep: float) -> np.ndarray:
    """Of the `allowed` entries, the ceil(keep x count) whose value changed most (|after - before|).

    A device on a slow uplink sends only these (its planned upload keep); the coordinator's
    coverage-aware mean leaves every entry it did not send to the devices that did.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {keep}")
    allowed = np.asarray(allowed, dtype=bool)
    if keep >= 1.0:
        return allowed.copy()
    change = np.abs(np.asarray(after, dtype=np.float32) - np.asarray(before, dtype=np.float32)).ravel()
    candidates = np.flatnonzero(allowed.ravel())
    k = max(1, math.ceil(keep * candidates.size - 1e-9)) if candidates.size else 0
    order = np.argsort(-change[candidates], kind="stable")
    mask = np.zeros(allowed.size, dtype=bool)
    mask[candidates[order[:k]]] = True
    return mask.reshape(allowed.shape)
