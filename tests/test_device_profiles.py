"""Device profiles, the catalogue and fleets, against the real shared device tables."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from device_profiles import (
    CATALOGUE,
    PHONE_CLASSES,
    CatalogueError,
    DeviceProfile,
    ProfileError,
    catalogue_names,
    catalogue_profile,
    load_profile,
    parse_fleet_arg,
    parse_profile,
    sample_fleet,
)
from device_profiles.catalogue import table_bytes

MIB = 1 << 20
TRACES = "device-traces/flash_network_speed_distribution.csv"


def _measured() -> dict:
    return {
        "schema_version": 1,
        "name": "bench-box",
        "source": "measured on bench-box",
        "memory_total_bytes": 8 * 1024 * MIB,
        "memory_available_bytes": 5 * 1024 * MIB,
        "cgroup_limit_bytes": 6 * 1024 * MIB,
        "cpu_cores": 2,
        "arch": "x86_64",
        "os": "Linux 6.1",
        "compute": {
            "reference_model": "fedp3_cnn",
            "samples_per_s": 2900.0,
            "dp_samples_per_s": 1000.0,
            "batch_size": 48,
        },
        "disk_free_bytes": 10**10,
        "network": {
            "uplink_bytes_per_s": 1.25e6,
            "downlink_bytes_per_s": 1.1e7,
            "latency_ms": 12.5,
            "source": "measured",
        },
        "battery": {"percent": 81.0, "charging": False},
        "libraries": {"torch": "2.13.0", "numpy": "2.1.0"},
    }


def _write(tmp_path, data) -> Path:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


# --- profile ---------------------------------------------------------------------------


def test_json_round_trip(tmp_path):
    profile = parse_profile(_measured())
    path = tmp_path / "sub" / "p.json"
    profile.save(path)
    assert path.read_text().startswith('{\n  "schema_version": 1,')
    assert load_profile(path) == profile
    assert json.loads(path.read_text()) == _measured()


def test_partial_profile_lists_every_missing_field(tmp_path):
    data = _measured()
    del data["memory_total_bytes"], data["cpu_cores"]
    del data["compute"]["dp_samples_per_s"]
    with pytest.raises(ProfileError) as err:
        load_profile(_write(tmp_path, data))
    assert set(err.value.problems) == {
        "memory_total_bytes: missing",
        "cpu_cores: missing",
        "compute.dp_samples_per_s: missing",
    }
    assert "fedprune-edge profile" in str(err.value)


def test_bad_profile_lists_each_bad_field(tmp_path):
    data = _measured()
    data["memory_available_bytes"] = data["memory_total_bytes"] + 1
    data["network"]["uplink_bytes_per_s"] = -5.0
    data["cpu_cores"] = "4"
    data["colour"] = "blue"
    with pytest.raises(ProfileError) as err:
        load_profile(_write(tmp_path, data))
    fields = sorted(p.split(":")[0] for p in err.value.problems)
    assert fields == ["colour", "cpu_cores", "memory_available_bytes", "network.uplink_bytes_per_s"]
    assert "exceeds memory_total_bytes" in str(err.value)


def test_available_must_fit_the_cgroup_limit():
    data = _measured()
    data["cgroup_limit_bytes"] = data["memory_available_bytes"] - 1
    with pytest.raises(ProfileError) as err:
        parse_profile(data)
    assert [p.split(":")[0] for p in err.value.problems] == ["cgroup_limit_bytes"]


def test_unsupported_schema_version_names_the_readable_ones():
    data = _measured()
    data["schema_version"] = 2
    with pytest.raises(ProfileError, match="reads schema_version 1"):
        parse_profile(data)


def test_missing_file_and_invalid_json(tmp_path):
    with pytest.raises(ProfileError, match="no device profile at"):
        load_profile(tmp_path / "absent.json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(_write(tmp_path, '{"schema_version": 1,'))
    with pytest.raises(ProfileError, match="expected a JSON object"):
        load_profile(_write(tmp_path, "[]"))


# --- catalogue -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_catalogue_profiles_validate_and_cite_sources(name):
    profile = catalogue_profile(name)
    assert parse_profile(json.loads(profile.model_dump_json())) == profile
    assert profile.name == name
    assert profile.source.strip() and "fedprune-edge profile" in profile.source
    assert profile.memory_available_bytes < profile.memory_total_bytes


def _pi_ram_mib(board: str, ram: str) -> set[int]:
    text = table_bytes("device-profiles/raspberry_pi_revision_codes.csv").decode()
    rows = csv.DictReader(io.StringIO(text, newline=""))
    return {int(r["ram_mb"]) for r in rows if r["model"] == board and r["ram"] == ram}


@pytest.mark.parametrize(
    "name, board, ram",
    [("rpi3b", "3B", "1 GB"), ("rpi4-2gb", "4B", "2 GB"), ("rpi4-4gb", "4B", "4 GB"), ("rpi5-8gb", "5", "8 GB")],
)
def test_pi_ram_comes_from_the_revision_table(name, board, ram):
    (ram_mib,) = _pi_ram_mib(board, ram)
    assert catalogue_profile(name).memory_total_bytes == ram_mib * MIB


def test_rpi4_2gb_is_2048_mib():
    assert catalogue_profile("rpi4-2gb").memory_total_bytes == 2048 * MIB


def test_phones_are_ordered_by_compute():
    low, mid, high = (catalogue_profile(n).compute for n in ("phone-low", "phone-mid", "phone-high"))
    assert low.samples_per_s < mid.samples_per_s < high.samples_per_s
    assert low.dp_samples_per_s < mid.dp_samples_per_s < high.dp_samples_per_s


def test_the_catalogue_reads_the_tables_shipped_in_the_package(tmp_path, monkeypatch):
    """No shared data beside the working directory, and FEDPRUNE_DATA (the datasets' folder)
    pointing at an empty one: the catalogue still builds, from its own package data."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("FEDPRUNE_DATA", str(tmp_path))
    assert catalogue_profile("rpi3b").memory_total_bytes == 1024 * MIB
    assert catalogue_profile("phone-mid", data_dir=None).network.source == "trace"


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.unlink(), "cannot read the device table"),
    (lambda path: path.write_bytes(path.read_bytes() + b"4B,9,1 GB"), "checksum mismatch"),
])
def test_a_missing_or_changed_table_is_an_error_never_a_default(tmp_path, damage, message):
    rel = TRACES
    for table in ("device-profiles/ai_benchmark_phones_flash.csv", rel):
        (tmp_path / table).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / table).write_bytes(table_bytes(table))
    damage(tmp_path / rel)
    with pytest.raises(CatalogueError, match=message) as err:
        catalogue_profile("phone-low", data_dir=tmp_path)
    assert str(tmp_path / rel) in str(err.value)


