"""`fedprune profile`: memory and cgroup parsing on fake system files, then the real CLI end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from device_profiles import load_profile
from mqtt_brokers import Mosquitto
from edge_sdk.profiling import (
    ProfilingError,
    battery_state,
    cgroup_memory,
    memory_budget,
    parse_bandwidth,
    read_meminfo,
)

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


def _profile_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # One torch thread: the suite may share the CPU with other jobs, and oversubscribed torch
    # threads make plain SGD spuriously slower than DP; this test checks the tool, not the machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "coordinator.cli", "profile", *args],
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


@pytest.fixture
def mosquitto(tmp_path):
    """A real Mosquitto of our own (the shipped config) on a free loopback port."""
    broker = Mosquitto(tmp_path).start()
    yield broker.url
    broker.stop()


def test_cli_quick_profile_measures_the_link_through_the_broker(tmp_path, mosquitto):
    out = tmp_path / "profile.json"
    proc = _profile_cli(tmp_path, "--broker", mosquitto, "--quick", "--out", str(out))
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
