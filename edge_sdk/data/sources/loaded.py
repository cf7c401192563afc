"""What a loaded source gives a device and a simulation: samples, their contract, skip counts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..datasets import DatasetInfo
from ..partition import ClientData


@dataclass(frozen=True)
class DataContract:
    """The model input the data is made for: its shape and its classes, in output order."""

    input_shape: tuple[int, ...]
    classes: tuple[str, ...]

    def mismatch(self, input_shape, num_classes: int) -> str | None:
        """Why a model of this input shape and class count cannot train on the data, if it cannot."""
        shape = tuple(int(d) for d in input_shape)
        if shape == self.input_shape and num_classes == len(self.classes):
            return None
        # Shape and count only: the class names may be the device's own folder names (people's,
        # places'), and nothing about the data leaves the device but counts.
        return (f"the task's model takes input {shape} and has {num_classes} classes; this device's "
                f"data is {self.input_shape} with {len(self.classes)} classes: give the device a "
                "model made for its data, or set its [data] input_shape and classes")


@dataclass(frozen=True, eq=False)
class DeviceData:
    """A device's own samples, split for training and testing on the device."""

    data: ClientData
    contract: DataContract
    skipped: dict[str, int] = field(default_factory=dict)
    name: str = ""


@dataclass(frozen=True, eq=False)
class FederatedData:
    """A simulation's data: one shard per client, a global test set, and the contract (`info`)
    its models and exported bundles are made for."""

    info: DatasetInfo
    shards: list[ClientData]
    test_x: torch.Tensor
    test_y: torch.Tensor
    skipped: dict[str, int] = field(default_factory=dict)
