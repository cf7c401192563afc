"""`fedprune profile`: measure what this device can give to training and write its DeviceProfile.

The memory planner trusts a profile more than any catalogue guess, so every number here is read
or measured on the device itself, and what could not be measured is left out (None) rather than
guessed. The system roots (/proc, /sys/fs/cgroup, /sys/class/power_supply) are arguments so tests
can point them at fake files.

torch, Opacus and paho-mqtt are imported only by the steps that need them: argument errors are
reported at once, and a device without a broker never needs paho-mqtt.
"""

from __future__ import annotations

import argparse
import os
import platform
import queue
import re
import shutil
import socket
import statistics
import time
import uuid
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tqdm import tqdm

from device_profiles import REFERENCE_BATCH_SIZE, REFERENCE_MODEL, DeviceProfile, parse_profile

__all__ = [
    "LIBRARIES",
    "ProfilingError",
    "battery_state",
    "cgroup_memory",
    "installed_libraries",
    "main_profile",
    "measure_network",
    "measure_profile",
    "measure_throughput",
    "memory_budget",
    "parse_bandwidth",
    "parse_broker_url",
    "read_meminfo",
]

LIBRARIES = ("torch", "opacus", "numpy", "onnxruntime", "ai-edge-litert", "paho-mqtt")

# cgroup v1 has no "max": an unlimited group reports PAGE_COUNTER_MAX in bytes (about 2**63
# rounded down to a page). Anything from 2**60 (1 EiB) up is that sentinel, not a real limit.
_V1_UNLIMITED = 1 << 60

_BANDWIDTH_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_THROUGHPUT_SIZES = (16 << 10, 64 << 10, 256 << 10, 1 << 20)
_SLOW_TRANSFER_S = 2.0
_PING_TIMEOUT_S = 5.0
_TRANSFER_TIMEOUT_S = 30.0


class ProfilingError(ValueError):
    """A profile that cannot be measured as asked; the CLI prints the message, not a traceback."""


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


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


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


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
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


# --- compute ----------------------------------------------------------------------------------


def measure_throughput(seconds: float, dp: bool, batch_size: int = REFERENCE_BATCH_SIZE,
                       seed: int = 0) -> float:
    """Training samples per second of the reference model (FedP3's CNN), plain SGD or DP-SGD.

    The inputs are random tensors of the model's input shape: this measures speed, not learning,
    and the cost of a step does not depend on the values. The run is calibrated by wall time
    rather than a step count so a slow device finishes as quickly as a fast one; one warm-up
    batch first keeps allocator and hook set-up out of the figure. DP goes through Opacus's
    ghost clipping with Poisson sampling exactly as `training/local.py` trains, because that is
    the speed the planner must budget for.
    """
    import torch
    from torch import nn

    from .models import build_model, model_spec
    from .training.local import TrainConfig

    defaults = TrainConfig()
    spec = model_spec(REFERENCE_MODEL, (1, 28, 28), 10)
    model = build_model(spec, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    pool = batch_size * 10
    x = torch.randn(pool, *spec.input_shape, generator=generator)
    y = torch.randint(0, spec.num_classes, (pool,), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=defaults.lr)
    criterion: nn.Module = nn.CrossEntropyLoss()

    if dp:
        from opacus import PrivacyEngine

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure-RNG advice; irrelevant to a speed test
            model, optimizer, criterion, loader = PrivacyEngine().make_private(
                module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
                noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost",
                noise_generator=generator)
        batches = _forever(loader)
    else:
        batches = _forever([(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, pool, batch_size)])

    def step(xb, yb) -> int:
        if len(xb) == 0:  # Poisson sampling can draw an empty batch
            return 0
        loss = criterion(model(xb), yb)
        loss.backward()
        if not dp and defaults.clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), defaults.clip_norm)
        optimizer.step()
        optimizer.zero_grad()
        return len(xb)

    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook")
        step(*next(batches))
        samples = 0
        start = time.perf_counter()
        while True:
            samples += step(*next(batches))
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    if samples == 0:
        raise ProfilingError("the compute test trained no samples; try again without --quick")
    return samples / elapsed


def _forever(batches):
    while True:
        yield from batches


# --- network ----------------------------------------------------------------------------------


