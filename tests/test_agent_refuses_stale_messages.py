"""Fencing on the device: a TASK from an older leader epoch than the newest the device has acted
on (a deposed cluster leader that woke up), or of an older round than one it has accepted (a
replay), is refused with REFUSAL stale and its reason, and nothing is trained or saved; the
epoch and round it has seen survive a restart (state_dir/fence.json). A redelivery of a task it
already answered is not stale: the stored update is sent again, as before.

Artifacts of an older round or epoch: tests/test_agent_stores_only_verified_artifacts.py.
The real engine's task, re-sent with other header fields to a real agent (tests/harness).
"""

from __future__ import annotations

from edge_sdk.protocol import decode_envelope, parse_header
from harness.device_tasks import first_task, restart_agent, send_task, task_variant
from harness.devices import DEVICE, refusals_in
from harness.fleet import Harness


def _answers(h: Harness) -> tuple[list, list]:
    """(updates, refusals) the device sent since the last call, parsed."""
    updates = [parse_header(decode_envelope(p)) for _, p in h.take(h.to_coordinator, "update", DEVICE)]
    return updates, refusals_in(h.take(h.to_coordinator, "refusal", DEVICE))


def test_a_task_from_an_older_leader_epoch_or_round_is_refused_stale_across_a_restart(
        tmp_path, sqlite_url):
    h = Harness(tmp_path, sqlite_url, devices=1)
    genuine = first_task(h)
    accepted = task_variant(genuine, round=3, task="epoch-2", leader_epoch=2)
    send_task(h, accepted)
    updates, refusals = _answers(h)
    assert [(u.round, u.task) for u in updates] == [(3, "epoch-2")] and refusals == []
    agent = h.agents[DEVICE]
    trained = {name: (agent.state.root / name).read_bytes() for name in ("model.pt", "tasks.json")}

    for restarted in (False, True):
        if restarted:
            agent = restart_agent(h)
        send_task(h, task_variant(genuine, round=4, task="deposed", leader_epoch=1))
        send_task(h, task_variant(genuine, round=2, task="replayed", leader_epoch=2))
        updates, refusals = _answers(h)
        assert updates == []
        assert [(r.code.value, r.round, r.task) for r in refusals] == \
            [("stale", 4, "deposed"), ("stale", 2, "replayed")]
        assert "leader epoch 1, older than epoch 2 this device has already acted on" in \
            refusals[0].message
        assert "older than round 3, which this device has already acted on" in refusals[1].message
        assert {name: (agent.state.root / name).read_bytes() for name in trained} == trained

        send_task(h, accepted)  # a redelivery of the answered task: its update again, not stale
        updates, refusals = _answers(h)
        assert [(u.round, u.task) for u in updates] == [(3, "epoch-2")] and refusals == []

    send_task(h, task_variant(genuine, round=3, task="same-round-new-leader", leader_epoch=3))
    send_task(h, task_variant(genuine, round=4, task="epoch-2-again", leader_epoch=2))
    updates, refusals = _answers(h)
    assert [u.task for u in updates] == ["same-round-new-leader"]
    assert [(r.code.value, r.task) for r in refusals] == [("stale", "epoch-2-again")]
