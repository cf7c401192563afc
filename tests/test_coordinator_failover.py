"""Two coordinators in cluster mode on one Mosquitto and one PostgreSQL database: both take in the
round's updates (the broker's shared subscription), the leader is SIGKILLed mid-round, the other
takes the leader lock, resumes the round from the database and commits it with every device's
update counted once. The row it records goes to the fault matrix (docs/RELIABILITY.md).

Fencing (issue 22): a leader paused (SIGSTOP) across a takeover, mid-round or between rounds, is
woken before the new leader commits: it opens no round and publishes no task (the broker's debug
log names the client of every PUBLISH it received; a client of the test's own records every task
with its round and leader epoch), and every update is counted once.

Counted from both sides, like every fault-matrix row: `measure` (tests/test_faults.py) reads the
devices' state dirs and logs and the committed round's contributions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy
from harness.brokers import MqttPeer, running_mosquitto
from harness.databases import POSTGRES, own_database
from harness.devices import coordinator_process, start_edge_agent
from harness.processes import Process, stop_processes
from harness.waiting import wait_until
from test_faults import measure

from coordinator.service import store as store_module
from coordinator.service.cluster import Leadership
from coordinator.service.config import ClusterSettings
from coordinator.service.states import RoundState
from coordinator.service.store import (Deposed, RoundClosed, SeveralRoundsInProgress, Store, TaskRow,
                                      raise_epoch)
from edge_sdk.agent import EdgeSettings
from edge_sdk.agent.state import task_key
from edge_sdk.protocol import decode_envelope, parse_header

pytestmark = pytest.mark.faults

FLEET = "ha"
POLL = 0.5            # cluster.takeover_poll_seconds
DEAD = 3              # cluster.dead_leader_seconds (its least)
SAMPLES = 96          # per device: few, so process start-up, not training, sets the pace


def _coordinator(tmp: Path, node: str, broker: str, database: str, *settings: str) -> Process:
    """Coordinator `node` of the cluster; `settings` (KEY=VALUE) override the defaults below."""
    overrides = [f"broker.url={broker}", f"broker.fleet={FLEET}", f"state_dir={tmp / node}",
                 f"database={database}", "cluster.enabled=true", f"cluster.node={node}",
                 f"cluster.takeover_poll_seconds={POLL}", f"cluster.dead_leader_seconds={DEAD}",
                 "http_port=0", "exit_when_done=true",
                 "strategy=fedavg", "model=mlp", "evaluate=false", "export.enabled=false",
                 "train.lr=0.05", "rounds.total=1", "rounds.devices_per_round=4",
                 "rounds.min_devices=4", "rounds.deadline_seconds=90",
                 "rounds.registration_grace_seconds=0", *settings]
    return coordinator_process(node, overrides, tmp / f"{node}.log").start()


def _client_id(node: str) -> str:
    """A cluster member's MQTT client id without broker credentials (service.py)."""
    return f"fedprune-coordinator-{node}"


def _task_publishes(broker_log: Path, node: str) -> int:
    """TASK and ARTIFACT messages the broker received from `node` (its debug log, one line each)."""
    pattern = re.compile(rf"Received PUBLISH from {re.escape(_client_id(node))} \(d\d, q\d, r\d, "
                         rf"m\d+, 'fedprune/{FLEET}/(task|artifact)/")
    return len(pattern.findall(broker_log.read_text(errors="replace")))


def _entries(log: Path) -> list[dict]:
    """A coordinator's JSON log lines (a traceback's lines are skipped)."""
    entries = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _events(log: Path, event: str) -> list[dict]:
    """The lines where a coordinator logged `event` (its JSON lines' "event" field)."""
    return [entry for entry in _entries(log) if entry.get("event") == event]


def _task_stamps(wire: MqttPeer) -> list[tuple[int, int]]:
    """(round, leader_epoch) of every TASK that crossed the broker, in order."""
    return [(h.round, h.leader_epoch) for h in
            (parse_header(decode_envelope(p)) for p in wire.of("task"))]


