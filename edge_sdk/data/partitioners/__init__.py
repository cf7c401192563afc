"""Partition kinds, one file each, registered by name (registry.py): `iid`, `classes`,
`dirichlet`, `niid-dirichlet`, `natural`, and the tier-aware kinds whose data follows the device
(`tier-classes`, `tier-dirichlet`, `tier-writers`, `tier-quantity`: they need each client's tier,
device_profiles.tiers). A user's own kind is an entry point of the `fedprune.partitioners` group.
"""

from .registry import (ENTRY_POINT_GROUP, NEEDS_FLEET, PartitionerKind, PartitionInput, PartitionSpec,
                       accepted, bad_spec, kinds, no_params, one_param, parse_alpha, parse_int,
                       parse_number, parse_partition, partitioner, partitioner_kind)

__all__ = ["ENTRY_POINT_GROUP", "NEEDS_FLEET", "PartitionInput", "PartitionSpec", "PartitionerKind",
           "accepted", "bad_spec", "kinds", "no_params", "one_param", "parse_alpha", "parse_int",
           "parse_number", "parse_partition", "partitioner", "partitioner_kind"]
