"""A device's profile, measured here: what `fedprune-edge profile` and the agent's
`profile = "measure"` run.

The measurements themselves live in `device_profiles` (`readers`: memory, cgroup limit, cores,
OS, disk, battery, libraries; `throughput`: the compute test; `network`: the link test). This
module supplies what only the device SDK has, the reference model as the device trains it and
the MQTT connection to the broker, and assembles the validated `DeviceProfile`. What could not be
measured is left out (None) rather than guessed.

torch, Opacus and paho-mqtt are imported only by the steps that need them: argument errors are
reported at once, and a device without a broker never needs paho-mqtt.
"""

from __future__ import annotations

import platform
import queue
import socket
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from device_profiles import (REFERENCE_BATCH_SIZE, REFERENCE_MODEL, DeviceProfile, ProfilingError,
                             parse_profile)
from device_profiles.network import PING_TIMEOUT_S, measure_link
from device_profiles.readers import (
    battery_state,
    cpu_cores,
    disk_free,
    installed_libraries,
    memory_budget,
    os_description,
)

__all__ = ["measure_network", "measure_profile", "measure_reference_throughput",
           "parse_broker_url"]


def measure_reference_throughput(seconds: float, dp: bool, seed: int = 0) -> float:
    """Samples/s of the reference model (FedP3's CNN on 28x28 inputs, batch 48) trained as the
    device trains it: the same network code and the default learning rate and clipping."""
    from device_profiles.throughput import measure_throughput

    from .models import build_model, model_spec
    from .settings import TrainSettings

    defaults = TrainSettings()
    spec = model_spec(REFERENCE_MODEL, (1, 28, 28), 10)
    return measure_throughput(build_model(spec, seed=seed), spec.input_shape, spec.num_classes,
                              seconds, dp, lr=defaults.lr, clip_norm=defaults.clip_norm,
                              batch_size=REFERENCE_BATCH_SIZE, seed=seed)


def _transport_module():
    """edge_sdk.protocol.transport, the SDK's one MQTT client; paho-mqtt is needed only here."""
    try:
        from .protocol import transport
    except ImportError:
        raise ProfilingError("--broker needs paho-mqtt on the device: pip install paho-mqtt, "
                             "or pass --bandwidth UP,DOWN instead") from None
    return transport


def parse_broker_url(url: str) -> tuple[str, int]:
    """mqtt://HOST[:1883] or mqtts://HOST[:8883] -> (host, port), parsed as the agent's own
    connection parses it (`BrokerAddress`), so the profiler accepts every broker the agent does."""
    try:
        address = _transport_module().BrokerAddress.parse(url)
    except ValueError:
        raise ProfilingError(f"--broker {url!r}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT] "
                             f"(TLS), e.g. mqtt://192.168.1.10:1883") from None
    return address.host, address.port


def measure_network(url: str, pings: int = 10, measure_bandwidth: bool = True, *,
                    username: str | None = None, password: str | None = None,
                    tls_ca: str | None = None, topic: str | None = None) -> dict[str, float | None]:
    """Latency and link rate to the coordinator's MQTT broker (`device_profiles.network`), over
    the shared `MqttTransport`: a one-off clean session subscribed to `topic`, which it publishes
    to and reads back.

    A device of a provisioned fleet passes what its agent connects with (edge.toml's broker URL,
    user name, password and fleet CA for mqtts://) and its `Topics.profile` topic: the broker's ACL
    (`pattern readwrite <root>/profile/%u`, written by `provision`) allows
    it no other. Such a broker makes the client id the user name, so this clean session replaces
    the device's own persistent one: it runs before the agent first connects (`profile =
    "measure"` measures once, at the agent's first start). Without a topic, a random one under
    fedprune/profile/ (an open broker, `fedprune-edge profile --broker`).
    """
    transport_module = _transport_module()
    parse_broker_url(url)
    token = uuid.uuid4().hex[:12]
    topic = topic or f"fedprune/profile/{token}"

    def fail(why: str) -> ProfilingError:
        return ProfilingError(f"MQTT broker {url}: {why}. Check the address, the credentials and CA "
                              f"of a TLS broker, and that the broker is running, or pass "
                              f"--bandwidth UP,DOWN instead of --broker")

    try:
        # Not reconnected, and acknowledged by paho on arrival: nothing here is worth redelivering.
        transport = transport_module.MqttTransport(
            f"fedprune-profile-{token}", url, username=username, password=password, tls_ca=tls_ca,
            clean_session=True, reconnect=False, manual_ack=False)
    except (ValueError, OSError) as exc:  # tls_ca on mqtt://, an unreadable CA file
        raise fail(str(exc)) from None

    def receive(timeout: float) -> tuple[bytes, float] | None:
        try:
            delivery = transport.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        return delivery.payload, delivery.arrived

    try:
        transport.connect(PING_TIMEOUT_S)
        transport.subscribe(topic, PING_TIMEOUT_S)
        return measure_link(lambda payload: transport.publish(topic, payload), receive, pings,
                            measure_bandwidth)
    except transport_module.TransportError as exc:
        raise fail(str(exc)) from None
    except ProfilingError as exc:
        raise fail(f"on {topic}, {exc}") from None
    finally:
        transport.stop()


def measure_profile(name: str | None = None, broker: str | None = None,
                    bandwidth: tuple[float, float] | None = None, quick: bool = False,
                    disk_path: str | Path = ".", proc_root: str | Path = "/proc",
                    cgroup_root: str | Path = "/sys/fs/cgroup",
                    power_supply_root: str | Path = "/sys/class/power_supply",
                    progress: bool = True, *, username: str | None = None,
                    password: str | None = None, tls_ca: str | None = None,
                    topic: str | None = None) -> DeviceProfile:
    """Measure this device and return its validated profile.

    Memory is read before anything else, so the profiler's own model is not counted against the
    device; the network is measured before compute, so a wrong broker address fails in seconds
    and the link test does not compete with training for the CPU. `username`, `password`,
    `tls_ca` and `topic` are how the link test reaches the broker: see `measure_network`.
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
                                                   measure_bandwidth=bandwidth is None,
                                                   username=username, password=password,
                                                   tls_ca=tls_ca, topic=topic)
    steps["compute (plain)"] = lambda: measure_reference_throughput(seconds, dp=False)
    steps["compute (DP)"] = lambda: measure_reference_throughput(seconds, dp=True)

    results: dict[str, Any] = {}
    with tqdm(total=len(steps), desc="fedprune-edge profile", unit="step",
              disable=None if progress else True) as bar:
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
        "source": (f"measured by `fedprune-edge profile` on {socket.gethostname() or name} at "
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
