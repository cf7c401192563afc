"""What the export tests share: a device plan to export for, and top-1 accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_sdk.sizing import DevicePlan


def device_plan(width: float, folder: Path) -> DevicePlan:
    """The plan of device "tiny-gw" (FedP3's CNN at `width`), saved as folder/plan.json."""
    plan = DevicePlan(device_id="tiny-gw", model="fedp3_cnn", width_ratio=width, slicing="magnitude",
                      batch_size=48, physical_batch_size=8, local_steps=1, local_samples=48,
                      parameters=1, predicted_peak_bytes=1, memory_limit_bytes=1, download_bytes=1,
                      upload_bytes=1, transfer_seconds=0, compute_seconds=0, deadline_seconds=60,
                      fits=True)
    plan.save(folder / "plan.json")
    return plan


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())
