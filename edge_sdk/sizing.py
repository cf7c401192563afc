"""A device's plan (DevicePlan): the submodel and training shape the coordinator sized for it.

Written by `fedprune plan`, read by the device (`fedprune-edge rehearse`, later every task), so it
lives on the SDK side. It records the prediction next to the memory limit it was checked against, so a
rehearsal on the device can confirm or refute it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from device_profiles.files import atomic_write

from .settings import OptimizerName
from .validation import describe


class DevicePlanError(ValueError):
    """A plan file that cannot be used; the message says which field and what to do."""


class DataSlice(BaseModel):
    """Which local data the device trains on (in rehearsals: its shard of a public dataset)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    dataset: str = "fashion-mnist"
    partition: str = "classes:5"
    clients: int = Field(100, ge=1)
    device_index: int = Field(0, ge=0)
    seed: int = 0
    data_dir: str | None = None


class DevicePlan(BaseModel):
    """One device's sizing. Every choice is made by the planner from the device's profile and is
    applied by the round pipeline to each task the device is sent; `decisions` says, per choice,
    the number that forced it."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    schema_version: Literal[3] = 3
    device_id: str
    model: str
    width_ratio: float = Field(gt=0, le=1)
    slicing: Literal["magnitude", "prefix", "rolling"] = "prefix"
    batch_size: int = Field(ge=1)
    physical_batch_size: int = Field(ge=1)
    local_steps: int = Field(ge=0)
    local_samples: int = Field(ge=0)
    dp: bool = True
    noise_multiplier: float = Field(1.0, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    optimizer: OptimizerName = "sgd"
    download_dtype: Literal["fp32", "fp16"] = "fp32"
    download_keep: float = Field(1.0, gt=0, le=1)   # on weights the device does not upload
    upload_dtype: Literal["fp32", "fp16"] = "fp32"
    upload_keep: float = Field(1.0, gt=0, le=1)     # on weights it uploads: most-changed entries
    parameters: int = Field(ge=0)
    predicted_peak_bytes: int = Field(ge=0)
    memory_limit_bytes: int = Field(ge=0)
    download_bytes: int = Field(ge=0)
    upload_bytes: int = Field(ge=0)
    transfer_seconds: float = Field(ge=0)
    compute_seconds: float = Field(ge=0)
    deadline_seconds: float = Field(gt=0)
    fits: bool
    reasons: list[str] = Field(default_factory=list)
    decisions: dict[str, str] = Field(default_factory=dict)  # choice -> the number that forced it
    data: DataSlice = DataSlice()
    measured_peak_bytes: int | None = None

    def save(self, path: str | Path) -> None:
        """Atomic: a device reading its plan while `fedprune plan` rewrites it sees one whole."""
        atomic_write(path, self.model_dump_json(indent=2).encode())

    @classmethod
    def load(cls, path: str | Path) -> DevicePlan:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise DevicePlanError(f"plan file {path} does not exist; create it with "
                                  "`fedprune plan --profile P.json --out plan.json`") from None
        try:
            return cls.model_validate(json.loads(text))
        except json.JSONDecodeError as exc:
            raise DevicePlanError(f"plan file {path} is not JSON: {exc}") from None
        except ValidationError as exc:
            problems = describe(exc, "plan")
            raise DevicePlanError(f"plan file {path} is invalid: {problems}. Re-create it with "
                                  "`fedprune plan`.") from None
