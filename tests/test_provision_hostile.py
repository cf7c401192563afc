"""Provisioning against an attacker who holds one device's credentials, and a reader of the disk
(issue 11): no device may take the coordinator's name, secrets are never readable by others, and
the generated Mosquitto configuration binds every client id to its user name, so device A cannot
take over device B's (or the coordinator's) persistent session. The takeover is tried against a
real Mosquitto run with the generated TLS configuration.

A provisioned cluster (issue 22): `coordinators=N` gives each coordinator its own user, client id
and config, so two `fedprune coordinator serve` processes in cluster mode share the provisioned
broker without closing each other's connection (one user made one client id for both)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from coordinator.config import ConfigError, load_config
from coordinator.provision import COORDINATOR_USER, provision
from coordinator.service import ServiceSettings
from coordinator.service.cluster import Leadership
from coordinator.service.config import BrokerSettings, ClusterSettings
from coordinator.service.store import Store
from edge_sdk.agent import load_edge_config
from edge_sdk.protocol import Topics, decode_envelope, parse_header
from harness.brokers import MqttPeer, provisioned_mosquitto
from harness.databases import own_database
from harness.devices import captured_agent, coordinator_process
from harness.messages import update_message
from harness.processes import stop_processes
from harness.waiting import wait_until

FLEET = "prov"
PRIVATE = ["ca/ca.key", "broker/server.key", "broker/passwords", "coordinator/signing.key",
           "coordinator/coordinator.toml", "devices/dev-a/edge.toml", "devices/dev-b/edge.toml"]


@pytest.mark.parametrize("device", [COORDINATOR_USER, f"{COORDINATOR_USER}-1", "dev1\n", "../dev", "dev/1"])
def test_a_device_cannot_take_the_coordinators_name_or_an_unsafe_one(tmp_path, device):
    """A device provisioned as "fedprune-coordinator" replaced the coordinator's password entry
    (and got its ACL: read and write on every topic of the fleet); so would one named as a
    cluster's coordinator."""
    with pytest.raises(ValueError, match="coordinator's own broker user name|is not valid"):
        provision(tmp_path / "prov", ["dev-a", device], "mqtts://127.0.0.1:8883", ["127.0.0.1"], FLEET,
                  secrets_dir=tmp_path / "prov")
    assert not (tmp_path / "prov" / "broker" / "passwords").exists()


_chmods: list[tuple] | None = None


def _record_chmod(event: str, args: tuple) -> None:
    if _chmods is not None and event == "os.chmod":
        _chmods.append(args)


sys.addaudithook(_record_chmod)  # audit hooks cannot be removed: it records only when asked


def test_secrets_are_created_private_and_never_chmodded(tmp_path):
    """Under umask 0 a file created with the default mode is world-readable until a chmod; the
    secrets must be 0600 from creation, so no chmod may be needed (nor done) at all."""
    global _chmods
    previous = os.umask(0)
    _chmods = []
    try:
        provision(tmp_path / "prov", ["dev-a", "dev-b"], "mqtts://127.0.0.1:8883", ["127.0.0.1"], FLEET,
                  secrets_dir=tmp_path / "prov")
        chmods = _chmods
    finally:
        _chmods = None
        os.umask(previous)
    assert chmods == [], f"provisioning changed modes after creating files: {chmods}"
    for name in PRIVATE:
        assert (tmp_path / "prov" / name).stat().st_mode & 0o777 == 0o600, name
    assert (tmp_path / "prov" / "ca" / "ca.crt").stat().st_mode & 0o077  # public stays readable
    hashed = (tmp_path / "prov" / "broker" / "passwords").read_text()
    users = [line.split(":")[0] for line in hashed.splitlines()]
    assert users == [COORDINATOR_USER, "dev-a", "dev-b"] and "$7$" in hashed


def test_the_coordinators_client_id_is_its_user_name(tmp_path):
    assert BrokerSettings(username="fedprune-coordinator").client_id == "fedprune-coordinator"
    with pytest.raises(ValueError, match="must equal broker.username"):
        BrokerSettings(username="fedprune-coordinator", client_id="other")
    provision(tmp_path / "prov", ["dev-a"], "mqtts://127.0.0.1:8883", ["127.0.0.1"], FLEET,
              secrets_dir=tmp_path / "prov")
    broker = load_config(tmp_path / "prov" / "coordinator" / "coordinator.toml", schema=ServiceSettings).broker
    assert broker.client_id == broker.username == COORDINATOR_USER
    conf = (tmp_path / "prov" / "broker" / "fedprune-security.conf").read_text().splitlines()
    assert "use_username_as_clientid true" in conf
    with pytest.raises(ConfigError):
        load_config(None, ["broker.username=x", "broker.client_id=y"], schema=ServiceSettings)


# --- the takeover, against Mosquitto ------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet():
    with provisioned_mosquitto(FLEET, ["dev-a", "dev-b"], ["127.0.0.1"],
                               prefix="fedprune-takeover-") as (prov, _):
        yield prov


def _peer(prov: Path, user: str, client_id: str, clean_session: bool = False) -> MqttPeer:
    """An MQTT client with one identity's credentials and whatever client id it asks for."""
    if user == COORDINATOR_USER:
        config = load_config(prov / "coordinator" / "coordinator.toml", schema=ServiceSettings).broker
        url, password, ca = config.url, config.password, config.tls_ca
    else:
        edge = load_edge_config(prov / "devices" / user / "edge.toml")
        url, password, ca = edge.broker, edge.password, edge.tls_ca
    return MqttPeer(url, client_id, username=user, password=password, tls_ca=ca,
                    clean_session=clean_session)


def _got(peer: MqttPeer, payload: bytes) -> bool:
    """Whether `payload` reaches `peer` within 10 s."""
    return peer.wait_for(lambda: payload in peer.of(), 10)