def parse_bandwidth(text: str) -> tuple[float, float]:
    """"UP,DOWN" in bytes/s with optional decimal suffixes k, M, G (link speeds are decimal)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2:
        raise ProfilingError(f"--bandwidth {text!r}: expected UP,DOWN in bytes/s, e.g. 2M,8M or 500k,1.5M")
    rates = []
    for part in parts:
        match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgG]?)", part)
        value = float(match.group(1)) * _BANDWIDTH_SUFFIXES[match.group(2).lower()] if match else 0.0
        if value <= 0:
            raise ProfilingError(f"--bandwidth {text!r}: {part!r} is not a positive rate in bytes/s "
                                 f"(a number with an optional k, M or G suffix)")
        rates.append(value)
    return rates[0], rates[1]


def parse_broker_url(url: str) -> tuple[str, int]:
    """mqtt://HOST[:PORT] -> (host, port); TLS (mqtts://) is not supported by this tool yet."""
    parts = urlsplit(url)
    try:
        port = parts.port or 1883
    except ValueError:
        port = None
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname or port is None:
        raise ProfilingError(f"--broker {url!r}: expected mqtt://HOST[:PORT], e.g. mqtt://192.168.1.10:1883")
    return parts.hostname, port


def measure_network(url: str, pings: int = 10, measure_bandwidth: bool = True) -> dict[str, float | None]:
    """Latency and link rate to the coordinator's MQTT broker, from publishes echoed to ourselves.

    The tool subscribes to a topic of its own and publishes to it at QoS 1, so each message goes
    device -> broker -> device: latency_ms is the median of those round trips for tiny messages.
    Throughput is timed the same way with growing payloads (stopping once one takes over 2 s, so a
    slow link is not tied up); a round trip through the broker carries the payload up and then
    down, so bytes / (round trip / 2) is one estimate for both directions. Up and down therefore
    come out the same unless `--bandwidth` gives them separately.
    """
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise ProfilingError("--broker needs paho-mqtt on the device: pip install paho-mqtt, "
                             "or pass --bandwidth UP,DOWN instead") from None
    host, port = parse_broker_url(url)
    token = uuid.uuid4().hex[:12]
    topic = f"fedprune/profile/{token}"
    received: queue.Queue[tuple[bytes, float]] = queue.Queue()
    acks: queue.Queue[Any] = queue.Queue()  # CONNACK, then SUBACK

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fedprune-profile-{token}",
                         clean_session=True, protocol=mqtt.MQTTv311, reconnect_on_failure=False)
    client.on_connect = lambda _c, _u, _f, reason, _p: acks.put(reason)
    client.on_subscribe = lambda _c, _u, _m, reasons, _p: acks.put(reasons)
    client.on_message = lambda _c, _u, msg: received.put((msg.payload, time.perf_counter()))
    client.connect_timeout = _PING_TIMEOUT_S

    def fail(why: str) -> ProfilingError:
        return ProfilingError(f"MQTT broker {url}: {why}. Check the address and that the broker is "
                              f"running, or pass --bandwidth UP,DOWN instead of --broker")

    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise fail(f"cannot connect ({exc.strerror or exc})") from None
    client.loop_start()
    try:
        reason = _wait(acks, _PING_TIMEOUT_S)
        if reason is None or reason.is_failure:
            raise fail(f"connection refused by the broker ({reason})" if reason is not None
                       else "no answer to CONNECT")
        client.subscribe(topic, qos=1)
        granted = _wait(acks, _PING_TIMEOUT_S)
        if not granted or any(code.is_failure for code in granted):
            raise fail(f"cannot subscribe to {topic} ({granted})")

        def round_trip(seq: int, size: int, timeout: float) -> float | None:
            header = f"{seq:08d}".encode()
            started = time.perf_counter()
            client.publish(topic, header + bytes(max(size - len(header), 0)), qos=1)
            deadline = started + timeout
            while (left := deadline - time.perf_counter()) > 0:
                try:
                    payload, arrived = received.get(timeout=left)
                except queue.Empty:
                    break
                if payload[:len(header)] == header:
                    return arrived - started
            return None

        rtts = []
        for seq in range(pings):
            rtt = round_trip(seq, 16, _PING_TIMEOUT_S)
            if rtt is None:
                raise fail(f"our own message on {topic} did not come back within {_PING_TIMEOUT_S:.0f} s "
                           f"(does the broker's ACL allow publishing and subscribing there?)")
            rtts.append(rtt)
        result: dict[str, float | None] = {"latency_ms": statistics.median(rtts) * 1000, "rate": None}
        if measure_bandwidth:
            for seq, size in enumerate(_THROUGHPUT_SIZES, start=pings):
                rtt = round_trip(seq, size, _TRANSFER_TIMEOUT_S)
                if rtt is None:  # dropped (e.g. a broker size limit) or hopelessly slow
                    break
                result["rate"] = size / (rtt / 2)
                if rtt > _SLOW_TRANSFER_S:
                    break
            if result["rate"] is None:
                raise fail(f"a {_THROUGHPUT_SIZES[0] >> 10} KB message did not come back within "
                           f"{_TRANSFER_TIMEOUT_S:.0f} s")
        return result
    finally:
        client.disconnect()
        client.loop_stop()


def _wait(events: queue.Queue, timeout: float) -> Any:
    try:
        return events.get(timeout=timeout)
    except queue.Empty:
        return None


# --- the profile ------------------------------------------------------------------------------