def test_unknown_catalogue_name_lists_the_names():
    with pytest.raises(CatalogueError) as err:
        catalogue_profile("rpi9")
    assert all(name in str(err.value) for name in catalogue_names())


# --- fleet -----------------------------------------------------------------------------


def _dumps(fleet: list[DeviceProfile]) -> list[str]:
    return [p.model_dump_json() for p in fleet]


def test_fleet_is_deterministic_under_seed_and_varies_across_seeds():
    assert _dumps(sample_fleet(40, seed=3)) == _dumps(sample_fleet(40, seed=3))
    assert _dumps(sample_fleet(40, seed=3)) != _dumps(sample_fleet(40, seed=4))


def test_fleet_mixes_classes_with_unique_names():
    fleet = sample_fleet(40, seed=0)
    assert len({p.name for p in fleet}) == 40
    classes = {p.name.split("#")[0] for p in fleet}
    assert len(classes) >= 5 and classes <= set(CATALOGUE)


def test_fleet_phone_bandwidths_vary_and_are_positive():
    fleet = sample_fleet(40, seed=1, names=list(PHONE_CLASSES))
    ups = [p.network.uplink_bytes_per_s for p in fleet]
    downs = [p.network.downlink_bytes_per_s for p in fleet]
    assert min(ups) > 0 and min(downs) > 0
    assert len(set(ups)) == 40 and len(set(downs)) == 40
    assert all(p.network.source == "trace" for p in fleet)


def test_fleet_keeps_catalogue_network_for_non_phones():
    for profile in sample_fleet(10, seed=2, names=["rpi4-2gb", "gateway-512mb"]):
        assert profile.network == catalogue_profile(profile.name.split("#")[0]).network


def test_fleet_rejects_unknown_classes():
    with pytest.raises(CatalogueError, match="rpi9"):
        sample_fleet(3, seed=0, names=["rpi9"])


@pytest.mark.parametrize("arg, seed", [("catalogue", 0), ("catalogue:7", 7), (" catalogue:12 ", 12)])
def test_parse_fleet_arg(arg, seed):
    assert parse_fleet_arg(arg) == seed


@pytest.mark.parametrize("arg", ["", "catalog", "catalogue:", "catalogue:-1", "catalogue:x", "fleet.json"])
def test_parse_fleet_arg_rejects_other_forms(arg):
    with pytest.raises(ValueError, match="catalogue:SEED"):
        parse_fleet_arg(arg)
