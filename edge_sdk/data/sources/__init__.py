"""Data sources: what a device trains on and what a simulation partitions, named by `[data]`.

A kind of source is one module here with a `KIND` (imagefolder, csv, npz, benchmark), an entry
point of the `fedprune.data_sources` group, or a user's `package.module:function` returning a
`torch.utils.data.Dataset`. `DataSettings` (settings.py) documents the `[data]` keys.
"""

from .loaded import DataContract, DeviceData, FederatedData
from .loading import device_data, federated_data
from .records import Record, Records, Samples, SkipLog
from .registry import ENTRY_POINT_GROUP, SourceKind, source_kind, source_names
from .settings import CONFIG_DIR, DataSettings

__all__ = [
    "CONFIG_DIR",
    "ENTRY_POINT_GROUP",
    "DataContract",
    "DataSettings",
    "DeviceData",
    "FederatedData",
    "Record",
    "Records",
    "Samples",
    "SkipLog",
    "SourceKind",
    "device_data",
    "federated_data",
    "source_kind",
    "source_names",
]