def measure_profile(name: str | None = None, broker: str | None = None,
                    bandwidth: tuple[float, float] | None = None, quick: bool = False,
                    disk_path: str | Path = ".", proc_root: str | Path = "/proc",
                    cgroup_root: str | Path = "/sys/fs/cgroup",
                    power_supply_root: str | Path = "/sys/class/power_supply",
                    progress: bool = True) -> DeviceProfile:
    """Measure this device and return its validated profile.

    Memory is read before anything else, so the profiler's own model is not counted against the
    device; the network is measured before compute, so a wrong broker address fails in seconds
    and the link test does not compete with training for the CPU.
    """
    if broker is None and bandwidth is None:
        raise ProfilingError("no way to know the link to the coordinator: pass --broker "
                             "mqtt://HOST:PORT to measure it, or --bandwidth UP,DOWN (bytes/s) to give it")
    if broker is not None:
        parse_broker_url(broker)  # a malformed URL is an error before any measuring
    seconds = 1.0 if quick else 3.0
    steps: dict[str, Callable[[], Any]] = {
        "memory": lambda: memory_budget(proc_root, cgroup_root),
        "disk": lambda: disk_free(disk_path),
        "system": lambda: (battery_state(power_supply_root), installed_libraries()),
    }
    if broker is not None:
        steps["network"] = lambda: measure_network(broker, pings=5 if quick else 10,
                                                   measure_bandwidth=bandwidth is None)
    steps["compute (plain)"] = lambda: measure_throughput(seconds, dp=False)
    steps["compute (DP)"] = lambda: measure_throughput(seconds, dp=True)

    results: dict[str, Any] = {}
    with tqdm(total=len(steps), desc="fedprune profile", unit="step", disable=not progress) as bar:
        for label, run in steps.items():
            bar.set_postfix_str(label)
            results[label] = run()
            bar.update()

    total, available, limit = results["memory"]
    battery, libraries = results["system"]
    measured = results.get("network", {"latency_ms": None, "rate": None})
    up, down = bandwidth if bandwidth is not None else (measured["rate"], measured["rate"])
    name = name or socket.gethostname() or "device"
    link = (f"link given as {up:,.0f}/{down:,.0f} bytes/s" if bandwidth is not None
            else f"link measured through {broker}")
    data = {
        "schema_version": 1,
        "name": name,
        "source": (f"measured by `fedprune profile` on {socket.gethostname() or name} at "
                   f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}; compute "
                   f"{seconds:g} s plain + {seconds:g} s DP on random inputs; {link}"),
        "memory_total_bytes": total,
        "memory_available_bytes": available,
        "cgroup_limit_bytes": limit,
        "cpu_cores": cpu_cores(),
        "arch": platform.machine() or "unknown",
        "os": os_description(),
        "compute": {
            "reference_model": REFERENCE_MODEL,
            "samples_per_s": float(results["compute (plain)"]),
            "dp_samples_per_s": float(results["compute (DP)"]),
            "batch_size": REFERENCE_BATCH_SIZE,
        },
        "disk_free_bytes": results["disk"],
        "network": {
            "uplink_bytes_per_s": float(up),
            "downlink_bytes_per_s": float(down),
            "latency_ms": measured["latency_ms"],
            "source": "given" if bandwidth is not None else "measured",
        },
        "battery": battery,
        "libraries": libraries,
    }
    return parse_profile(data, origin="measured profile")


def main_profile(args: argparse.Namespace) -> int:
    """The `fedprune profile` handler: measure, write the JSON, print what the planner will see."""
    bandwidth = parse_bandwidth(args.bandwidth) if args.bandwidth else None
    profile = measure_profile(name=args.name, broker=args.broker, bandwidth=bandwidth, quick=args.quick)
    profile.save(args.out)
    gib = 1 << 30
    limit = "none" if profile.cgroup_limit_bytes is None else f"{profile.cgroup_limit_bytes / gib:.2f} GiB"
    net = profile.network
    latency = "" if net.latency_ms is None else f", latency {net.latency_ms:.1f} ms"
    print(f"profile of {profile.name} written to {args.out}")
    print(f"  memory:  {profile.memory_available_bytes / gib:.2f} GiB available of "
          f"{profile.memory_total_bytes / gib:.2f} GiB (cgroup limit: {limit}); {profile.cpu_cores} cores")
    print(f"  compute: {profile.compute.samples_per_s:,.0f} samples/s plain, "
          f"{profile.compute.dp_samples_per_s:,.0f} samples/s DP ({profile.compute.reference_model}, "
          f"batch {profile.compute.batch_size})")
    print(f"  network: up {net.uplink_bytes_per_s / 1e6:,.2f} MB/s, down "
          f"{net.downlink_bytes_per_s / 1e6:,.2f} MB/s ({net.source}){latency}")
    return 0
