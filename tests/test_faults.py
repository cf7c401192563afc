"""Faults survived against a real Mosquitto (shipped config): broker restart, coordinator SIGKILL
(SQLite and PostgreSQL), devices vanishing mid-round, poison messages. Each test adds a row to
the fault matrix (docs/RELIABILITY.md is rendered from it by `python benchmarks/fault_matrix.py`).

Every row's counts come from `measure`, which reads what the devices kept (state_dir/tasks.json,
the outbox, their logs) and what the coordinator committed (each committed round's
`summary["contributions"]`, one entry per update added to the aggregate): no row is given a
number that was not measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from coordinator.service.store import Store
from edge_sdk.agent import EdgeSettings, load_edge_config
from edge_sdk.agent.state import task_key
from edge_sdk.protocol import (MessageType, Topics, decode_envelope, parse_header)
from harness.brokers import Mosquitto, MqttPeer, running_mosquitto
from harness.databases import empty_postgres
from harness.devices import coordinator_process, start_edge_agent
from harness.messages import raw_envelope
from harness.processes import Process, stop_processes
from harness.waiting import poll_until, wait_until

pytestmark = pytest.mark.faults

SAMPLES = 96          # per device: few, so process start-up, not training, sets the pace
SENT = ("sent", "acked", "rejected")  # tasks.json states of a task the device answered with an update


# --- processes -------------------------------------------------------------------------------
@pytest.fixture
def broker(tmp_path):
    """A broker of the test's own (a restart must not touch another test's sessions)."""
    # Debug logging only adds lines: the broker's log is how the poison test counts deliveries.
    with running_mosquitto(tmp_path / "broker", extra="log_type debug\n") as mosquitto:
        yield mosquitto


@pytest.fixture
def database(request, tmp_path):
    """The coordinator's store, tables created before any coordinator starts: SQLite in its state
    dir, or PostgreSQL's `test` database, emptied around the test like the engine tests do."""
    if getattr(request, "param", "sqlite") == "postgresql":
        with empty_postgres() as url:
            store = Store(url)
            yield store
            store.close()
        return
    store = Store(f"sqlite:///{tmp_path / 'coordinator' / 'coordinator.db'}")
    yield store
    store.close()


def _device(tmp: Path, url: str, fleet: str, i: int, devices: int, samples: int = SAMPLES) -> Process:
    config = EdgeSettings(device_id=f"{fleet}-{i}", broker=url, fleet=fleet, state_dir=str(tmp / f"d{i}"),
                        profile="catalogue:rpi4-4gb", max_samples=samples,
                        data={"clients": devices, "device_index": i})
    return start_edge_agent(config, tmp, stem=f"d{i}")  # measure() reads d*.toml and d*.log


def _coordinator(tmp: Path, url: str, fleet: str, store: Store, devices: int, **rounds) -> Process:
    settings = {"rounds.total": 2, "rounds.devices_per_round": devices, "rounds.min_devices": devices,
                "rounds.deadline_seconds": 60, "rounds.registration_grace_seconds": 0,
                **{f"rounds.{k}": v for k, v in rounds.items()}}
    overrides = [f"broker.url={url}", f"broker.fleet={fleet}", f"broker.client_id=coord-{fleet}",
                 f"state_dir={tmp / 'coordinator'}",
                 f"database={store.engine.url.render_as_string(hide_password=False)}",
                 "http_port=0", "exit_when_done=true", "strategy=fedavg", "model=mlp",
                 "evaluate=false", "export.enabled=false", "train.lr=0.05",
                 *(f"{k}={v}" for k, v in settings.items())]
    return coordinator_process(f"coord-{fleet}", overrides, tmp / "coordinator.log").start()


def _finish(coordinator: Process, devices: list[Process], timeout: float = 180) -> None:
    """Wait for the coordinator to exit (it does once every round committed), every device alive."""
    wait_until(lambda: coordinator.exited() is not None, timeout,
               "the coordinator to finish its rounds", devices)
    assert coordinator.exited() == 0, coordinator.tail()


def _stop(processes) -> None:
    """End of a test, after everything was measured: SIGKILL (a clean exit costs seconds each)."""
    stop_processes(processes, signal.SIGKILL, timeout=20)


