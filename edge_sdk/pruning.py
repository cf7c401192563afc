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
