"""`source = "contract"`: no samples, only the model input the fleet's samples are made for.

A coordinator whose fleet's data never leaves the devices still has to build the model and state
its input contract in every exported manifest: `input_shape` and `classes` (both required),
`mean` and `std`, and `input_scale` (what raw values are divided by first: 255 for 8-bit images,
as an image folder's are; default 1). It holds nothing to train on or evaluate on, so a device or
a simulation naming it is refused.
"""

from __future__ import annotations

from ..datasets import DatasetInfo
from ..locate import DataError
from .registry import SourceKind
from .settings import DataSettings

def _check(settings: DataSettings) -> None:
    for key in ("input_shape", "classes"):
        if getattr(settings, key) is None:
            raise ValueError(f"{key}: the contract source declares the model's input: set "
                             "input_shape (e.g. [3, 32, 32]) and classes (the names in output order)")


def contract_info(settings: DataSettings) -> DatasetInfo:
    """The contract as an exported manifest states it (mean and std one per channel)."""
    channels = settings.input_shape[0]

    def per_channel(values, default):
        values = tuple(values or (default,))
        return values * channels if len(values) == 1 else values

    return DatasetInfo(settings.name, settings.input_shape, len(settings.classes), settings.classes,
                       settings.input_scale or 1.0, per_channel(settings.mean, 0.0),
                       per_channel(settings.std, 1.0))


def _refuse(settings: DataSettings, *_args) -> None:
    raise DataError("[data]: the contract source holds no samples, only the model input they are "
                    "made for; a device trains on its own samples and a simulation partitions "
                    "them: name them in [data] (source and path)")


KIND = SourceKind("contract", keys=frozenset({"source", "input_shape", "classes", "mean", "std",
                                              "input_scale"}),
                  path="refused", check=_check, device=_refuse, federated=_refuse)
