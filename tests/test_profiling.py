"""Profiling a device: the readers (device_profiles/readers.py) on fake system files, the link
test (device_profiles/network.py) over an in-process echo, the compute test
(device_profiles/throughput.py), then the real `fedprune-edge profile` end to end."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device_profiles import ProfilingError, load_profile
from device_profiles import network
from device_profiles.network import measure_link, parse_bandwidth
from device_profiles.readers import battery_state, cgroup_memory, memory_budget, read_meminfo
from device_profiles.throughput import measure_throughput
from edge_sdk.agent import DeviceState, load_edge_config
from edge_sdk.agent.runner import load_profile_dict
from edge_sdk.profiling import measure_network
from edge_sdk.protocol import Topics
from harness.brokers import provisioned_mosquitto

MIB = 1 << 20
MEMINFO = """\
MemTotal:        8000000 kB
MemFree:          500000 kB
MemAvailable:    4000000 kB
Buffers:          100000 kB
HugePages_Total:       0
"""


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def proc(tmp_path):
    _write(tmp_path / "proc" / "meminfo", MEMINFO)
    return tmp_path / "proc"


def test_meminfo_is_read_in_bytes(proc):
    assert read_meminfo(proc / "meminfo") == (8_000_000 * 1024, 4_000_000 * 1024)


def test_meminfo_without_memavailable_falls_back_to_memfree(tmp_path):
    _write(tmp_path / "meminfo", "MemTotal: 2048 kB\nMemFree: 1024 kB\n")
    assert read_meminfo(tmp_path / "meminfo") == (2048 * 1024, 1024 * 1024)


def test_cgroup_v2_limit_bounds_available(proc, tmp_path):
    cgroup = tmp_path / "cgroup"
    _write(cgroup / "memory.max", f"{512 * MIB}\n")
    _write(cgroup / "memory.current", f"{100 * MIB}\n")
    assert cgroup_memory(cgroup) == (512 * MIB, 100 * MIB)
    assert memory_budget(proc, cgroup) == (8_000_000 * 1024, 412 * MIB, 512 * MIB)


def test_cgroup_v2_max_means_no_limit(proc, tmp_path):
    cgroup = tmp_path / "cgroup"
    _write(cgroup / "memory.max", "max\n")
    _write(cgroup / "memory.current", f"{100 * MIB}\n")
    assert memory_budget(proc, cgroup) == (8_000_000 * 1024, 4_000_000 * 1024, None)


def test_cgroup_v1_limit_bounds_available(proc, tmp_path):
    cgroup = tmp_path / "cgroup"
    _write(cgroup / "memory" / "memory.limit_in_bytes", f"{1024 * MIB}\n")
    _write(cgroup / "memory" / "memory.usage_in_bytes", f"{300 * MIB}\n")
    assert memory_budget(proc, cgroup) == (8_000_000 * 1024, 724 * MIB, 1024 * MIB)


def test_cgroup_v1_huge_limit_means_no_limit(proc, tmp_path):
    cgroup = tmp_path / "cgroup"
    _write(cgroup / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    _write(cgroup / "memory" / "memory.usage_in_bytes", f"{300 * MIB}\n")
    assert memory_budget(proc, cgroup) == (8_000_000 * 1024, 4_000_000 * 1024, None)


def test_no_cgroup_files_means_no_limit(proc, tmp_path):
    assert cgroup_memory(tmp_path / "nothing") == (None, None)
    assert memory_budget(proc, tmp_path / "nothing")[2] is None


def test_cgroup_limit_fully_used_is_a_clear_error(proc, tmp_path):
    cgroup = tmp_path / "cgroup"
    _write(cgroup / "memory.max", f"{256 * MIB}\n")
    _write(cgroup / "memory.current", f"{256 * MIB}\n")
    with pytest.raises(ProfilingError, match="fully used"):
        memory_budget(proc, cgroup)


def test_battery_skips_mains_and_reads_the_system_battery(tmp_path):
    _write(tmp_path / "AC" / "type", "Mains\n")
    _write(tmp_path / "AC" / "online", "0\n")
    _write(tmp_path / "BAT0" / "type", "Battery\n")
    _write(tmp_path / "BAT0" / "capacity", "57\n")
    _write(tmp_path / "BAT0" / "status", "Discharging\n")
    assert battery_state(tmp_path) == {"percent": 57.0, "charging": False}
    assert battery_state(tmp_path / "absent") is None


@pytest.mark.parametrize("text, rates", [
    ("1M,4M", (1e6, 4e6)), ("500k, 1.5M", (5e5, 1.5e6)), ("2000,1G", (2e3, 1e9))])
def test_bandwidth_suffixes(text, rates):
    assert parse_bandwidth(text) == rates


@pytest.mark.parametrize("text", ["1M", "1M,0", "fast,slow", "1M,2T", "-1,2"])
def test_bad_bandwidth_is_rejected(text):
    with pytest.raises(ProfilingError, match="--bandwidth"):
        parse_bandwidth(text)


class Echo:
    """A broker stand-in: what is sent comes back (after `delay` seconds), except what `drop`
    rejects; `late` sends back a stale copy of the previous message first."""

    def __init__(self, delay: float = 0.0, drop=lambda payload: False, late: bool = False):
        self.inbox: queue.Queue[tuple[bytes, float]] = queue.Queue()
        self.delay, self.drop, self.late = delay, drop, late
        self.sent: list[bytes] = []

    def send(self, payload: bytes) -> None:
        if self.late and self.sent:
            self.inbox.put((self.sent[-1], time.perf_counter()))
        self.sent.append(payload)
        if not self.drop(payload):
            self.inbox.put((payload, time.perf_counter() + self.delay))

    def receive(self, timeout: float):
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None


def test_link_latency_is_the_median_round_trip_and_rate_uses_half_of_it():
    echo = Echo(delay=0.01)
    result = measure_link(echo.send, echo.receive, pings=3)
    assert 10 <= result["latency_ms"] < 1000
    # The largest payload came back: every size was sent, and the rate is size / (rtt / 2).
    assert [len(p) for p in echo.sent[3:]] == list(network.THROUGHPUT_SIZES)
    assert (1 << 20) / 1.0 < result["rate"] <= (1 << 20) / 0.005


def test_link_ignores_a_late_echo_of_an_earlier_message():
    echo = Echo(delay=0.02, late=True)
    result = measure_link(echo.send, echo.receive, pings=4, measure_bandwidth=False)
    # A stale echo arrives at once; taken for the answer it would give a near-zero latency.
    assert result["latency_ms"] >= 20 and result["rate"] is None


def test_link_without_echo_is_a_profiling_error(monkeypatch):
    monkeypatch.setattr(network, "PING_TIMEOUT_S", 0.2)
    echo = Echo(drop=lambda payload: True)
    with pytest.raises(ProfilingError, match="did not come back"):
        measure_link(echo.send, echo.receive, pings=2)


def test_link_rate_stops_at_the_largest_payload_the_broker_passes(monkeypatch):
    monkeypatch.setattr(network, "TRANSFER_TIMEOUT_S", 0.2)
    echo = Echo(drop=lambda payload: len(payload) > (64 << 10))
    result = measure_link(echo.send, echo.receive, pings=1)
    assert [len(p) for p in echo.sent[1:]] == [16 << 10, 64 << 10, 256 << 10]
    assert result["rate"] > 0


@pytest.mark.parametrize("dp", [False, True])
def test_throughput_of_a_model_the_caller_gives(dp):
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 5))
    rate = measure_throughput(model, (3, 8, 8), 5, 0.2, dp, lr=0.01, clip_norm=10.0, batch_size=16)
    assert rate > 0


def _profile_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # One torch thread: the suite may share the CPU with other jobs, and oversubscribed torch
    # threads make plain SGD spuriously slower than DP; this test checks the tool, not the machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "edge_sdk.cli", "profile", *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)


def test_cli_quick_profile_with_given_bandwidth(tmp_path):
    out = tmp_path / "tmp" / "profile.json"
    proc = _profile_cli(tmp_path, "--bandwidth", "1M,4M", "--out", str(out), "--quick", "--name", "bench")
    assert proc.returncode == 0, proc.stderr
    profile = load_profile(out)
    assert profile.name == "bench"
    assert profile.compute.reference_model == "fedp3_cnn" and profile.compute.batch_size == 48
    assert 0 < profile.compute.dp_samples_per_s < profile.compute.samples_per_s
    assert (profile.network.uplink_bytes_per_s, profile.network.downlink_bytes_per_s) == (1e6, 4e6)
    assert profile.network.source == "given" and profile.network.latency_ms is None
    assert 0 < profile.memory_available_bytes <= profile.memory_total_bytes
    assert profile.cpu_cores >= 1 and profile.disk_free_bytes > 0
    assert "torch" in profile.libraries
    assert "samples/s DP" in proc.stdout


def test_cli_quick_profile_measures_the_link_through_the_broker(tmp_path, broker):
    out = tmp_path / "profile.json"
    proc = _profile_cli(tmp_path, "--broker", broker.url, "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    network = load_profile(out).network
    assert network.source == "measured"
    assert network.latency_ms > 0
    assert network.uplink_bytes_per_s > 0 and network.downlink_bytes_per_s > 0


@pytest.mark.parametrize("args, message", [
    (["--broker", "mqtt://127.0.0.1:1"], "mqtt://127.0.0.1:1"),
    (["--broker", "http://127.0.0.1:1883"], "expected mqtt://HOST[:PORT]"),
    ([], "pass --broker"),
])
def test_cli_errors_are_clear(tmp_path, args, message):
    out = tmp_path / "profile.json"
    proc = _profile_cli(tmp_path, *args, "--out", str(out), "--quick")
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_nested_cgroup_v2_limits_follow_the_process_and_the_tightest_ancestor_wins(tmp_path):
    cgroup = tmp_path / "cgroup"
    service = cgroup / "system.slice" / "fedprune.service"
    service.mkdir(parents=True)
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text(str(900 * MIB))
    (cgroup / "system.slice" / "memory.max").write_text(str(300 * MIB))
    (cgroup / "system.slice" / "memory.current").write_text(str(200 * MIB))
    (service / "memory.max").write_text(str(256 * MIB))
    (service / "memory.current").write_text(str(56 * MIB))
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text("0::/system.slice/fedprune.service\n")
    # The service allows 200 MiB more, but its slice only 100 MiB more: the slice binds.
    assert cgroup_memory(cgroup, self_cgroup) == (300 * MIB, 200 * MIB)
    (cgroup / "system.slice" / "memory.max").write_text("max\n")
    assert cgroup_memory(cgroup, self_cgroup) == (256 * MIB, 56 * MIB)
    self_cgroup.write_text("0::/\n")
    assert cgroup_memory(cgroup, self_cgroup) == (None, 900 * MIB)


# --- profile = "measure" into a provisioned fleet: mqtts://, the device's own credentials ---------

LINK_FLEET = "linktest"


@pytest.fixture(scope="module")
def provisioned():
    """A Mosquitto configured by `fedprune coordinator provision`: TLS, a password file, ACLs."""
    with provisioned_mosquitto(LINK_FLEET, ["dev-p"], ["127.0.0.1"],
                               prefix="fedprune-link-") as (prov, _):
        yield load_edge_config(prov / "devices" / "dev-p" / "edge.toml")


def test_a_provisioned_device_measures_its_own_profile_over_tls_with_its_credentials(provisioned,
                                                                                      tmp_path):
    """The agent's `profile = "measure"` with the edge.toml `provision` wrote: mqtts://, its user
    name, password and fleet CA; the broker refuses anonymous clients and plaintext."""
    assert provisioned.broker.startswith("mqtts://") and provisioned.password and provisioned.tls_ca
    config = provisioned.model_copy(update={"profile": "measure", "state_dir": str(tmp_path / "state")})
    profile = load_profile_dict(config, DeviceState(config.state_dir))
    assert profile["name"] == "dev-p" and f"link measured through {config.broker}" in profile["source"]
    network = profile["network"]
    assert network["source"] == "measured" and network["latency_ms"] > 0
    assert network["uplink_bytes_per_s"] > 0 and network["downlink_bytes_per_s"] > 0
    assert load_profile(tmp_path / "state" / "profile.json").model_dump(mode="json") == profile
    assert provisioned.password not in (tmp_path / "state" / "profile.json").read_text()


@pytest.mark.parametrize("change, reason", [
    ({"password": "not-the-password"}, "refused by the broker"),
    ({"tls_ca": None}, "certificate verify failed"),  # the system's trust store: not the fleet CA
    ({"tls_ca": "/nonexistent/ca.crt"}, "No such file"),
])
def test_the_link_test_says_why_the_broker_refused_it(provisioned, change, reason):
    login = {"username": provisioned.username, "password": provisioned.password,
             "tls_ca": provisioned.tls_ca, **change}
    with pytest.raises(ProfilingError, match=reason) as err:
        measure_network(provisioned.broker, pings=1, topic=Topics(LINK_FLEET).profile("dev-p"),
                        **login)
    assert provisioned.broker in str(err.value) and "credentials" in str(err.value)
    assert provisioned.password not in str(err.value)
