"""A `[data]` table to a device's samples, or to a simulation's client shards and test set.

A device reads its own source, skips what is unusable, and splits train/test itself with a
fixed seed (or takes its source's test data): nothing about the data leaves the device but
counts. A simulation holds out its global test set first (`test_share` of the samples, unless
the source has test data), partitions the rest across its clients with the partitioners of
partitioners/ (through partition.py), and splits each shard locally the way a device would.
"""

from __future__ import annotations

import numpy as np

from ..datasets import DatasetInfo
from ..locate import DataError
from ..partition import ClientData, parse_partition, partition, train_test_split
from ..partitioners import partitioner_kind
from .loaded import DataContract, DeviceData, FederatedData
from .records import Samples, SkipLog, collect, report
from .registry import source_kind
from .settings import DataSettings


def device_data(settings: DataSettings) -> DeviceData:
    """This device's samples, split for local training and testing."""
    kind = source_kind(settings.source)
    if kind.device is not None:
        return kind.device(settings)
    skips = SkipLog()
    train, test = _read(settings, skips, minimum=2)
    if test is None:
        first, second = train_test_split(np.arange(len(train.y)), settings.seed, 0,
                                         1 - settings.local_test_share)
        train, test = train.subset(first), train.subset(second)
    report(skips, settings.name, len(train.y) + len(test.y))
    data = ClientData(0, train.x, train.y, test.x, test.y)
    return DeviceData(data, DataContract(train.input_shape, train.classes), dict(skips.counts),
                      settings.name)


def federated_data(settings: DataSettings, clients: int, partition_spec: str,
                   seed: int, groups: np.ndarray | list[int] | None = None) -> FederatedData:
    """One shard per client (split locally with `seed`, as partition.py's benchmark shards are)
    and the global test set. `groups`: each client's device tier (0 = weakest), which the tier
    partitions (data that follows the device) need; a simulation takes it from its fleet."""
    kind = source_kind(settings.source)
    if kind.federated is not None:
        if groups is None:  # a plug-in's federated() may predate groups
            return kind.federated(settings, clients, partition_spec, seed)
        return kind.federated(settings, clients, partition_spec, seed, groups=groups)
    spec = parse_partition(partition_spec)
    skips = SkipLog()
    pool, test = _read(settings, skips, minimum=2, users=partitioner_kind(spec.kind).needs_writers)
    if test is None:
        order = np.random.default_rng(settings.seed).permutation(len(pool.y))
        cut = min(max(1, round(settings.local_test_share * len(order))), len(order) - 1)
        test, pool = pool.subset(np.sort(order[:cut])), pool.subset(np.sort(order[cut:]))
    report(skips, settings.name, len(pool.y) + len(test.y))
    try:
        parts = partition(pool.y.numpy(), clients, spec, seed, writers=pool.users,
                          num_classes=len(pool.classes), groups=groups)
    except ValueError as exc:
        raise DataError(f"{settings.name}: {len(pool.y)} samples cannot be partitioned "
                        f"{partition_spec!r} across {clients} clients: {exc}") from None
    shards = []
    for client, index in enumerate(parts):
        first, second = train_test_split(index, seed, client, 1 - settings.local_test_share)
        shards.append(ClientData(client, pool.x[first], pool.y[first], pool.x[second],
                                 pool.y[second]))
    return FederatedData(_info(settings, pool), shards, test.x, test.y, dict(skips.counts))


def _read(settings: DataSettings, skips: SkipLog, minimum: int,
          users: bool = False) -> tuple[Samples, Samples | None]:
    """The source's samples, and its test data when it has any (same shape and classes)."""
    kind = source_kind(settings.source)
    if users and settings.user_column is None and "user_column" in kind.keys:
        raise DataError("this partition needs to know whose each sample is: set "
                        "[data] user_column")
    normalisation = {"mean": settings.mean, "std": settings.std}
    train = collect(kind.read(settings, "train", skips), skips, input_shape=settings.input_shape,
                    classes=settings.classes, users=users, minimum=minimum, **normalisation)
    records = kind.read(settings, "test", skips)
    if records is None:
        return train, None
    test = collect(records, skips, input_shape=train.input_shape, classes=train.classes,
                   minimum=1, **normalisation)
    return train, test


def _info(settings: DataSettings, samples: Samples) -> DatasetInfo:
    """The data's input contract, as an exported model's manifest states it."""
    channels = samples.input_shape[0]
    mean = settings.mean or (0.0,)
    std = settings.std or (1.0,)
    return DatasetInfo(settings.name, samples.input_shape, len(samples.classes), samples.classes,
                       samples.input_scale, tuple(mean) * (channels if len(mean) == 1 else 1),
                       tuple(std) * (channels if len(std) == 1 else 1))