def _device(tmp: Path, broker: str, i: int, samples: int) -> Process:
    config = EdgeSettings(device_id=f"{FLEET}-{i}", broker=broker, fleet=FLEET,
                          state_dir=str(tmp / f"d{i}"), profile="catalogue:rpi4-4gb",
                          max_samples=samples, data={"clients": 4, "device_index": i})
    return start_edge_agent(config, tmp, stem=f"d{i}")  # measure() reads d*.toml and d*.log


def _stored_by(log: Path) -> list[str]:
    """The devices whose update this coordinator stored (its log's accepted lines, not duplicates)."""
    return [entry["device"] for entry in _entries(log)
            if "accepted" in entry.get("message", "") and entry.get("stored")]


def _http_url(log: Path) -> str:
    """The coordinator's HTTP API address, from its log (http_port 0: a free port)."""
    for entry in _entries(log):
        match = re.fullmatch(r"HTTP API on (http://\S+)", entry.get("message", ""))
        if match:
            return match[1]
    raise AssertionError(f"{log} names no HTTP API address")


# The leader's fault: SIGKILL (the process dies; PostgreSQL sees its connection close), or SIGSTOP
# (it hangs with its session open, its kernel still answering: the follower ends that session once
# the leader's heartbeat is DEAD seconds old; the leader is woken after the takeover, before the
# commit, so that what it does awake is fenced). The bound each takeover must meet: the poll, or
# DEAD plus the poll, and 2.5 s of slack for a loaded machine.
FAULTS = {"killed": (signal.SIGKILL, POLL + 2.5), "hung": (signal.SIGSTOP, DEAD + POLL + 2.5)}


