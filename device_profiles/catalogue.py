"""Named profiles for real device classes, for simulations and for planning before a device reports.

Where the numbers come from, per field:

- Memory total: Raspberry Pi boards from the revision-code table
  (`device-profiles/raspberry_pi_revision_codes.csv`, from Raspberry Pi Ltd's
  documentation, CC BY-SA 4.0), phones from the AI Benchmark phone list
  (`device-profiles/ai_benchmark_phones_flash.csv`). Both are read from the files,
  never copied into code, and pinned by sha256 like every other data file; the
  package ships copies of the shared data's tables (`data/`, provenance in
  `data/SOURCES.md`), so an installed device needs nothing beside it. The
  Jetson Nano and the 512 MB gateway have no public machine-readable table, so
  their RAM is a hard-coded vendor/class figure and their source says so.
- Memory available for training: total minus an OS/runtime reserve per class. The
  reserves are ASSUMPTIONS, not measurements: 250 MiB for a Pi on Raspberry Pi OS
  Lite (kernel, GPU split, services), 1 GiB for a Jetson Nano on L4T (Ubuntu,
  memory shared with the GPU), 128 MiB for a minimal embedded-Linux gateway, and
  35% of total for phones (Android, other apps, low-memory-killer headroom).
- Compute: this machine's measured reference throughput (FedP3 CNN, batch 48:
  2,900 samples/s plain SGD, 1,000 samples/s Opacus ghost-clipping DP-SGD on a
  2-core x86 server) times a per-class factor. The factors are ESTIMATES, to be
  replaced by running `fedprune-edge profile` on the real device: Pi 5 1/3, Pi 4 1/8,
  Jetson Nano (CPU only) 1/6, Pi 3B 1/20, gateway 1/40, high phone 1/2, and the
  other phones 1/2 times their `cpu_f_ai_score` relative to the high phone.
- Network: Pi, Jetson and gateway links are ASSUMED typical values (Wi-Fi to a
  coordinator on the same LAN; LTE for the gateway). Phones use the median, over
  FLASH's 19 traced smartphones, of the mean up/down throughput (see
  `fleet.py` for the per-device draws and the unit convention).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from importlib import resources
from pathlib import Path

from .profile import ComputeProfile, DeviceProfile, NetworkProfile

__all__ = [
    "CATALOGUE",
    "FLASH_KB_BYTES",
    "PHONE_CLASSES",
    "REFERENCE_BATCH_SIZE",
    "REFERENCE_DP_SAMPLES_PER_S",
    "REFERENCE_MACHINE",
    "REFERENCE_MODEL",
    "REFERENCE_SAMPLES_PER_S",
    "CatalogueError",
    "catalogue_names",
    "catalogue_profile",
    "flash_network_traces",
    "table_bytes",
]

REFERENCE_MODEL = "fedp3_cnn"
REFERENCE_BATCH_SIZE = 48
REFERENCE_SAMPLES_PER_S = 2900.0
REFERENCE_DP_SAMPLES_PER_S = 1000.0
REFERENCE_MACHINE = "a 2-core x86 server"

# FLASH's Device converts model bytes to its "kb" with `/ 1024` before dividing by
# the trace speed, so one trace "kb" is 1024 bytes.
FLASH_KB_BYTES = 1024

MIB = 1 << 20
GIB = 1 << 30

_PI_REVISIONS = "device-profiles/raspberry_pi_revision_codes.csv"
_PHONES = "device-profiles/ai_benchmark_phones_flash.csv"
_FLASH_SPEEDS = "device-traces/flash_network_speed_distribution.csv"

# Same pins as shared/data/SOURCES.md and data/SOURCES.md: a substituted table would
# silently change every plan built from the catalogue.
_SHA256 = {
    _PI_REVISIONS: "b4ae16e0d50859c120ce66996a1f946de899b3887b2c18f5c7315e0dd03e4a21",
    _PHONES: "345c7f395c9c8f2ad5d81c4e2a4739e087d628aa8f1cc74e76943d49d121c849",
    _FLASH_SPEEDS: "8dcf3a934bcca686159dc773ff0cc6119751d5041dd8656f2911a82633f06660",
}

_ESTIMATE_NOTE = "an estimate: replace it by running `fedprune-edge profile` on the real device"


class CatalogueError(ValueError):
    """An unknown catalogue name, or a catalogue data file that is missing or corrupt."""


# The tables ship inside this package (see data/SOURCES.md): a device installed from the wheel
# builds its catalogue profile with no copy of the shared data beside it.
_PACKAGED = resources.files(__package__).joinpath("data")


def table_bytes(rel_path: str, data_dir: str | Path | None = None) -> bytes:
    """The bytes of a pinned device table, checked against its sha256.

    Read from the copy shipped in this package, or from `data_dir` when given (a folder laid
    out like shared/data). Nothing falls back to another copy: a table that is missing or
    differs is a CatalogueError, since a substitute would silently change every plan.
    """
    return _verified(rel_path, Path(data_dir).expanduser().resolve() if data_dir else None)


@lru_cache(maxsize=None)
def _verified(rel_path: str, data_dir: Path | None) -> bytes:
    where = (data_dir or _PACKAGED).joinpath(rel_path)
    fix = (f"copy it from shared/data (see device_profiles/data/SOURCES.md) into {data_dir}"
           if data_dir else "reinstall fedprune: this installation lacks the package data it ships with")
    try:
        data = where.read_bytes()
    except OSError as exc:
        raise CatalogueError(f"cannot read the device table {where} ({exc.strerror or exc}): {fix}.") from None
    actual, expected = hashlib.sha256(data).hexdigest(), _SHA256[rel_path]
    if actual != expected:
        raise CatalogueError(f"checksum mismatch for the device table {where}: expected sha256 "
                             f"{expected}, got {actual}; {fix}.")
    return data


@lru_cache(maxsize=None)
def _rows(rel_path: str, data_dir: str | Path | None) -> tuple[dict[str, str], ...]:
    text = table_bytes(rel_path, data_dir).decode("utf-8")
    return tuple(csv.DictReader(io.StringIO(text, newline="")))


def flash_network_traces(data_dir: str | Path | None = None) -> list[dict[str, float | str]]:
    """FLASH's per-device throughput distributions, in FLASH's kb/s (see FLASH_KB_BYTES)."""
    return [
        {
            "device_guid": row["device_guid"],
            **{key: float(row[key]) for key in ("down_mean", "down_std", "up_mean", "up_std")},
        }
        for row in _rows(_FLASH_SPEEDS, data_dir)
    ]


def _compute(factor: float) -> ComputeProfile:
    return ComputeProfile(
        reference_model=REFERENCE_MODEL,
        samples_per_s=REFERENCE_SAMPLES_PER_S * factor,
        dp_samples_per_s=REFERENCE_DP_SAMPLES_PER_S * factor,
        batch_size=REFERENCE_BATCH_SIZE,
    )


def _compute_note(factor_text: str) -> str:
    return (
        f"compute = {REFERENCE_SAMPLES_PER_S:,.0f} / {REFERENCE_DP_SAMPLES_PER_S:,.0f} samples/s "
        f"(plain / DP-SGD, {REFERENCE_MODEL}, batch {REFERENCE_BATCH_SIZE}, measured on "
        f"{REFERENCE_MACHINE}) x {factor_text}, {_ESTIMATE_NOTE}"
    )


@dataclass(frozen=True)
class _Link:
    """An assumed link: the numbers and the sentence that justifies them."""

    up_mbit: float
    down_mbit: float
    latency_ms: float
    why: str

    def profile(self) -> NetworkProfile:
        return NetworkProfile(
            uplink_bytes_per_s=self.up_mbit * 1e6 / 8,
            downlink_bytes_per_s=self.down_mbit * 1e6 / 8,
            latency_ms=self.latency_ms,
            source="catalogue",
        )

    def note(self) -> str:
        return (
            f"network {self.down_mbit:g}/{self.up_mbit:g} Mbit/s down/up, {self.latency_ms:g} ms "
            f"(assumption: {self.why})"
        )


_WIFI_N_24 = _Link(15, 20, 5, "2.4 GHz 802.11n Wi-Fi to a coordinator on the same LAN")
_WIFI_AC = _Link(60, 80, 3, "5 GHz 802.11ac Wi-Fi to a coordinator on the same LAN")
_LTE = _Link(5, 20, 50, "LTE backhaul, typical of a field gateway")


@dataclass(frozen=True)
class _PiClass:
    board: str  # the CSV's `model` column
    ram_label: str | None  # the CSV's `ram` column when the board comes in several sizes
    factor: float
    factor_text: str
    link: _Link


_PI_RESERVE = 250 * MIB
_PI_OS = "Linux (Raspberry Pi OS Lite, 64-bit)"


def _pi(spec: _PiClass, name: str, data_dir: str | Path | None = None) -> DeviceProfile:
    rows = [
        r
        for r in _rows(_PI_REVISIONS, data_dir)
        if r["model"] == spec.board and (spec.ram_label is None or r["ram"] == spec.ram_label)
    ]
    sizes = {r["ram_mb"] for r in rows}
    if len(sizes) != 1 or not rows[0]["ram_mb"]:
        raise CatalogueError(
            f"{name}: expected Raspberry Pi revision rows for model {spec.board!r} "
            f"with one RAM size, found {sorted(sizes) or 'none'}"
        )
    ram_mib = int(rows[0]["ram_mb"])
    codes = ", ".join(r["revision_code"] for r in rows)
    processors = "/".join(sorted({r["processor"] for r in rows}))
    source = (
        f"catalogue {name}: Raspberry Pi {spec.board} ({processors}, 4 cores); RAM {ram_mib} MiB "
        f"from the Raspberry Pi revision-code table (raspberrypi/documentation revision-codes.adoc, "
        f"CC BY-SA 4.0; rows {codes}); available = total - 250 MiB reserve for Raspberry Pi OS "
        f"Lite (assumption); {_compute_note(spec.factor_text)}; {spec.link.note()}"
    )
    total = ram_mib * MIB
    return DeviceProfile(
        schema_version=1,
        name=name,
        source=source,
        memory_total_bytes=total,
        memory_available_bytes=total - _PI_RESERVE,
        cpu_cores=4,
        # The 32-bit OS would report armv7l, but torch ships no official armv7l wheel.
        arch="aarch64",
        os=_PI_OS,
        compute=_compute(spec.factor),
        network=spec.link.profile(),
    )


@dataclass(frozen=True)
class _FixedClass:
    """A device class with no public machine-readable table: its numbers are stated here."""

    description: str
    total: int
    reserve: int
    reserve_why: str
    factor: float
    factor_text: str
    cores: int
    arch: str
    os: str
    link: _Link


_JETSON_NANO = _FixedClass(
    "NVIDIA Jetson Nano 4GB, 4 GB RAM shared by CPU and GPU, 4 Cortex-A57 cores (vendor spec; "
    "no public machine-readable table)", 4 * GIB, 1 * GIB, "L4T/Ubuntu", 1 / 6, "1/6 (CPU only)",
    4, "aarch64", "Linux (NVIDIA L4T, Ubuntu)", _WIFI_AC)
_GATEWAY = _FixedClass(
    "generic 512 MiB, 2-core ARMv7 IoT gateway (assumed class; no public table)", 512 * MIB,
    128 * MIB, "a minimal embedded Linux", 1 / 40, "1/40", 2, "armv7l", "Linux (embedded)", _LTE)


def _fixed(spec: _FixedClass, name: str, data_dir: str | Path | None = None) -> DeviceProfile:
    reserve_text = f"{spec.reserve // GIB} GiB" if spec.reserve % GIB == 0 else f"{spec.reserve // MIB} MiB"
    source = (
        f"catalogue {name}: {spec.description}; available = total - {reserve_text} reserve for "
        f"{spec.reserve_why} (assumption); {_compute_note(spec.factor_text)}; {spec.link.note()}"
    )
    return DeviceProfile(
        schema_version=1,
        name=name,
        source=source,
        memory_total_bytes=spec.total,
        memory_available_bytes=spec.total - spec.reserve,
        cpu_cores=spec.cores,
        arch=spec.arch,
        os=spec.os,
        compute=_compute(spec.factor),
        network=spec.link.profile(),
    )


# Percentile of the phone list (by CPU float AI score) that each phone class stands for,
# with the core count and ISA we assume for it: the CSV lists neither. The bottom decile
# is mostly 2013-2015 quad-core Cortex-A7 SoCs, the rest mostly 64-bit octa-cores.
_PHONE_PERCENTILES = {
    "phone-low": (10, 4, "armv7l"),
    "phone-mid": (50, 8, "aarch64"),
    "phone-high": (90, 8, "aarch64"),
}
PHONE_CLASSES: tuple[str, ...] = tuple(_PHONE_PERCENTILES)
_PHONE_RESERVE_FRACTION = 0.35
_HIGH_PHONE_FACTOR = 0.5


def _phone_score(row: dict[str, str]) -> float:
    """cpu_f_ai_score is the CPU float32 score, the closest match to CPU training; older
    rows may lack it, so fall back to the overall ai_score."""
    for key in ("cpu_f_ai_score", "ai_score"):
        try:
            return float(row[key])
        except (KeyError, ValueError):
            continue
    raise CatalogueError(f"phone {row.get('model')!r} has neither cpu_f_ai_score nor ai_score")


def _nearest_rank(rows: list[dict[str, str]], percentile: int) -> dict[str, str]:
    return rows[max(math.ceil(percentile / 100 * len(rows)) - 1, 0)]


def _phone(name: str, data_dir: str | Path | None = None) -> DeviceProfile:
    percentile, cores, arch = _PHONE_PERCENTILES[name]
    ranked = sorted(_rows(_PHONES, data_dir), key=lambda r: (_phone_score(r), r["model"]))
    row = _nearest_rank(ranked, percentile)
    high = _nearest_rank(ranked, _PHONE_PERCENTILES["phone-high"][0])
    score, high_score = _phone_score(row), _phone_score(high)
    factor = _HIGH_PHONE_FACTOR * score / high_score
    factor_text = (
        f"1/2 x {score:g}/{high_score:g} (its score over the 90th-percentile phone's, "
        f"which is assumed at 1/2)"
    )
    total = round(float(row["ram_gb"]) * GIB)
    traces = flash_network_traces(data_dir)
    up = statistics.median(t["up_mean"] for t in traces) * FLASH_KB_BYTES
    down = statistics.median(t["down_mean"] for t in traces) * FLASH_KB_BYTES
    source = (
        f"catalogue {name}: {row['model']} ({row['soc']}, {row['year']}), the phone at the "
        f"{percentile}th percentile (nearest rank, ties by model name) of the {len(ranked)} phones "
        f"of the AI Benchmark list captured by FLASH, ranked by cpu_f_ai_score "
        f"(ai_score when missing); RAM {row['ram_gb']} GB from that list; {cores} cores, {arch} "
        f"assumed (the list has no core count or ISA); available = total - 35% reserve for Android "
        f"and other apps (assumption); "
        f"{_compute_note(factor_text)}; "
        f"network = median over FLASH's {len(traces)} traced phones of mean up/down throughput"
    )
    return DeviceProfile(
        schema_version=1,
        name=name,
        source=source,
        memory_total_bytes=total,
        memory_available_bytes=math.floor(total * (1 - _PHONE_RESERVE_FRACTION)),
        cpu_cores=cores,
        arch=arch,
        os=f"Android {row['android_version']}",
        compute=_compute(factor),
        network=NetworkProfile(uplink_bytes_per_s=up, downlink_bytes_per_s=down, source="trace"),
    )


_PI_CLASSES = {
    "rpi3b": _PiClass("3B", None, 1 / 20, "1/20", _WIFI_N_24),
    "rpi4-2gb": _PiClass("4B", "2 GB", 1 / 8, "1/8", _WIFI_AC),
    "rpi4-4gb": _PiClass("4B", "4 GB", 1 / 8, "1/8", _WIFI_AC),
    "rpi5-8gb": _PiClass("5", "8 GB", 1 / 3, "1/3", _WIFI_AC),
}

# Each entry builds on call, not at import: importing the package reads no table (edge_sdk
# imports it on every device). The tables themselves are read once and cached.
CATALOGUE: dict[str, Callable[..., DeviceProfile]] = {
    **{name: partial(_pi, spec, name) for name, spec in _PI_CLASSES.items()},
    "jetson-nano-4gb": partial(_fixed, _JETSON_NANO, "jetson-nano-4gb"),
    **{name: partial(_phone, name) for name in PHONE_CLASSES},
    "gateway-512mb": partial(_fixed, _GATEWAY, "gateway-512mb"),
}


def catalogue_names() -> list[str]:
    """Class names in catalogue order (the order fleets draw from)."""
    return list(CATALOGUE)


def catalogue_profile(name: str, data_dir: str | Path | None = None) -> DeviceProfile:
    """Build the named class's profile from the tables shipped in this package (or under
    `data_dir`, laid out like shared/data)."""
    try:
        build = CATALOGUE[name]
    except KeyError:
        raise CatalogueError(
            f"unknown device class {name!r}; the catalogue has: {', '.join(CATALOGUE)}"
        ) from None
    return build(data_dir=data_dir)
