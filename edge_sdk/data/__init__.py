"""Data access for fedprune: verified dataset files, loaders and client partitions."""

from .datasets import (DATASET_NAMES, DatasetInfo, FederatedSource, dataset_info, load_dataset, read_idx,
                       to_tensor)
from .locate import DataError, download_enabled_by_default, ensure_file, resolve_data_dir, user_cache_dir
from .partition import (
    ClientData,
    PartitionSpec,
    client_data_for,
    make_client_data,
    parse_partition,
    partition,
    train_test_split,
)

__all__ = [
    "DATASET_NAMES",
    "ClientData",
    "DataError",
    "DatasetInfo",
    "FederatedSource",
    "PartitionSpec",
    "client_data_for",
    "dataset_info",
    "download_enabled_by_default",
    "ensure_file",
    "load_dataset",
    "make_client_data",
    "parse_partition",
    "partition",
    "read_idx",
    "resolve_data_dir",
    "to_tensor",
    "train_test_split",
    "user_cache_dir",
]