# --- the accounting every row uses -------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    """Updates, each identified by (device, round, task).

    sent: a device's state or log shows it sent it (tasks.json "sent"/"acked"/"rejected", an
      outbox entry, or a "round N: sent" log line with no such record); counted: it is in a
      committed round's contributions; refused: sent, not counted, and the device was told why
      (tasks.json "rejected", with the coordinator's task reason or the reason the device
      logged); lost: sent, neither counted nor refused, or refused for its timing (late, or its
      round no longer open) although the device sent it before the round's deadline (it reached
      the broker in time: the coordinator was down across the deadline, and it judges lateness
      by when an update reaches it); duplicated: contributions beyond the first
      of the same update across the committed rounds; redelivered: second copies that reached
      the coordinator (the rounds' `duplicates` counters); counted_unsent: contributions that no
      device records sending (a forged or phantom update); dead_lettered: messages the
      coordinator gave up retrying and kept in state_dir/dead-letter/.
    """
    sent: int
    counted: int
    refused: int
    lost: int
    duplicated: int
    redelivered: int
    counted_unsent: int
    dead_lettered: int
    refusals: list[str] = field(default_factory=list)  # why each refused update was refused


_KEY = re.compile(r"r(\d+)-(.+)")
_SENT_LINE = re.compile(r"round (\d+): sent \d+-byte update")
_REJECTED_LINE = re.compile(r"coordinator rejected update (\S+): (.*)", re.S)


def _log_entries(path: Path) -> list[tuple[float, str]]:
    """(unix time, message) of each JSON line of a log."""
    entries = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
            entries.append((float(entry["ts"]), entry["message"]))
        except (ValueError, KeyError, TypeError):  # a traceback or a line from before logging started
            continue
    return entries


def _log_messages(path: Path) -> list[str]:
    return [message for _, message in _log_entries(path)]


def _first_sends(config_path: Path) -> dict[int, float]:
    """When the device (its log, on the test machine's one clock) first sent its update of each
    round: within milliseconds of it reaching the broker on loopback."""
    sends: dict[int, float] = {}
    for at, message in _log_entries(config_path.with_suffix(".log")):
        match = _SENT_LINE.match(message)
        if match:
            sends.setdefault(int(match[1]), at)
    return sends


# The coordinator's reasons for refusing an update for its timing, not its content.
_TIMING = re.compile(r"late|round \d+ is not open|round \d+ (closed|is committing)")


def _device_record(config_path: Path) -> tuple[dict[tuple[str, int, str], str], dict[str, str], int]:
    """A device's sent updates -> status, the reasons it logged for rejected ones (by task key),
    and how many sends its log shows that its state does not (each one a lost update)."""
    config = load_edge_config(config_path)
    root = Path(config.state_dir)
    sent: dict[tuple[str, int, str], str] = {}
    tasks = json.loads((root / "tasks.json").read_text()) if (root / "tasks.json").exists() else {}
    for key, status in tasks.items():
        if status not in SENT:
            continue
        match = _KEY.fullmatch(key)
        assert match and task_key(int(match[1]), match[2]) == key, f"unreadable task key {key!r}"
        sent[(config.device_id, int(match[1]), match[2])] = status
    for path in sorted((root / "outbox").glob("*")):
        header = parse_header(decode_envelope(path.read_bytes()), MessageType.UPDATE)
        sent.setdefault((header.device_id, header.round, header.task), "outbox")
    messages = _log_messages(config_path.with_suffix(".log"))
    logged = Counter(int(m[1]) for m in map(_SENT_LINE.match, messages) if m)
    recorded = Counter(r for (_, r, _) in sent)
    unrecorded = sum(max(0, n - recorded[r]) for r, n in logged.items())
    reasons = {m[1]: m[2] for m in map(_REJECTED_LINE.match, messages) if m}
    return sent, reasons, unrecorded


def _settle(tmp: Path, timeout: float = 10) -> None:
    """Give the last acknowledgements time to reach the devices (an outbox empties on its ACK);
    an update that stays unacknowledged is then measured as whatever it is."""
    poll_until(lambda: not any(any((Path(load_edge_config(p).state_dir) / "outbox").glob("*"))
                               for p in tmp.glob("d*.toml")), timeout, interval=0.2)


def measure(store: Store, tmp: Path) -> Measured:
    """Count the updates of one test from the devices' state dirs and logs (every `d*.toml` config
    under `tmp`), the coordinator's database and its dead-letter folder (`Measured` defines each)."""
    _settle(tmp)
    rounds = store.rounds()
    contributions: Counter[tuple[int, str]] = Counter()
    for row in rounds:
        if row.state == "committed":
            summary = row.summary or {}
            assert "contributions" in summary, (
                f"committed round {row.number} does not list its contributions (summary keys: "
                f"{sorted(summary)}); the engine must record summary['contributions']")
            contributions.update((row.number, entry) for entry in summary["contributions"])
    sent: dict[tuple[str, int, str], str] = {}
    reasons: dict[str, str] = {}
    sends: dict[tuple[str, int], float] = {}
    unrecorded = 0
    for config_path in sorted(tmp.glob("d*.toml")):
        device_sent, device_reasons, device_unrecorded = _device_record(config_path)
        sent.update(device_sent)
        reasons.update(device_reasons)
        unrecorded += device_unrecorded
        device = load_edge_config(config_path).device_id
        sends.update({(device, number): at for number, at in _first_sends(config_path).items()})
    counted, refusals, lost = 0, [], unrecorded
    for (device, number, task), status in sorted(sent.items()):
        if contributions[(number, f"{device}/{task}")]:
            counted += 1
            continue
        row = store.task(number, device)
        reason = (row.reason if row is not None and row.task == task and row.reason else
                  reasons.get(task_key(number, task)))
        round_row = store.round_row(number)
        in_time = round_row is not None and sends.get((device, number), float("inf")) <= round_row.deadline
        if status == "rejected" and reason and not (in_time and _TIMING.match(reason)):
            refusals.append(f"{device} round {number}: {reason}")
        else:
            lost += 1
    sent_keys = {(number, f"{device}/{task}") for device, number, task in sent}
    return Measured(sent=len(sent) + unrecorded, counted=counted, refused=len(refusals), lost=lost,
                    duplicated=sum(n - 1 for n in contributions.values()),
                    redelivered=sum((r.summary or {}).get("duplicates", 0) for r in rounds),
                    counted_unsent=sum(n for key, n in contributions.items() if key not in sent_keys),
                    dead_lettered=len(list((tmp / "coordinator" / "dead-letter").glob("*.bin"))),
                    refusals=refusals)


def _assert_nothing_lost_or_doubled(measured: Measured, counted: int) -> None:
    assert (measured.counted, measured.lost, measured.duplicated, measured.counted_unsent,
            measured.dead_lettered) == (counted, 0, 0, 0, 0), measured


def _committed(store: Store) -> int:
    return sum(r.state == "committed" for r in store.rounds())


# --- the faults --------------------------------------------------------------------------------
def test_broker_restart_mid_round(tmp_path, broker, database, fault_matrix):
    devices = [_device(tmp_path, broker.url, "brk", i, 3) for i in range(3)]
    coordinator = _coordinator(tmp_path, broker.url, "brk", database, 3)
    try:
        wait_until(lambda: database.current_round() is not None, 90, "round 1 to open",
                   [coordinator, *devices])
        broker.restart(down_seconds=1.5)  # every connection drops; sessions survive on disk
        _finish(coordinator, devices)
        measured = measure(database, tmp_path)
        assert _committed(database) == 2
        _assert_nothing_lost_or_doubled(measured, counted=6)
        fault_matrix("broker stopped for 1.5 s and restarted while round 1 was collecting "
                     "(3 devices, 2 rounds, SQLite)",
                     "devices and coordinator reconnected; both rounds committed", measured)
    finally:
        _stop(devices + [coordinator])


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_coordinator_sigkill_mid_round_resumes(tmp_path, broker, database, fault_matrix, request):
    # The third device is paused (SIGSTOP) once registered, so the kill lands while its update is
    # outstanding whatever the machine's load (a device merely slower once sent it in time); its
    # task waits in its broker session until it is resumed.
    devices = [_device(tmp_path, broker.url, "kill", i, 3) for i in range(3)]
    coordinator = _coordinator(tmp_path, broker.url, "kill", database, 3)
    try:
        wait_until(lambda: len(database.devices()) == 3, 120, "the three devices to register",
                   [coordinator, *devices])
        os.kill(devices[2].pid, signal.SIGSTOP)
        wait_until(lambda: database.update_count(1) >= 1, 120, "a first accepted update",
                   [coordinator, *devices[:2]])
        coordinator.stop(signal.SIGKILL)
        before = database.update_count(1)
        os.kill(devices[2].pid, signal.SIGCONT)
        coordinator = _coordinator(tmp_path, broker.url, "kill", database, 3)  # same database
        _finish(coordinator, devices)
        measured = measure(database, tmp_path)
        assert [r.state for r in database.rounds()] == ["committed", "committed"]
        assert 1 <= before < 3
        _assert_nothing_lost_or_doubled(measured, counted=6)
        kind = "PostgreSQL" if "postgresql" in request.node.name else "SQLite"
        fault_matrix(f"coordinator SIGKILLed in round 1 after storing {before} of 3 updates, then "
                     f"restarted on the same {kind} database (3 devices, 2 rounds)",
                     "round 1 resumed from the database and committed with all 3 updates; round 2 "
                     "committed", measured)
    finally:
        _stop(devices + [coordinator])


def test_a_third_of_the_devices_vanish_mid_round(tmp_path, broker, database, fault_matrix):
    devices = [_device(tmp_path, broker.url, "gone", i, 3) for i in range(3)]
    coordinator = _coordinator(tmp_path, broker.url, "gone", database, 3, deadline_seconds=6,
                               min_fraction=0.6)
    try:
        wait_until(lambda: database.current_round() is not None, 90, "round 1 to open",
                   [coordinator, *devices])
        devices[0].stop(signal.SIGKILL)
        wait_until(lambda: database.last_committed() is not None, 90, "round 1 to commit at quorum",
                   [coordinator, *devices[1:]])
        first = database.last_committed().summary
        devices[0].start()  # comes back with its state dir; its broker session still holds round 1's task
        _finish(coordinator, devices)
        second = database.last_committed().summary
        measured = measure(database, tmp_path)
        assert first["accepted"] == 2 and first["missing"] == 1 and second["accepted"] == 3
        _assert_nothing_lost_or_doubled(measured, counted=5)
        fault_matrix("1 of 3 selected devices SIGKILLed as round 1 opened, restarted after round 1 "
                     "committed (2 rounds, 6 s deadline, quorum 2, SQLite)",
                     "round 1 committed at its deadline with 2 of 3; the device rejoined for round 2",
                     measured)
    finally:
        _stop(devices + [coordinator])


LATE_DEADLINE = 14  # seconds: room for the held device to train and send while the coordinator is down


def test_an_update_sent_in_time_while_the_coordinator_was_down_across_the_deadline_is_lost(
        tmp_path, broker, database, fault_matrix):
    """Issue 22, item 6: the coordinator is down (SIGKILL) across round 1's deadline; a device
    sends its update before the deadline, the broker queues it in the coordinator's session, and
    the restarted coordinator refuses it (late, or its round no longer open). MQTT 3.1.1 tells
    the coordinator nothing of when an update reached the broker, and it judges by when it
    received it; so the fault matrix counts that update as lost, not refused (`measure`)."""
    fleet = "late"
    devices = [_device(tmp_path, broker.url, fleet, i, 2) for i in range(2)]
    rounds = {"deadline_seconds": LATE_DEADLINE, "min_fraction": 0.5}
    coordinator = _coordinator(tmp_path, broker.url, fleet, database, 2, **rounds)
    held = devices[1]
    try:
        wait_until(lambda: database.device(f"{fleet}-1") is not None, 90, f"{fleet}-1 to register",
                   [coordinator, *devices])
        held.popen.send_signal(signal.SIGSTOP)  # its task waits for it
        wait_until(lambda: database.update_count(1) >= 1, 90, "the other device's update",
                   [coordinator, devices[0]])
        coordinator.stop(signal.SIGKILL)
        deadline = database.round_row(1).deadline
        held.popen.send_signal(signal.SIGCONT)
        wait_until(lambda: 1 in _first_sends(tmp_path / "d1.toml"), 60,
                   f"{fleet}-1 to send its update while the coordinator is down", [held])
        sent_at = _first_sends(tmp_path / "d1.toml")[1]
        assert sent_at < deadline, f"sent {sent_at - deadline:.1f} s after the deadline; raise LATE_DEADLINE"
        wait_until(lambda: time.time() > deadline, LATE_DEADLINE + 5,
                   "round 1's deadline to pass with the coordinator down", devices)
        coordinator = _coordinator(tmp_path, broker.url, fleet, database, 2, **rounds)
        _finish(coordinator, devices)
        measured = measure(database, tmp_path)
        first = database.round_row(1).summary
        held_task = database.task(1, f"{fleet}-1")
        reasons = _device_record(tmp_path / "d1.toml")[1]
    finally:
        if held.popen.poll() is None:
            held.popen.send_signal(signal.SIGCONT)
        _stop(devices + [coordinator])
    assert first["accepted"] == 1 and _committed(database) == 2
    # Refused for its timing, with the reason the device was told (the round's task reason, or
    # the one in the ACK the device logged when the round had closed first).
    told = held_task.reason if held_task.state == "rejected" else reasons.get(task_key(1, held_task.task))
    assert told and _TIMING.match(told), (held_task.state, held_task.reason, reasons)
    assert (measured.sent, measured.counted, measured.refused, measured.lost, measured.duplicated,
            measured.counted_unsent, measured.dead_lettered) == (4, 3, 0, 1, 0, 0, 0), measured
    fault_matrix(f"coordinator SIGKILLed in round 1 of 2 ({LATE_DEADLINE} s deadline, quorum 1 of 2, "
                 "SQLite) and restarted after the deadline; the other device sent its update "
                 f"{deadline - sent_at:.1f} s before the deadline, queued by the broker meanwhile",
                 f"the restarted coordinator refused that update ({told}): it judges lateness by "
                 "when an update reaches it, and MQTT 3.1.1 gives no broker arrival time, so the "
                 "update is counted lost; round 1 committed with 1, round 2 with both", measured)


# --- poison messages ---------------------------------------------------------------------------


def _header(fields: dict, **raw: str) -> bytes:
    """Header JSON with some values written as raw JSON text (what json.dumps would refuse)."""
    text = json.dumps({**fields, **{key: f"@{key}@" for key in raw}})
    for key, value in raw.items():
        text = text.replace(f'"@{key}@"', value)
    return text.encode()


def _poisons(topics: Topics, victim: str, task: str) -> list[tuple[str, str, bytes]]:
    """(what, topic, message) of each poison: to the victim device's task and artifact topics,
    then to the coordinator's update topic for that device. The artifact goes last to the
    device: the refusal it must send is the sign that every poison before it was handled."""
    deep, digits, junk = b"[" * 50000, "9" * 5000, b"\x00" * 8
    traversal = {"device_id": victim, "round": 1, "task": "/../../../../tmp/fedprune-poison",
                 "plan": {}, "train": {}, "planned_rounds": 2, "deadline": 0}
    artifact = {"device_id": victim, "round": 0, "task": task, "manifest": {"artifacts": 5},
                "artifact": "model.onnx.zst"}
    update = {"device_id": victim, "round": 1, "task": task, "num_samples": 1,
              "payload_sha256": hashlib.sha256(junk).hexdigest()}
    device_topic, coordinator_topic = topics.task(victim), topics.update(victim)
    return [
        ("task: header of 50,000 '['", device_topic, raw_envelope(MessageType.TASK, deep)),
        ("task: 5,000-digit integer", device_topic,
         raw_envelope(MessageType.TASK, _header({"device_id": victim}, round=digits))),
        ("task: path-traversal task id", device_topic, raw_envelope(MessageType.TASK, _header(traversal))),
        ('artifact: {"artifacts": 5}', topics.artifact(victim),
         raw_envelope(MessageType.ARTIFACT, _header(artifact), b"\x28\xb5\x2f\xfd")),
        ("update: header of 50,000 '['", coordinator_topic, raw_envelope(MessageType.UPDATE, deep)),
        ("update: 5,000-digit integer", coordinator_topic,
         raw_envelope(MessageType.UPDATE, _header(update, round=digits))),
        ("update: epsilon Infinity", coordinator_topic,
         raw_envelope(MessageType.UPDATE, _header(update, epsilon="Infinity"), junk)),
    ]


def _headers(wire: MqttPeer, topic: str) -> list:
    """The headers of what the fleet answered on `topic`."""
    return [parse_header(decode_envelope(p)) for _, p in wire.messages(topic=topic)]


def _deliveries(broker: Mosquitto, client: str, topic: str, size: int) -> int:
    """How many times the broker sent this message to `client`, from its debug log."""
    pattern = re.compile(rf"Sending PUBLISH to {re.escape(client)} \(d\d, q1, r\d, m\d+, "
                         rf"'{re.escape(topic)}', \.\.\. \({size} bytes\)\)")
    return len(pattern.findall(broker.log.read_text(errors="replace")))


def test_poison_messages_are_refused_once_and_crash_nothing(tmp_path, broker, database, fault_matrix):
    fleet, topics = "poison", Topics("poison")
    victim, ghost = "poison-0", "poison-ghost"
    devices = [_device(tmp_path, broker.url, fleet, i, 3) for i in range(3)]
    coordinator = _coordinator(tmp_path, broker.url, fleet, database, 3)
    # A plain MQTT client (anonymous, loopback) that publishes poison and records what the
    # fleet answers on the topics it watches.
    wire = MqttPeer(broker.url, "poison-wire", [topics.refusal(victim), topics.ack(ghost)])
    try:
        wait_until(lambda: database.current_round() is not None, 90, "round 1 to open",
                   [coordinator, *devices])
        task = database.tasks(1)[victim].task
        poisons = _poisons(topics, victim, task)
        # Then a well-formed update from a device the coordinator does not know: its ACK is the
        # sign the coordinator handled everything before it.
        sentinel = raw_envelope(MessageType.UPDATE, _header({"device_id": ghost, "round": 1, "task": "0" * 16,
                                                     "num_samples": 1,
                                                     "payload_sha256": hashlib.sha256(b"").hexdigest()}))
        for _, topic, message in poisons:
            wire.publish(topic, message)
        wire.publish(topics.update(ghost), sentinel)

        def artifact_refused() -> bool:
            return any(h.code.value == "bad_artifact" for h in _headers(wire, topics.refusal(victim)))
        wait_until(artifact_refused, 60,
                   f"{victim} to refuse the poisoned artifact (REFUSAL bad_artifact)",
                   [coordinator, *devices])
        wait_until(lambda: _headers(wire, topics.ack(ghost)), 60, "the coordinator to answer the "
                   "update published after the poison", [coordinator, *devices])
        # One restart each (together: start-up is the slow part): a poison that was not
        # acknowledged would be delivered again now.
        # One SIGTERM each, then wait: a second one (what stop() sends to a process still
        # running) can land while the first is being handled and the interpreter is finalizing,
        # where the default action kills it (-15).
        for process in (devices[0], coordinator):
            process.popen.terminate()
        assert devices[0].popen.wait(30) == 0, devices[0].tail()
        assert coordinator.popen.wait(30) == 0, coordinator.tail()
        devices[0].start()
        coordinator = _coordinator(tmp_path, broker.url, fleet, database, 3)
        _finish(coordinator, devices)
        measured = measure(database, tmp_path)
        assert _committed(database) == 2
        _assert_nothing_lost_or_doubled(measured, counted=6)
        # MQTT client ids: a device's is <fleet>.<device_id> on a broker without credentials
        recipient = {"task": f"{fleet}.{victim}", "artifact": f"{fleet}.{victim}",
                     "update": f"coord-{fleet}"}
        deliveries = {what: _deliveries(broker, recipient[topics.device_of(topic)[0]], topic, len(message))
                      for what, topic, message in poisons}
        assert all(n == 1 for n in deliveries.values()), deliveries
        assert len(_headers(wire, topics.ack(ghost))) == 1
        assert sum(h.code.value == "bad_artifact" for h in _headers(wire, topics.refusal(victim))) == 1
        fault_matrix(f"{len(poisons)} QoS 1 poison messages during round 1 of 2 (3 devices, SQLite): "
                     "to one device's task topic (a header of 50,000 '[', a 5,000-digit integer, a "
                     "path-traversal task id), its artifact topic ({\"artifacts\": 5}) and the "
                     "coordinator's update topic (50,000 '[', a 5,000-digit integer, epsilon "
                     "Infinity); then that device and the coordinator SIGTERMed and restarted once each",
                     "no process crashed; the device refused the artifact with bad_artifact; the "
                     "broker's log shows each poison delivered once, never again after the "
                     "restarts; both rounds committed", measured)
    finally:
        wire.close()
        _stop(devices + [coordinator])
