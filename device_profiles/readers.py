"""What the operating system says about this device: memory, cgroup limit, cores, OS, disk,
battery, installed libraries.

Every reader returns what the system reports and leaves out (None) what it cannot read, rather
than guessing. The system roots (/proc, /sys/fs/cgroup, /sys/class/power_supply) are arguments
so tests can point them at fake files. Standard library only: nothing here imports torch.
"""

from __future__ import annotations

import os
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from .profile import ProfilingError

__all__ = [
    "LIBRARIES",
    "battery_state",
    "cgroup_memory",
    "cpu_cores",
    "disk_free",
    "installed_libraries",
    "memory_budget",
    "os_description",
    "read_meminfo",
]

LIBRARIES = ("torch", "opacus", "numpy", "onnxruntime", "ai-edge-litert", "paho-mqtt")

# cgroup v1 has no "max": an unlimited group reports PAGE_COUNTER_MAX in bytes (about 2**63
# rounded down to a page). Anything from 2**60 (1 EiB) up is that sentinel, not a real limit.
_V1_UNLIMITED = 1 << 60


# --- memory -----------------------------------------------------------------------------------


def read_meminfo(path: str | Path = "/proc/meminfo") -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes.

    MemAvailable is the kernel's own estimate of what can be allocated without swapping, which is
    what the planner needs; kernels older than 3.14 lack it, and MemFree is then the honest
    (pessimistic) substitute.
    """
    fields: dict[str, int] = {}
    for line in Path(path).read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
            fields[key.strip()] = int(parts[0]) * scale
    if "MemTotal" not in fields:
        raise ProfilingError(f"{path} has no MemTotal line; cannot tell how much memory this device has")
    return fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))


def cgroup_memory(root: str | Path = "/sys/fs/cgroup",
                  self_cgroup: str | Path = "/proc/self/cgroup") -> tuple[int | None, int | None]:
    """(limit, current usage) of the tightest memory cgroup around this process; limit None when
    there is none.

    A cgroup's limit, not the host's free memory, is where the kernel OOM-kills training, so it
    has to bound the available figure. On cgroup v2 the process may sit in a nested group (a
    systemd service with MemoryMax=, a pod inside a node), and any ancestor's limit applies, so
    every level from the process's own group up to `root` is read and the level with the least
    headroom wins. On v1 (or hybrid) hosts the memory controller lives under `memory/`.
    """
    root = Path(root)
    levels = [directory for directory in _v2_groups(root, Path(self_cgroup))
              if (directory / "memory.max").exists()]
    if levels:
        best: tuple[int | None, int | None] = (None, _read_int(levels[0] / "memory.current"))
        for directory in levels:
            limit = _read_int(directory / "memory.max")  # "max" reads as None
            usage = _read_int(directory / "memory.current")
            if limit is not None and (best[0] is None or limit - (usage or 0) < best[0] - (best[1] or 0)):
                best = (limit, usage)
        return best
    v1 = root / "memory"
    limit = _read_int(v1 / "memory.limit_in_bytes")
    if limit is None or limit >= _V1_UNLIMITED:
        return None, _read_int(v1 / "memory.usage_in_bytes")
    return limit, _read_int(v1 / "memory.usage_in_bytes")


def _v2_groups(root: Path, self_cgroup: Path) -> list[Path]:
    """The process's own v2 group directory and each ancestor up to `root`, innermost first."""
    relative = ""
    try:
        for line in self_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                relative = line[3:].strip().lstrip("/")
    except OSError:
        pass
    directory = root / relative if relative else root
    groups = []
    while True:
        groups.append(directory)
        if directory == root or root not in directory.parents:
            break
        directory = directory.parent
    return groups


def memory_budget(proc_root: str | Path = "/proc",
                  cgroup_root: str | Path = "/sys/fs/cgroup") -> tuple[int, int, int | None]:
    """(total, available, cgroup limit): available is what training may still take."""
    total, available = read_meminfo(Path(proc_root) / "meminfo")
    limit, usage = cgroup_memory(cgroup_root)
    if limit is not None:
        headroom = limit - (usage or 0)
        if headroom <= 0:
            raise ProfilingError(
                f"this container's memory limit ({limit:,} bytes) is fully used ({usage:,} bytes); "
                f"nothing is left for training. Free memory in the container or raise its limit.")
        available = min(available, headroom)
    if available <= 0:
        raise ProfilingError("the kernel reports no available memory; nothing is left for training")
    return total, min(available, total), limit


# --- system -----------------------------------------------------------------------------------


def cpu_cores() -> int:
    """Cores this process may run on: taskset/cpuset can give it fewer than the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux (a developer's laptop)
        return os.cpu_count() or 1


def os_description() -> str:
    description = f"{platform.system()} {platform.release()}".strip()
    try:
        pretty = platform.freedesktop_os_release().get("PRETTY_NAME")
    except OSError:
        pretty = None
    return f"{description} ({pretty})" if pretty else description or "unknown"


def disk_free(path: str | Path = ".") -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def battery_state(root: str | Path = "/sys/class/power_supply") -> dict[str, Any] | None:
    """The system battery's charge and whether it is on mains; None on mains-only devices.

    Supplies of another type (the AC adapter, USB) and batteries of attached devices (scope
    "Device": a mouse, a headset) are skipped. "Full" counts as charging: the device is plugged
    in, which is what the planner wants to know.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    for supply in sorted(root.iterdir()):
        capacity = _read_int(supply / "capacity")
        if capacity is None:
            continue
        if _read_text(supply / "type") not in (None, "Battery"):
            continue
        if _read_text(supply / "scope") == "Device":
            continue
        status = _read_text(supply / "status") or ""
        return {"percent": float(min(max(capacity, 0), 100)), "charging": status in ("Charging", "Full")}
    return None


def installed_libraries(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Versions from package metadata: importing torch or LiteRT just to ask costs seconds."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