@pytest.mark.parametrize("fault", FAULTS)
def test_leader_dead_or_hung_mid_round_the_other_coordinator_takes_over(tmp_path, fault_matrix, fault):
    bound = FAULTS[fault][1]
    # Debug logging only adds lines: the broker's log names the client of every PUBLISH.
    with running_mosquitto(tmp_path / "broker", extra="log_type debug\n") as broker, \
            own_database("failover") as url:
        store = Store(url)  # the tables, before any coordinator starts
        lock = Leadership(url, ClusterSettings(enabled=True, node="test"))  # to ask who leads
        nodes = {name: _coordinator(tmp_path, name, broker.url, url) for name in ("c0", "c1")}
        # Two devices register, then freeze (SIGSTOP) until the leader is dead: their tasks wait
        # in their sockets and their updates come after the takeover.
        late = [_device(tmp_path, broker.url, i, SAMPLES) for i in (2, 3)]
        everyone = [*nodes.values(), *late]
        try:
            wait_until(lambda: lock.holder() in nodes, 60, "a coordinator to take the leader lock",
                       everyone)
            wait_until(lambda: all(store.device(f"{FLEET}-{i}") for i in (2, 3)), 60,
                       "the late devices to register", everyone)
            for device in late:
                device.popen.send_signal(signal.SIGSTOP)
            prompt = [_device(tmp_path, broker.url, i, SAMPLES) for i in (0, 1)]
            everyone += prompt
            # Both coordinators store one of the prompt devices' updates (the broker hands the
            # shared subscription's messages out in turn); then the leader dies without a word.
            wait_until(lambda: all(_stored_by(tmp_path / f"{n}.log") for n in nodes), 90,
                       "each coordinator to store an update of round 1", [*nodes.values(), *prompt])
            leader = lock.holder()
            survivor = next(n for n in nodes if n != leader)
            stored_before = store.update_count(1)
            by_node = {n: sorted(_stored_by(tmp_path / f"{n}.log")) for n in nodes}
            if fault == "killed":
                nodes[leader].stop(signal.SIGKILL)
            else:
                nodes[leader].popen.send_signal(signal.SIGSTOP)
            faulted_at = time.monotonic()
            published_by_leader = _task_publishes(broker.log, leader)
            wait_until(lambda: lock.holder() == survivor, 30, f"{survivor} to take the lead",
                       [nodes[survivor], *prompt])
            takeover = time.monotonic() - faulted_at
            # Its HTTP API says so too (before the late devices answer: it cannot commit yet).
            status = httpx.get(f"{_http_url(tmp_path / f'{survivor}.log')}/status", timeout=10).json()
            if fault == "hung":  # woken before the commit: it must find itself deposed, and act not
                nodes[leader].popen.send_signal(signal.SIGCONT)
                wait_until(lambda: _events(tmp_path / f"{leader}.log", "lost_lead"), 30,
                           f"the woken {leader} to step down", [nodes[leader], nodes[survivor]])
            for device in late:
                device.popen.send_signal(signal.SIGCONT)
            devices = [*prompt, *late]
            wait_until(lambda: nodes[survivor].exited() is not None, 120,
                       f"{survivor} to commit round 1", devices)
            assert nodes[survivor].exited() == 0, nodes[survivor].tail()
            if fault == "hung":  # a follower now: it finds the round committed and exits
                wait_until(lambda: nodes[leader].exited() is not None, 60,
                           f"the woken {leader} to find the round committed and exit")
                assert nodes[leader].exited() == 0, nodes[leader].tail()
                woken_log = (tmp_path / f"{leader}.log").read_text()
                survivor_log = (tmp_path / f"{survivor}.log").read_text()
            measured = measure(store, tmp_path)
            dead_letters = sum(len(list((tmp_path / n / "dead-letter").glob("*.bin"))) for n in nodes)
            measured = dataclasses.replace(measured, dead_lettered=dead_letters)
            committed = store.rounds()
            tasks = store.tasks(1)
            published_after = _task_publishes(broker.log, leader) - published_by_leader
            by_node_after = {n: sorted(_stored_by(tmp_path / f"{n}.log")) for n in nodes}
        finally:
            for device in everyone[2:]:
                if device.popen.poll() is None:
                    device.popen.send_signal(signal.SIGCONT)
            for node in nodes.values():
                if node.popen.poll() is None:
                    node.popen.send_signal(signal.SIGCONT)
            stop_processes([p for p in everyone if p.popen.poll() is None], signal.SIGKILL)
            lock.close()
            store.close()
    assert stored_before == 2 and sorted(d for stored in by_node.values() for d in stored) == [f"{FLEET}-0", f"{FLEET}-1"], \
        (stored_before, by_node)
    assert all(by_node.values()), by_node  # each coordinator had stored one before the kill
    assert status["cluster"]["node"] == survivor and status["cluster"]["role"] == "leader", status
    assert takeover <= bound, f"took {takeover:.1f} s to take the lead (bound {bound} s)"
    if fault == "hung":
        # Silence counts from the leader's last beat, which may be up to a poll before it hung.
        assert takeover >= DEAD - POLL, f"took the lead {takeover:.1f} s after the hang: before {DEAD} s of silence"
        assert '"event": "deposed_leader"' in survivor_log and '"event": "lost_lead"' in woken_log
    assert published_after == 0, f"the deposed {leader} published {published_after} tasks"
    assert [r.state for r in committed] == ["committed"]
    contributions = committed[0].summary["contributions"]
    assert sorted(c.split("/")[0] for c in contributions) == [f"{FLEET}-{i}" for i in range(4)]
    # Stored once each, across both coordinators (the dead one's log included).
    assert sorted(d for stored in by_node_after.values() for d in stored) == [f"{FLEET}-{i}" for i in range(4)], by_node_after
    # The new leader re-sent the late devices' tasks with the ids the dead one gave them: each
    # late device got its task twice and ran it once.
    for i in (2, 3):
        key = task_key(1, tasks[f"{FLEET}-{i}"].task)
        assert f"task {key} already" in (tmp_path / f"d{i}.log").read_text(), f"d{i} got no re-sent task"
    assert (measured.sent, measured.counted, measured.lost, measured.duplicated,
            measured.counted_unsent, measured.dead_lettered) == (4, 4, 0, 0, 0, 0), measured
    if fault == "killed":
        fault_matrix(
            "2 coordinators in cluster mode (one PostgreSQL, updates through a shared subscription), 4 "
            "devices, 1 round: each coordinator stored one update, then the leader was SIGKILLed; 2 "
            "devices held (SIGSTOP) until after the kill",
            f"the other took the leader lock {takeover:.1f} s after the kill (takeover_poll_seconds "
            f"{POLL:g}), resumed round 1 from the database, re-sent the 2 unanswered tasks and "
            "committed the round with all 4 updates", measured)
    else:
        fault_matrix(
            "2 coordinators in cluster mode, 4 devices, 1 round: each coordinator stored one update, "
            "then the leader hung (SIGSTOP: its database session stays open); 2 devices held until "
            "after; the hung leader woken (SIGCONT) after the takeover, before the commit",
            f"the other ended the silent leader's sessions and took the lock {takeover:.1f} s after "
            f"it hung (dead_leader_seconds {DEAD}, takeover_poll_seconds {POLL:g}), re-sent the 2 "
            "unanswered tasks and committed with all 4 updates; the woken leader found its session "
            "ended, stepped down, published nothing (broker log) and exited", measured)


