"""Device profiles: what each edge device can give to training (issue 3).

A `DeviceProfile` is the one input the memory planner needs about a device: memory it
may use, training throughput on a reference model, link speeds. It comes either from
`fedprune-edge profile` run on the device, or, before a device reports and in
simulations, from the catalogue of real device classes built from public tables in
the shared data. `sample_fleet` draws seeded fleets from that catalogue.

The measurements behind a real profile are here too, one job per module, imported
only by whoever measures: `readers` (memory, cgroup limit, cores, OS, disk, battery,
libraries; standard library only), `throughput` (the compute test, torch and Opacus
on a model the caller gives) and `network` (the link test over a publish-subscribe
connection the caller owns).

This package imports none of fedprune's other packages: `edge_sdk` and everything
above it depend on it, never the reverse.
"""

from .catalogue import (
    CATALOGUE,
    FLASH_KB_BYTES,
    PHONE_CLASSES,
    REFERENCE_BATCH_SIZE,
    REFERENCE_DP_SAMPLES_PER_S,
    REFERENCE_MODEL,
    REFERENCE_SAMPLES_PER_S,
    CatalogueError,
    catalogue_names,
    catalogue_profile,
)
from .fleet import parse_fleet_arg, sample_fleet
from .profile import (
    SUPPORTED_SCHEMA_VERSIONS,
    BatteryProfile,
    ComputeProfile,
    DeviceProfile,
    NetworkProfile,
    ProfileError,
    ProfilingError,
    load_profile,
    parse_profile,
)
from .tiers import TIERS, tier_index, tier_of

__all__ = [
    "CATALOGUE",
    "FLASH_KB_BYTES",
    "PHONE_CLASSES",
    "REFERENCE_BATCH_SIZE",
    "REFERENCE_DP_SAMPLES_PER_S",
    "REFERENCE_MODEL",
    "REFERENCE_SAMPLES_PER_S",
    "SUPPORTED_SCHEMA_VERSIONS",
    "TIERS",
    "BatteryProfile",
    "CatalogueError",
    "ComputeProfile",
    "DeviceProfile",
    "NetworkProfile",
    "ProfileError",
    "ProfilingError",
    "catalogue_names",
    "catalogue_profile",
    "load_profile",
    "parse_fleet_arg",
    "parse_profile",
    "sample_fleet",
    "tier_index",
    "tier_of",
]
