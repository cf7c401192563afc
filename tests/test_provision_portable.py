"""`fedprune coordinator provision` writes device folders that work wherever they are copied
(issue 24): every path in edge.toml relative to its folder, distinct data shards and profiles,
the secrets outside the output folder (0700 folders, 0600 files), and a copied folder that lost a
file, or a state_dir that is missing or blocked, stops with a sentence naming the key and the
path (rc 2, no traceback).

The round: the CLI provisions a fleet, Mosquitto runs the generated TLS configuration, one device
folder is copied elsewhere and the original removed, and `fedprune-edge run --config edge.toml`
started in the copy takes part in a round of `fedprune coordinator serve` run from the
provisioned coordinator.toml."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

from coordinator.provision import default_secrets_dir, provision
from edge_sdk.agent import load_edge_config
from edge_sdk.agent.state import MARKER, open_state_dir
from harness.brokers import running_mosquitto
from harness.devices import coordinator_process
from harness.ports import free_port
from harness.processes import Process, stop_processes
from harness.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
FLEET = "portable"
# Files that hold a key or a password: 0600 wherever they are.
SECRET_FILES = {"ca.key", "server.key", "passwords", "signing.key", "coordinator.toml",
                "edge.toml", MARKER}
PATH_KEYS = ("state_dir", "tls_ca", "coordinator_key")


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def _refused(result: subprocess.CompletedProcess, *says: str) -> str:
    """The one-line error of a command that must stop with rc 2 and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    for text in says:
        assert text in result.stderr, (text, result.stderr)
    return result.stderr


def _modes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


@pytest.fixture(scope="module")
def provisioned():
    """`fedprune coordinator provision` as a user runs it, in a folder outside pytest's 0700
    tree (Mosquitto drops root privileges and reads the broker's files): (the root, the TLS
    port, the CLI's result, the secrets folder)."""
    root = Path(tempfile.mkdtemp(prefix="fedprune-portable-"))
    root.chmod(0o755)
    port = free_port()
    try:
        result = _cli("coordinator.cli", "coordinator", "provision", "--count", "3", "--broker",
                      f"mqtts://127.0.0.1:{port}", "--broker-host", "127.0.0.1", "--listener-port",
                      str(port), "--fleet", FLEET, "--profile", "rpi4-4gb,catalogue:rpi3b",
                      cwd=root, env={"XDG_CONFIG_HOME": str(root / "config")})
        assert result.returncode == 0, result.stderr
        yield root, port, result, root / "config" / "fedprune" / FLEET
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_secrets_go_outside_the_output_folder_private(provisioned):
    root, _, result, secrets = provisioned
    out = root / "fleet"  # the default --out
    assert str(secrets) in result.stdout and "fedprune-edge run --config edge.toml" in result.stdout
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "broker/acl", "broker/fedprune-security.conf", "broker/server.crt", "ca/ca.crt",
        "coordinator/signing.pub"]
    modes = _modes(secrets)
    assert {p: m for p, m in modes.items() if p.is_dir() and m != 0o700} == {}
    assert {p: m for p, m in modes.items() if p.name in SECRET_FILES and m != 0o600} == {}
    assert {p.name for p in modes if p.name in SECRET_FILES} == SECRET_FILES
    for parent in (root / "config", root / "config" / "fedprune"):  # created by provision: 0700
        assert parent.stat().st_mode & 0o777 == 0o700
    # Nothing secret in the output folder: no private key, no password of any identity.
    passwords = [load_edge_config(secrets / "devices" / d / "edge.toml").password
                 for d in ("dev-000", "dev-001", "dev-002")]
    passwords.append(tomllib.loads((secrets / "coordinator" / "coordinator.toml").read_text())
                     ["broker"]["password"])
    public = "".join(p.read_text() for p in out.rglob("*") if p.is_file())
    assert "PRIVATE KEY" not in public and not any(pw in public for pw in passwords)
    # A device folder carries its own identity and nothing of anyone else's.
    folder = secrets / "devices" / "dev-001"
    assert sorted(p.name for p in folder.iterdir()) == ["ca.crt", "coordinator.pub", "edge.toml", "state"]
    assert not any(pw in (folder / "edge.toml").read_text() for pw in passwords if pw != passwords[1])


def test_device_folders_are_relative_with_distinct_shards_and_profiles(provisioned):
    root, _, _, secrets = provisioned
    configs = {d: tomllib.loads((secrets / "devices" / d / "edge.toml").read_text())
               for d in ("dev-000", "dev-001", "dev-002")}
    for device, config in configs.items():
        assert [config[key] for key in PATH_KEYS] == ["state", "ca.crt", "coordinator.pub"], device
        assert str(root) not in (secrets / "devices" / device / "edge.toml").read_text()
        assert json.loads((secrets / "devices" / device / "state" / MARKER).read_text())["device_id"] == device
    assert [c["data"]["device_index"] for c in configs.values()] == [0, 1, 2]
    assert {c["data"]["clients"] for c in configs.values()} == {3}
    assert [c["profile"] for c in configs.values()] == [
        "catalogue:rpi4-4gb", "catalogue:rpi3b", "catalogue:rpi4-4gb"]  # round-robin


