"""`source = "benchmark"`: a shard of a public benchmark (Fashion-MNIST, MNIST, FEMNIST).

What the demo and the research runs train on: the files are pinned by sha256 (datasets.py), so
nothing is ever skipped; a device takes shard `device_index` of `clients` cut by `partition`
with `seed`, exactly as a simulation of the same settings gives it, and a simulation scores the
global model on the benchmark's official test set.
"""

from __future__ import annotations

import torch

from ..datasets import DATASET_NAMES, load_dataset, to_tensor
from ..partition import client_data_for, make_client_data, needs_groups, parse_partition
from .loaded import DataContract, DeviceData, FederatedData
from .registry import SourceKind
from .settings import DataSettings


def _check(settings: DataSettings) -> None:
    if settings.dataset.strip().lower() not in DATASET_NAMES:
        raise ValueError(f"dataset: unknown benchmark {settings.dataset!r}; the benchmarks "
                         f"are {', '.join(DATASET_NAMES)}")
    if settings.device_index >= settings.clients:
        raise ValueError(f"device_index: {settings.device_index} is not one of the "
                         f"{settings.clients} shards (0..{settings.clients - 1})")
    if needs_groups(parse_partition(settings.partition)):
        # A device knows its own profile, not every other device's: the shards of a tier kind
        # depend on the whole fleet's tiers, which only a simulation's planned fleet has.
        raise ValueError(f"partition: {settings.partition!r} follows the fleet's device tiers, "
                         f"which a device alone cannot know (tiers need the fleet): use it in a "
                         f"simulation with a fleet, or give the device another partition")


def device(settings: DataSettings) -> DeviceData:
    source = load_dataset(settings.dataset, settings.data_dir)
    data = client_data_for(source, settings.clients, settings.partition, settings.seed,
                           settings.device_index, 1 - settings.local_test_share)
    return DeviceData(data, DataContract(source.info.input_shape, source.info.labels), {},
                      source.info.name)


def federated(settings: DataSettings, clients: int, partition: str, seed: int,
              groups=None) -> FederatedData:
    """`groups`: each client's device tier, for the tier kinds (a simulation's planned fleet)."""
    source = load_dataset(settings.dataset, settings.data_dir)
    shards = make_client_data(source, clients, partition, seed, 1 - settings.local_test_share,
                              groups=groups)
    return FederatedData(source.info, shards, to_tensor(source.test_x, source.info),
                         torch.tensor(source.test_y))


KIND = SourceKind("benchmark", keys=frozenset({"source", "dataset", "partition", "clients",
                                               "device_index", "seed", "data_dir", "test_share"}),
                  path="refused", check=_check, device=device, federated=federated)