GRACE = 4  # rounds.registration_grace_seconds: how long a leader waits between rounds below


def test_a_leader_paused_between_rounds_and_woken_after_a_takeover_opens_and_publishes_nothing(
        tmp_path, fault_matrix):
    """Issue 22's deposed leader: c0 commits round 1 and is paused (SIGSTOP) while it waits to open
    round 2; c1 ends its sessions, takes the lead and opens round 2; c0 is woken before c1 commits.
    Before fencing, c0's first query failed, its retry ran without asking the lock again, and it
    opened round 3 and sent its tasks. Now it steps down: no round 3, no PUBLISH from it after the
    pause, and every update of both rounds counted once.

    Round 2 waits GRACE seconds for a fifth device (devices_per_round 5, min_devices 4), which
    gives the test time to pause c0 between the rounds (once it logged that it waits); the devices
    are paused with it, so round 2 cannot commit before c0 wakes."""
    between_rounds = ["rounds.total=2", "rounds.devices_per_round=5",
                      f"rounds.registration_grace_seconds={GRACE}"]
    with running_mosquitto(tmp_path / "broker", extra="log_type debug\n") as broker, \
            own_database("paused") as url:
        store = Store(url)
        lock = Leadership(url, ClusterSettings(enabled=True, node="test"))
        wire = MqttPeer(broker.url, "wire-paused", [f"fedprune/{FLEET}/task/+"])
        nodes = {name: _coordinator(tmp_path, name, broker.url, url, *between_rounds)
                 for name in ("c0", "c1")}
        devices = [_device(tmp_path, broker.url, i, SAMPLES) for i in range(4)]
        everyone = [*nodes.values(), *devices]
        try:
            wait_until(lambda: store.last_committed() is not None, 120, "round 1 to commit", everyone)
            leader = lock.holder()
            survivor = next(n for n in nodes if n != leader)
            # Paused once it waits for round 2's devices: woken, its grace is long over.
            wait_until(lambda: len(_events(tmp_path / f"{leader}.log", "waiting_for_devices")) == 2,
                       30, f"{leader} to wait for round 2's devices", everyone)
            for process in (nodes[leader], *devices):
                process.popen.send_signal(signal.SIGSTOP)
            assert store.current_round() is None, \
                f"{leader} opened round 2 before it was paused; raise GRACE"
            published_by_leader = _task_publishes(broker.log, leader)
            wait_until(lambda: lock.holder() == survivor, 30, f"{survivor} to take the lead",
                       [nodes[survivor]])
            wait_until(lambda: sum(r == 2 for r, _ in _task_stamps(wire)) >= 4, 60,
                       f"{survivor} to send round 2's tasks", [nodes[survivor]])
            nodes[leader].popen.send_signal(signal.SIGCONT)
            wait_until(lambda: _events(tmp_path / f"{leader}.log", "lost_lead"), 30,
                       f"the woken {leader} to step down", everyone)
            assert store.last_committed().number == 1  # woken before round 2's commit
            for device in devices:
                device.popen.send_signal(signal.SIGCONT)
            wait_until(lambda: all(n.exited() is not None for n in nodes.values()), 120,
                       "both coordinators to see round 2 committed and exit", devices)
            assert [n.exited() for n in nodes.values()] == [0, 0], [n.tail() for n in nodes.values()]
            published_after = _task_publishes(broker.log, leader) - published_by_leader
            stamps = _task_stamps(wire)
            rounds = [(r.number, r.state) for r in store.rounds()]
            measured = measure(store, tmp_path)
            woken_log = (tmp_path / f"{leader}.log").read_text()
        finally:
            for process in everyone:
                if process.popen.poll() is None:
                    process.popen.send_signal(signal.SIGCONT)
            stop_processes([p for p in everyone if p.popen.poll() is None], signal.SIGKILL)
            wire.close()
            lock.close()
            store.close()
    assert rounds == [(1, "committed"), (2, "committed")], rounds
    assert published_after == 0, f"the deposed {leader} published {published_after} tasks"
    assert "round 3" not in woken_log
    # The epoch each took the lead with first (the woken one may lead again once the survivor
    # exits, under a third).
    epochs = {n: _events(tmp_path / f"{n}.log", "leader_epoch")[0]["epoch"] for n in nodes}
    # Round 1's tasks carry the first leader's epoch, round 2's the survivor's, a later one.
    assert sorted(set(stamps)) == [(1, epochs[leader]), (2, epochs[survivor])], (stamps, epochs)
    assert epochs[survivor] > epochs[leader], epochs
    assert (measured.sent, measured.counted, measured.lost, measured.duplicated,
            measured.counted_unsent, measured.dead_lettered) == (8, 8, 0, 0, 0, 0), measured
    fault_matrix(
        "2 coordinators in cluster mode, 4 devices, 2 rounds: the leader paused (SIGSTOP) after "
        "committing round 1, before opening round 2, with the devices; woken (SIGCONT) after the "
        "other took the lead and sent round 2's tasks, before round 2 committed",
        f"the other ended the paused leader's sessions, took the lead (leader epoch "
        f"{epochs[survivor]}, the paused one's {epochs[leader]}) and "
        "opened round 2; the woken leader stepped down, opened no round and published nothing "
        "(broker log); both rounds committed with every update once", measured)