def test_a_copied_device_folder_runs_a_round(provisioned):
    """The copy is all the device has: the original folder is removed before the agent starts,
    and the agent runs in the copy's folder without --new-state (its state_dir came with it)."""
    root, port, _, secrets = provisioned
    device = root / "elsewhere" / "pi-in-the-shed"
    shutil.copytree(secrets / "devices" / "dev-000", device)
    shutil.rmtree(secrets / "devices" / "dev-000")
    config = device / "edge.toml"
    text = config.read_text()
    config.write_text(text.replace("device_id =", "max_samples = 300\ndevice_id =", 1))  # a quick round
    loaded = load_edge_config(config)
    assert [Path(getattr(loaded, key)) for key in PATH_KEYS] == [
        device / "state", device / "ca.crt", device / "coordinator.pub"]
    # Mosquitto reads the broker's key and password file as its own user: in production chown
    # them to it; here the test opens them up (after the mode checks above).
    for path in (root / "config", root / "config" / "fedprune", secrets, secrets / "broker"):
        path.chmod(0o755)
    for path in (secrets / "broker").iterdir():
        path.chmod(0o644)
    conf = (root / "fleet" / "broker" / "fedprune-security.conf").read_text()
    (root / "broker").mkdir()
    with running_mosquitto(root / "broker", extra=conf):
        coordinator = coordinator_process(
            "the coordinator", [f"state_dir={root / 'coordinator-state'}", "http_port=0",
                                "exit_when_done=true", "strategy=fedavg", "model=mlp",
                                "evaluate=false", "export.enabled=false", "train.lr=0.05",
                                "rounds.total=1", "rounds.devices_per_round=1",
                                "rounds.min_devices=1", "rounds.deadline_seconds=120",
                                "rounds.registration_grace_seconds=0"],
            root / "coordinator.log",
            args=["--config", str(secrets / "coordinator" / "coordinator.toml"), "--plain-logs"])
        agent = Process("the copied device", ["edge_sdk.cli", "run", "--config", "edge.toml",
                                              "--plain-logs"], root / "device.log", cwd=device)
        tasks = device / "state" / "tasks.json"
        try:
            agent.start()
            coordinator.start()
            wait_until(lambda: coordinator.exited() is not None, 240,
                       "the coordinator to commit its round", watch=[agent], interval=0.2)
            assert coordinator.exited() == 0, coordinator.tail()
            wait_until(lambda: tasks.exists() and "acked" in json.loads(tasks.read_text()).values(),
                       60, "the device to record the ACK of its update", watch=[agent])
        finally:
            stop_processes([p for p in (agent, coordinator) if p.popen is not None])
    # Signed tasks were verified with the copied coordinator.pub (an unverified one is refused).
    assert "Traceback" not in (root / "device.log").read_text()


@pytest.fixture
def device(tmp_path) -> Path:
    """A copy of a freshly provisioned device folder (the fleet in tmp_path, secrets beside)."""
    provision(tmp_path / "out", ["dev-a"], "mqtts://127.0.0.1:8883", ["127.0.0.1"], FLEET,
              secrets_dir=tmp_path / "secrets", profiles=["rpi4-4gb"])
    copy = tmp_path / "copy" / "dev-a"
    shutil.copytree(tmp_path / "secrets" / "devices" / "dev-a", copy)
    return copy


@pytest.mark.parametrize("missing, key", [("coordinator.pub", "coordinator_key"), ("ca.crt", "tls_ca")])
def test_a_copied_folder_without_one_of_its_files_names_the_file_and_key(device, missing, key):
    (device / missing).unlink()
    said = _refused(_cli("edge_sdk.cli", "run", "--config", "edge.toml", cwd=device),
                    f"{key}: {device / missing} does not exist", "copy the file there or fix")
    assert len(said.strip().splitlines()) == 1


def test_a_missing_state_dir_is_not_started_without_new_state(device):
    shutil.rmtree(device / "state")
    _refused(_cli("edge_sdk.cli", "run", "--config", str(device / "edge.toml"), cwd=device.parent),
             f"state_dir {device / 'state'} does not exist; if this device is new, pass "
             "--new-state; if it has run before, its privacy ledger is elsewhere: fix state_dir")
    assert not (device / "state").exists()
    # --new-state: created, 0700, marked as this device's.
    assert open_state_dir(device / "state", "dev-a", new=True) == device / "state"
    assert (device / "state").stat().st_mode & 0o777 == 0o700
    assert json.loads((device / "state" / MARKER).read_text())["device_id"] == "dev-a"


