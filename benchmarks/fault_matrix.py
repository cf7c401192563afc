"""Run the fault tests against real Mosquitto and render docs/RELIABILITY.md from their rows.

    python benchmarks/fault_matrix.py   # runs `pytest -m faults`, writes docs/RELIABILITY.md

Every number in the matrix is one a test measured (tests/test_faults.py, `measure`); a test that
fails records no row and is listed as failed instead.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The tests that record rows: one coordinator against faults, then two in cluster mode.
FAULT_TESTS = ("tests/test_faults.py", "tests/test_coordinator_failover.py")
# Asserted by other tests, not measured here: (scenario, what happened, test, how it runs). Engine
# tests drive the real round engine and edge agents message by message (tests/harness/fleet.py),
# no broker; service tests run CoordinatorService in the test process against Mosquitto.
ENGINE, SERVICE = "engine, SQLite and PostgreSQL", "service over Mosquitto, SQLite and PostgreSQL"
STATIC_ROWS = [
    ("QoS 1 redelivery of an accepted update", "acknowledged as a duplicate, counted once",
     "test_coordinator_engine.py::test_a_round_commits_with_every_update_counted_once", ENGINE),
    ("coordinator restarted mid-round (engine on the same database), first update replayed after it",
     "round resumed, unanswered tasks re-sent with the same ids, replay counted once, the committed "
     "model equals the aggregate of the 3 distinct updates",
     "test_coordinator_engine.py::test_restart_mid_round_resumes_without_losing_or_double_counting",
     ENGINE),
    ("late update (after the deadline), stale update (round closed), update on another device's "
     "topic, oversized and bit-flipped updates", "each refused and, where its header is readable, "
     "the device told why; the model untouched",
     "test_coordinator_engine.py::test_late_stale_foreign_and_oversized_updates_are_refused_and_the_device_told",
     ENGINE),
    ("coordinator killed after marking a round committing; an update queued meanwhile arrives "
     "after the restart", "refused with the reason (round 1 is committing); the commit aggregates "
     "exactly the update stored before the crash",
     "test_engine_hostile.py::test_updates_arriving_while_a_resumed_round_commits_are_refused",
     "engine, SQLite"),
    ("a stored update that no longer decodes when the round commits",
     "the round is aborted once with the reason; after a restart a new round opens instead of "
     "the commit failing again",
     "test_engine_hostile.py::test_a_commit_that_fails_aborts_the_round_once_and_a_restart_does_not_crash",
     ENGINE),
    ("the database locked by another connection while an update is stored",
     "not acknowledged to the broker; retried with backoff and stored once the lock goes; the "
     "device gets one ACK, accepted",
     "test_service_retries_dead_letters_and_bounds_its_inbox.py::"
     "test_an_update_the_database_cannot_store_for_a_while_is_stored_once_it_can",
     SERVICE),
    ("the database locked for every attempt to store an update",
     "after the last attempt the raw message is kept in state_dir/dead-letter/ (mode 0600, with "
     "topic and reason) and acknowledged; the broker does not deliver it again; it is not stored "
     "(the device resends it on its timer)",
     "test_service_retries_dead_letters_and_bounds_its_inbox.py::"
     "test_an_update_that_always_fails_is_dead_lettered_and_acknowledged",
     SERVICE),
    ("the coordinator (re)connects to the retained status of more devices than its inbox holds "
     "(Mosquitto sends them all at once)",
     "the link stops reading at the limit and takes the rest as the engine makes room; every one "
     "is delivered and acknowledged, and live messages keep coming (none left unacknowledged to "
     "hold the broker's in-flight slots)",
     "test_service_retries_dead_letters_and_bounds_its_inbox.py::"
     "test_retained_state_past_the_inbox_limit_waits_in_the_broker_and_is_all_delivered",
     "service over Mosquitto, SQLite"),
    ("cluster mode: two coordinators store the same update at once; the leader moves the round to "
     "committing while another coordinator is storing an update",
     "the second copy waits for the first and is acknowledged as a duplicate; the move to "
     "committing waits for the update being stored, and the commit reads it; an update after that "
     "is refused (the round closed) and not stored",
     "test_coordinator_failover.py::"
     "test_an_update_being_stored_holds_its_round_open_and_a_racing_copy_is_a_duplicate",
     "store, three sessions on PostgreSQL"),
    ("cluster mode: six coordinators' stores start at the same instant on an empty PostgreSQL "
     "database (a supervisor starting the cluster)",
     "every one starts: the schema is created under a transaction-level advisory lock, so the "
     "others find the tables made; without the lock one failed on a duplicate type in 3 of 3 runs "
     "(and a coordinator exited in `benchmarks/service_overhead.py` with 2 coordinators)",
     "test_coordinator_failover.py::"
     "test_coordinators_started_together_on_an_empty_database_all_start",
     "store, six threads on PostgreSQL"),
    ("cluster mode: another coordinator raised the leader epoch (a takeover) while the old leader's "
     "store still runs; a second round opened while one is in progress",
     "every write of the old leader (open, commit, a task's state, a device's) and its check before "
     "publishing fail with Deposed and write nothing; the new leader's second round is refused by "
     "the one-round-in-progress index, collecting or committing",
     "test_coordinator_failover.py::"
     "test_a_deposed_leaders_writes_fail_and_one_round_at_most_is_in_progress",
     "store, two sessions on PostgreSQL"),
    ("cluster mode: the leader's lock session ended by another (as a follower does to a hung "
     "leader) before its heartbeat thread ran",
     "the old leader's next poll asks its lock connection and the epoch itself and steps down at "
     "once (before fencing it trusted the heartbeat and still said it led)",
     "test_coordinator_failover.py::"
     "test_a_leader_whose_session_was_ended_knows_at_once_without_its_heartbeat",
     "leader lock, two sessions on PostgreSQL"),
    ("2 refused updates for one task, the coordinator restarted (SIGTERM), 2 more",
     "the count is kept in the database: the 3rd is refused as before, the 4th is not decoded at "
     "all (max_refused_updates 3; before, each restart gave a fresh allowance)",
     "test_coordinator_restart_counters.py::"
     "test_the_refused_update_count_survives_a_coordinator_restart",
     "service process over Mosquitto, SQLite"),
    ("the broker down when the coordinator starts, then started",
     "logged in words once per change, not per attempt (connecting; cannot reach the broker: "
     "Connection refused (attempt 1); retrying in 1 s, and what to check); /status says retrying, "
     "the error and when it tries next; /healthz answers 503 with the reason once the broker has "
     "been out of reach for broker.unhealthy_after_seconds, not before; fedprune_broker_connected "
     "0; once the broker listens: connected, /healthz 200, the gauge 1, no reconnection counted",
     "test_broker_state.py::"
     "test_serve_reports_a_broker_it_cannot_reach_and_recovers_when_it_comes_up",
     "service process (`fedprune coordinator serve`), Mosquitto started late"),
    ("no broker at an edge agent's address",
     "it says where it will connect before loading its data, then stops broker_give_up_seconds "
     "after it began connecting (3 s in the test) with rc 2 naming the broker, the last error "
     "and what to check, no traceback (a broker lost later is retried for ever)",
     "test_broker_state.py::test_an_edge_agent_gives_up_on_a_broker_that_never_answers",
     "edge process, nothing listening"),
    ("a broker that refuses the credentials; a server on the port that is not an MQTT broker",
     "refused, with the broker's reason in words (Not authorized) and what to check, logged once "
     "over several attempts; the other told apart: no answer to CONNECT, check the port and "
     "mqtt:// against mqtts://",
     "test_broker_state.py::"
     "test_a_broker_that_refuses_and_a_server_that_is_no_broker_are_told_apart",
     "transport over Mosquitto without anonymous access, and a TCP server that hangs up"),
    ("two coordinators with default settings on one broker",
     "each its own client id; after the second connected, the first still confirms a "
     "subscription; neither disconnected nor reconnected (/status), and the broker's log shows "
     "no takeover",
     "test_broker_state.py::"
     "test_two_coordinators_with_default_ids_on_one_broker_keep_their_connections",
     "two services in the test process over Mosquitto"),
    ("two coordinators configured with one broker.client_id",
     "the broker drops each as the other connects (its log: already connected, closing old "
     "connection); each logs 'another client connected with client id shared-id and the broker "
     "disconnected this one ...; give each coordinator its own client_id' (at the 2nd, 10th and "
     "every 50th drop, not each one), and /healthz answers 503 naming the id",
     "test_broker_state.py::"
     "test_a_client_id_two_coordinators_share_is_named_in_the_log_and_on_healthz",
     "two services in the test process over Mosquitto"),
    ('`coordinator serve` and `demo --broker` on one broker',
     'each coordinator has its own client id (kept in its state_dir), device client ids are <fleet>.<device_id>: the serving coordinator connected once and was never disconnected while the demo ran its round with 0 lost',
     'test_readme_commands.py::test_the_tour',
     "the README's commands over Mosquitto"),
]
COLUMNS = ("sent", "counted", "refused", "lost", "duplicated", "redelivered", "counted_unsent",
           "dead_lettered")
DEFINITIONS = (
    "Counts are of updates, each identified by (device, round, task), and are measured after the "
    "test by one function (`measure` in tests/test_faults.py) from the devices' state directories "
    "and logs and the coordinator's database:",
    "",
    "- **sent**: a device's state or log shows it sent the update: its `state_dir/tasks.json` "
    "entry is `sent`, `acked` or `rejected`, or it is in the device's outbox, or the device "
    "logged `round N: sent` more times than it has such records (each extra one is counted as "
    "sent and lost).",
    "- **counted**: the update is in a committed round's `summary[\"contributions\"]`, which the "
    "engine writes at commit with one `device/task` entry per update added to the aggregate.",
    "- **refused**: sent, not counted, and refused with a reason the device received (but see "
    "**lost** for an update refused as late that was sent in time): its "
    "tasks.json entry is `rejected` (an ACK with accepted=false) and a reason is on record (the "
    "coordinator's task reason, else the reason the device logged). The reasons are listed "
    "with the row.",
    "- **lost**: sent, neither counted nor refused; and an update refused for its timing (late, or "
    "its round no longer open) that the device's log shows it sent before the round's deadline. "
    "Such an update reached the broker in time while the coordinator was down across the "
    "deadline: the coordinator judges lateness by when an update reaches it (MQTT 3.1.1 gives no "
    "broker arrival time, and device clocks are not trusted), so it refuses it, and the matrix "
    "counts it as lost, not refused (the device's send time on the test machine's one clock, "
    "loopback to the broker, stands for the arrival time).",
    "- **duplicated**: entries in the committed rounds' contributions beyond the first entry of "
    "the same update (an update aggregated twice).",
    "- **redelivered**: second copies of an update that reached the coordinator and were "
    "acknowledged as duplicates without being counted again (the rounds' `duplicates` counters).",
    "- **counted, never sent**: contributions that match no update any device records sending "
    "(a forged or phantom update in the aggregate).",
    "- **dead-lettered**: messages the coordinator could not store after its last retry and kept "
    "in `state_dir/dead-letter/` (acknowledged, so never redelivered).",
)


def _failed_tests(junit: Path) -> list[str]:
    if not junit.exists():
        return []
    failed = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(case.get("name"))
    return failed


def _check_static_rows() -> None:
    """A renamed or removed test must not stay cited here."""
    for _, _, test, _ in STATIC_ROWS:
        path, name = test.split("::")
        if f"def {name}(" not in (ROOT / "tests" / path).read_text():
            raise SystemExit(f"STATIC_ROWS cites tests/{test}, which does not exist; update it")


def main() -> None:
    _check_static_rows()
    work = Path(tempfile.mkdtemp(prefix="fault-matrix-"))
    rows_path, junit = work / "rows.jsonl", work / "junit.xml"
    started, load = time.time(), os.getloadavg()[0]  # other work on the machine slows the run
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "faults", *FAULT_TESTS,
                          f"--junitxml={junit}"], cwd=ROOT,
                         env={**os.environ, "FEDPRUNE_FAULT_MATRIX": str(rows_path),
                              "OMP_NUM_THREADS": "1"})
    seconds = time.time() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # pytest and every process it started
    cpu_seconds = usage.ru_utime + usage.ru_stime
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []
    failed = _failed_tests(junit)
    lines = ["# Reliability: the fault matrix", "",
             "Produced by `python benchmarks/fault_matrix.py`, which runs the fault tests "
             f"(`pytest -m faults {' '.join(FAULT_TESTS)}`: real Mosquitto 2.0 with "
             "`deploy/mosquitto/mosquitto.conf` as shipped, debug logging added so the broker's log "
             "shows each delivery; the coordinator (`fedprune coordinator serve`) and every device "
             "(`fedprune-edge run`) as separate processes; "
             "the coordinator on SQLite, and on PostgreSQL where the row says so; two coordinators "
             "in cluster mode, `[cluster]`, in the row that says so) and writes this "
             "file from the rows they record. Machine: "
             f"{platform.machine()}, {os.cpu_count()} cores; the fault tests took {seconds:.0f} s "
             f"({cpu_seconds:.0f} CPU-seconds; load average {load:.1f} when they started); "
             f"pytest exit status: {run.returncode}.", "", *DEFINITIONS, "",
             "| scenario | what happened | sent | counted | refused | lost | duplicated | "
             "redelivered | counted, never sent | dead-lettered |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        outcome = row["outcome"]
        if row["refusals"]:
            outcome += "; refused: " + "; ".join(row["refusals"])
        cells = " | ".join(str(row[c]) for c in COLUMNS)
        lines.append(f"| {row['scenario']} | {outcome.replace('|', '/')} | {cells} |")
    if failed:
        lines += ["", "These fault tests FAILED and recorded no row: "
                  + ", ".join(f"`{name}`" for name in failed) + "."]
    lines += ["", "Also asserted by the suite, and not measured by the fault matrix: engine-level "
              "tests (the real round engine and real edge agents driven message by message by "
              "`tests/harness/fleet.py`, no broker) and service-level tests (`CoordinatorService` in "
              "the test process against Mosquitto, the database locked by another connection):", "",
              "| scenario | what happened | test | runs as |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | `tests/{c}` | {d} |" for a, b, c, d in STATIC_ROWS]
    (ROOT / "docs" / "RELIABILITY.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