def test_a_device_cannot_take_over_another_devices_session_or_its_queued_task(fleet):
    task_b = f"fedprune/{FLEET}/task/dev-b"
    b = _peer(fleet, "dev-b", "dev-b")
    b.subscribe(task_b)
    b.close()  # offline; its persistent session keeps the subscription and queues for it
    coordinator = _peer(fleet, COORDINATOR_USER, COORDINATOR_USER, clean_session=True)
    coordinator.publish(task_b, b"task queued for dev-b")
    # dev-a's credentials, dev-b's client id: without the binding this resumed dev-b's session,
    # where the queued task was delivered to dev-a (and dropped by the ACL): lost for dev-b.
    a = _peer(fleet, "dev-a", "dev-b")
    a.publish(f"fedprune/{FLEET}/update/dev-a", b"after connecting")  # the session was served
    a.close()
    b = _peer(fleet, "dev-b", "dev-b")
    try:
        assert _got(b, b"task queued for dev-b"), "dev-b's queued task was taken from its session"
        assert b"task queued for dev-b" not in a.of()
    finally:
        b.close()
        coordinator.close()


def test_a_device_cannot_kick_the_coordinator_off_its_session(fleet):
    coordinator = _peer(fleet, COORDINATOR_USER, COORDINATOR_USER)
    coordinator.subscribe(f"fedprune/{FLEET}/update/+")
    intruder = _peer(fleet, "dev-a", COORDINATOR_USER)
    try:
        # Round trips on both connections: any takeover has happened by the time they return.
        intruder.publish(f"fedprune/{FLEET}/update/dev-a", b"update from dev-a")
        assert _got(coordinator, b"update from dev-a")
        coordinator.publish(f"fedprune/{FLEET}/task/dev-a", b"a task")
        assert coordinator.disconnects == [] and intruder.disconnects == []
    finally:
        intruder.close()
        coordinator.close()


# --- a provisioned cluster ----------------------------------------------------------------------
def _connections(log: Path) -> int:
    """How many times a coordinator connected to the broker (its log: connected, reconnected)."""
    return len(re.findall(r'"message": "(?:re)?connected to the broker at ',
                          log.read_text(errors="replace")))


def test_a_provisioned_cluster_runs_its_coordinators_side_by_side(tmp_path):
    """Two coordinators in cluster mode from `provision(coordinators=2)`'s configs, on the broker
    it configured (TLS, passwords, ACL with use_username_as_clientid) and one PostgreSQL: each
    connects once and stays connected; the leader takes a device's registration, and the device's
    updates, through the shared subscription the ACL must allow, are answered."""
    with provisioned_mosquitto(FLEET, ["dev-a"], ["127.0.0.1"], prefix="fedprune-cluster-",
                               coordinators=2) as (prov, _), own_database("provisioned") as url:
        configs = sorted((prov / "coordinator").glob("coordinator-*.toml"))
        assert [c.name for c in configs] == ["coordinator-0.toml", "coordinator-1.toml"]
        assert not (prov / "coordinator" / "coordinator.toml").exists()
        users = [load_config(c, ["database=" + url], schema=ServiceSettings).broker.username for c in configs]
        assert users == [f"{COORDINATOR_USER}-0", f"{COORDINATOR_USER}-1"]
        store = Store(url)
        lock = Leadership(url, ClusterSettings(enabled=True, node="test"))
        nodes = [coordinator_process(
            f"c{i}", [f"database={url}", f"state_dir={tmp_path / f'c{i}'}", "http_port=0",
                      "strategy=fedavg", "model=mlp", "evaluate=false", "export.enabled=false",
                      "cluster.takeover_poll_seconds=0.5", "cluster.dead_leader_seconds=3"],
            tmp_path / f"c{i}.log", args=["--config", str(config)]).start()
            for i, config in enumerate(configs)]
        device = _peer(prov, "dev-a", "dev-a", clean_session=True)
        topics = Topics(FLEET)
        try:
            device.subscribe(topics.ack("dev-a"))
            wait_until(lambda: all(_connections(n.log) for n in nodes) and lock.holder() in ("c0", "c1"),
                       60, "both coordinators to connect and one to lead", nodes)
            agent, _ = captured_agent(tmp_path, "dev-a")  # its registration (no fleet in it)
            device.client.publish(topics.register("dev-a"), agent._registration(), qos=1,
                                  retain=True).wait_for_publish(10)
            wait_until(lambda: store.device("dev-a") is not None, 60, "the leader to register dev-a", nodes)
            # Round 1 is not open: each update is answered (refused as stale) by whichever
            # coordinator the shared subscription hands it to.
            for task in ("0" * 16, "1" * 16, "2" * 16, "3" * 16):
                device.publish(topics.update("dev-a"), _stale_update(task))
            acks = [parse_header(decode_envelope(p)) for p in device.wait("ack", 4, timeout=60)]
            connections = [_connections(n.log) for n in nodes]
            logs = "".join(n.log.read_text(errors="replace") for n in nodes)
        finally:
            device.close()
            stop_processes(nodes)
            lock.close()
            store.close()
    assert sorted(a.task for a in acks) == ["0" * 16, "1" * 16, "2" * 16, "3" * 16]
    assert all(not a.accepted and "is not open" in a.reason for a in acks), acks
    assert connections == [1, 1], "a coordinator was disconnected and connected again"
    assert not re.search(r"lost the connection to the broker|another client connected|"
                         r"refused a subscription|refused the connection", logs)


def _stale_update(task: str) -> bytes:
    """An UPDATE for round 1, which is not open (a device's header; the payload is not read)."""
    return update_message({"device_id": "dev-a", "round": 1, "task": task, "num_samples": 1}, b"x")