@pytest.mark.parametrize("state_dir, says", [
    ("blocker/state", "state_dir {device}/blocker/state cannot be created: {device}/blocker is a "
                      "file, not a folder"),
    ("blocker", "state_dir {device}/blocker is a file, not a folder; fix state_dir"),
])
def test_a_state_dir_that_cannot_be_made_is_named(device, state_dir, says):
    (device / "blocker").write_text("not a folder")
    config = device / "edge.toml"
    config.write_text(config.read_text().replace('state_dir = "state"', f'state_dir = "{state_dir}"'))
    _refused(_cli("edge_sdk.cli", "run", "--config", "edge.toml", "--new-state", cwd=device),
             says.format(device=device))


def test_another_devices_state_folder_is_refused(device, tmp_path):
    other = tmp_path / "other-state"
    open_state_dir(other, "dev-b", new=True)
    config = device / "edge.toml"
    config.write_text(config.read_text().replace('state_dir = "state"', f'state_dir = "{other}"'))
    _refused(_cli("edge_sdk.cli", "run", "--config", "edge.toml", "--new-state", cwd=device),
             f"holds the state of device 'dev-b'", "must not share one privacy ledger")


def test_an_empty_folder_or_an_older_agents_state_is_adopted(tmp_path):
    """systemd's StateDirectory= makes an empty folder; an older agent left no marker."""
    empty, older = tmp_path / "empty", tmp_path / "older"
    empty.mkdir()
    older.mkdir()
    (older / "ledger.json").write_text("{}")
    (older / "notes.txt").write_text("")
    for folder in (empty, older):
        open_state_dir(folder, "dev-a")
        assert json.loads((folder / MARKER).read_text())["device_id"] == "dev-a"
    stranger = tmp_path / "home"
    stranger.mkdir()
    (stranger / "photo.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="no device state in it"):
        open_state_dir(stranger, "dev-a")


def test_profile_files_travel_with_the_folder_and_bad_profiles_are_refused(tmp_path):
    from device_profiles import catalogue_profile

    measured = tmp_path / "measured.json"
    catalogue_profile("rpi5-8gb").save(measured)
    result = provision(tmp_path / "out", ["a", "b", "c"], "mqtts://127.0.0.1:8883", ["127.0.0.1"],
                       FLEET, secrets_dir=tmp_path / "secrets", profiles=[str(measured), "measure"])
    folders = result["device_folders"]
    assert [load_edge_config(folders[d] / "edge.toml").profile for d in "abc"] == [
        str(folders["a"] / "profile.json"), "measure", str(folders["c"] / "profile.json")]
    assert (folders["a"] / "profile.json").read_bytes() == measured.read_bytes()
    refused = _refused(_cli("coordinator.cli", "coordinator", "provision", "--count", "1",
                            "--broker", "mqtts://h:8883", "--profile", "rpi9", cwd=tmp_path),
                       "--profile rpi9: neither a catalogue class")
    assert "rpi4-4gb" in refused and not (tmp_path / "fleet").exists()


def test_the_default_secrets_folder_and_no_silent_reprovisioning(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_secrets_dir("f") == tmp_path / "xdg" / "fedprune" / "f"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert default_secrets_dir("f") == Path.home() / ".config" / "fedprune" / "f"
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    args = ("coordinator.cli", "coordinator", "provision", "--count", "1", "--broker", "mqtts://h:8883")
    assert _cli(*args, cwd=tmp_path, env=env).returncode == 0
    assert (tmp_path / "xdg" / "fedprune" / "default" / "ca" / "ca.key").is_file()
    key = (tmp_path / "xdg" / "fedprune" / "default" / "ca" / "ca.key").read_bytes()
    _refused(_cli(*args, cwd=tmp_path, env=env), "already holds a provisioned fleet")
    _refused(_cli(*args, "--fleet", "other", cwd=tmp_path, env=env),  # same --out fleet/
             f"{tmp_path / 'fleet'} already holds a provisioned fleet")
    assert (tmp_path / "xdg" / "fedprune" / "default" / "ca" / "ca.key").read_bytes() == key
    (tmp_path / "open").mkdir(mode=0o755)
    (tmp_path / "open").chmod(0o755)
    _refused(_cli(*args, "--out", "o2", "--secrets-dir", "open", cwd=tmp_path),
             "is open to other users (mode 755)")


def test_the_default_output_folder_is_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "fleet/ca/ca.crt"], cwd=ROOT)
    assert ignored.returncode == 0