# --- the database's part: two processes storing, the leader closing the round ------------------
def _waiting_on_a_lock(store: Store, count: int) -> bool:
    """Whether `count` sessions of this database wait for a row lock (pg_stat_activity)."""
    with store.engine.connect() as connection:
        return connection.scalar(sqlalchemy.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'")) >= count


def test_an_update_being_stored_holds_its_round_open_and_a_racing_copy_is_a_duplicate(monkeypatch):
    """Two coordinators' stores on one database, the first held inside accept_update's transaction
    (after its row lock and insert): the same update from the second waits, then is a duplicate;
    the leader's move to committing waits, then reads the update; an update after that is refused
    (RoundClosed) and not stored."""
    with own_database("failover") as url:
        intake, other, leader = Store(url), Store(url), Store(url)
        try:
            for device in ("d0", "d1"):
                leader.upsert_device(device, profile={}, num_samples=1, formats=[], plan={},
                                     width_ratio=1.0, fits=True)
            leader.open_round(1, time.time() + 60, ["d0", "d1"], 1, [
                TaskRow(round=1, device=d, task=f"task-{d}", width_ratio=1.0, aggregation_weight=1.0,
                        bytes_down=0, sent_at=time.time()) for d in ("d0", "d1")])
            inside, release = threading.Event(), threading.Event()
            real = store_module.task_transition

            def held(current, new):  # called inside accept_update's transaction, after the insert
                if threading.current_thread().name == "held":
                    inside.set()
                    assert release.wait(30)
                return real(current, new)
            monkeypatch.setattr(store_module, "task_transition", held)
            results: dict[str, object] = {}

            def run(name, action):
                def target():
                    try:
                        results[name] = action()
                    except Exception as exc:  # noqa: BLE001 - the test reads it
                        results[name] = exc
                thread = threading.Thread(target=target, name=name)
                thread.start()
                return thread

            update = (1, "d0", "task-d0", b"payload", 1.0, 1, None)
            first = run("held", lambda: intake.accept_update(*update))
            assert inside.wait(30)
            copy = run("copy", lambda: other.accept_update(*update))
            closing = run("closing", lambda: leader.set_round(1, state=RoundState.COMMITTING))
            wait_until(lambda: _waiting_on_a_lock(leader, 2), 30,
                       "the copy and the leader's commit to wait for the stored update's transaction")
            assert copy.is_alive() and closing.is_alive()
            release.set()
            for thread in (first, copy, closing):
                thread.join(30)
            assert results == {"held": True, "copy": False, "closing": None}, results
            assert [(u.device, u.task) for u in leader.updates(1)] == [("d0", "task-d0")]
            with pytest.raises(RoundClosed):
                other.accept_update(1, "d1", "task-d1", b"late", 1.0, 1, None)
            assert leader.update_count(1) == 1 and leader.task(1, "d1").state == "sent"
        finally:
            for store in (intake, other, leader):
                store.close()


def _task_rows(number: int, devices: list[str]) -> list[TaskRow]:
    return [TaskRow(round=number, device=d, task=f"r{number}-{d}", width_ratio=1.0,
                    aggregation_weight=1.0, bytes_down=0, sent_at=time.time()) for d in devices]


def test_a_deposed_leaders_writes_fail_and_one_round_at_most_is_in_progress():
    """The fence, in the database: once another coordinator raised the leader epoch, every write
    of the old leader's store fails (Deposed) and writes nothing, and the check before publishing
    fails too; and no second round can be opened while one is in progress, whoever tries."""
    with own_database("fence") as url:
        old, new = Store(url), Store(url)
        try:
            with old.engine.begin() as connection:
                old.fence = raise_epoch(connection, "old")
            for device in ("d0", "d1"):
                old.upsert_device(device, profile={}, num_samples=1, formats=[], plan={},
                                  width_ratio=1.0, fits=True)
            old.open_round(1, time.time() + 60, ["d0", "d1"], 1, _task_rows(1, ["d0", "d1"]))
            with new.engine.begin() as connection:
                new.fence = raise_epoch(connection, "new")
            assert (old.fence, new.fence) == (1, 2)
            for write in (lambda: old.set_round(1, state=RoundState.COMMITTING),
                          lambda: old.open_round(2, time.time() + 60, ["d0"], 1, _task_rows(2, ["d0"])),
                          lambda: old.reject_update(1, "d0", "late", counted=False),
                          lambda: old.update_device("d0", online=False),
                          old.check_fence):
                with pytest.raises(Deposed, match="led under leader epoch 1, the database holds 2"):
                    write()
            assert [(r.number, r.state) for r in new.rounds()] == [(1, "collecting")]
            assert new.task(1, "d0").state == "sent" and new.device("d0").online
            new.check_fence()
            with pytest.raises(sqlalchemy.exc.IntegrityError, match="rounds_one_in_progress"):
                new.open_round(2, time.time() + 60, ["d0"], 1, _task_rows(2, ["d0"]))
            new.set_round(1, state=RoundState.COMMITTING)  # committing is in progress too
            with pytest.raises(sqlalchemy.exc.IntegrityError, match="rounds_one_in_progress"):
                new.open_round(2, time.time() + 60, ["d0"], 1, _task_rows(2, ["d0"]))
            new.set_round(1, state=RoundState.COMMITTED)
            new.open_round(2, time.time() + 60, ["d0"], 1, _task_rows(2, ["d0"]))
        finally:
            old.close()
            new.close()


def test_a_leader_whose_session_was_ended_knows_at_once_without_its_heartbeat():
    """A paused leader wakes with its heartbeat thread not run yet: before fencing, `poll` trusted
    the heartbeat's last word and said it still led, and its first step ran as a leader's. Now
    `poll` asks the lock connection itself (and the epoch), so it steps down at once."""
    slow = {"enabled": True, "takeover_poll_seconds": 20, "dead_leader_seconds": 60}  # no beat here
    with own_database("ask") as url:
        Store(url).close()  # the tables
        first = Leadership(url, ClusterSettings(node="first", **slow))
        second = Leadership(url, ClusterSettings(node="second", **slow))
        try:
            assert first.poll() and first.epoch == 1
            with first.engine.connect() as connection:  # what a follower does to a hung leader
                connection.execute(sqlalchemy.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'fedprune-leader:first'"))
            wait_until(second.poll, 10, "the second to take the freed lock")
            assert second.epoch == 2
            assert not first.poll() and first.epoch is None
            assert second.poll() and second.holder() == "second"
        finally:
            first.close()
            second.close()


def test_cluster_mode_refuses_sqlite_and_a_heartbeat_slower_than_its_deadline():
    from coordinator.config import ConfigError, load_config
    from coordinator.service.config import ServiceSettings

    with pytest.raises(ConfigError, match=r"dead_leader_seconds \(10\) must be at least 3 x takeover_poll_seconds"):
        load_config(None, ["cluster.enabled=true", f"database={POSTGRES}", "cluster.takeover_poll_seconds=4"],
                    schema=ServiceSettings)

    with pytest.raises(ConfigError, match="cluster.enabled needs PostgreSQL"):
        load_config(None, ["cluster.enabled=true"], schema=ServiceSettings)
    with pytest.raises(ConfigError, match="cluster.enabled needs PostgreSQL"):
        load_config(None, ["cluster.enabled=true", "database=sqlite:///x.db"], schema=ServiceSettings)
    assert load_config(None, ["cluster.enabled=true", f"database={POSTGRES}"],
                       schema=ServiceSettings).cluster.enabled


def test_coordinators_started_together_on_an_empty_database_all_start():
    """A supervisor starts a cluster's coordinators at once: each creates the schema it finds
    missing, and none may fail on another's half-made tables."""
    with own_database("schema") as url:
        barrier = threading.Barrier(6)
        errors: list[BaseException] = []
        stores: list[Store] = []

        def start() -> None:
            barrier.wait()
            try:
                stores.append(Store(url))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=start) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for store in stores:
            store.close()
    assert not errors, errors
    assert len(stores) == 6


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_database_left_with_two_rounds_in_progress_is_a_clear_error(backend, tmp_path):
    """A database from before fencing may hold two rounds in progress (two leaders each opened
    one): opening it cannot make the one-round index. Before, that was a raw IntegrityError; now
    the error names the rounds and says how to repair them, and the repair works."""
    with contextlib.ExitStack() as stack:
        url = (f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite"
               else stack.enter_context(own_database("legacy")))
        store = Store(url)
        with store.engine.begin() as connection:  # the database as it was before the index
            connection.execute(sqlalchemy.text("DROP INDEX rounds_one_in_progress"))
        store.upsert_device("d0", profile={}, num_samples=1, formats=[], plan={}, width_ratio=1.0,
                            fits=True)
        for number in (3, 4):
            store.open_round(number, time.time() + 60, ["d0"], 1, _task_rows(number, ["d0"]))
        store.close()
        with pytest.raises(SeveralRoundsInProgress, match=r"2 rounds in progress \(3, 4\)") as err:
            Store(url)
        repair = str(err.value).split("(UPDATE ", 1)[1].split("), then", 1)[0]
        engine = sqlalchemy.create_engine(url)
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text("UPDATE " + repair))
        engine.dispose()
        repaired = Store(url)
        assert [(r.number, r.state) for r in repaired.rounds()] == [(3, "aborted"), (4, "collecting")]
        repaired.close()
