"""Device tiers: the coarse grouping inclusive-FL work reports by (HeteroFL, FjORD, FedRolex,
"No One Left Behind"): what leaving weak devices out costs their own users is read per tier.

A tier is decided by the memory a device may use, nothing else, so it is fixed before any plan,
partition or round: tier-correlated partitions (data that follows the device) and per-tier
metrics group the same devices. The bounds put the catalogue's classes in three groups of like
hardware: under 1 GB (Raspberry Pi 3B, low-end phones, 512 MB gateways), under 3 GB (Pi 4 2 GB,
mid phones), and the rest (Jetson Nano, Pi 4 4 GB, Pi 5, high phones).
"""

from __future__ import annotations

from .profile import DeviceProfile

TIERS = ("low", "mid", "high")  # weakest first: a tier's index orders it
_UPPER_BOUNDS = (1_000_000_000, 3_000_000_000)  # bytes available, exclusive, per tier but the last


def tier_index(profile: DeviceProfile) -> int:
    """0 for the weakest tier, len(TIERS) - 1 for the strongest."""
    return sum(profile.memory_available_bytes >= bound for bound in _UPPER_BOUNDS)


def tier_of(profile: DeviceProfile) -> str:
    return TIERS[tier_index(profile)]
