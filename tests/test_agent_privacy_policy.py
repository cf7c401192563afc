"""The device's own configuration decides its privacy, whatever the coordinator's task says: a
device with an epsilon budget or `require_dp` refuses a task without DP (REFUSAL privacy_policy,
never training); it refuses a task whose delta is above its own `dp_delta`; and its ledger
accounts at its own delta, the epsilon it reports being the ledger's.

The real engine and real agents, message by message (tests/harness/fleet.py).
"""

from __future__ import annotations

import json

import pytest

from edge_sdk.agent import EdgeSettings
from edge_sdk.protocol import decode_envelope, parse_header
from harness.devices import DEVICE, refusals_in
from harness.fleet import Harness


def _only_refusal(h: Harness):
    refusals = refusals_in(h.take(h.to_coordinator, "refusal", DEVICE))
    assert len(refusals) == 1, f"expected one refusal, got {refusals} (updates: " \
        f"{len(h.take(h.to_coordinator, 'update', DEVICE))})"
    return refusals[0]


@pytest.mark.parametrize("policy", [{"budgets": {0: 8.0}}, {"require_dp": True}])
def test_a_device_that_requires_dp_refuses_a_task_without_it(tmp_path, sqlite_url, policy):
    h = Harness(tmp_path, sqlite_url, devices=1, budgets=policy.get("budgets"))
    agent = h.agents[DEVICE]
    if "require_dp" in policy:
        agent.config = EdgeSettings.model_validate({**agent.config.model_dump(), "require_dp": True})
    h.register_all()
    h.engine.tick()
    h.deliver_to_devices("task")  # the coordinator has no dp section: the task says "dp": null
    refusal = _only_refusal(h)
    assert refusal.code.value == "privacy_policy"
    assert ("epsilon_budget" if "budgets" in policy else "require_dp") in refusal.message
    assert h.take(h.to_coordinator, "update") == []
    assert not (agent.state.root / "model.pt").exists()  # it never trained


def test_a_task_whose_delta_is_above_the_devices_is_refused(tmp_path, sqlite_url):
    h = Harness(tmp_path, sqlite_url, devices=1, budgets={0: 50.0},
                dp={"noise_multiplier": 1.0, "delta": 1e-3})
    h.register_all()
    h.engine.tick()
    h.deliver_to_devices("task")
    refusal = _only_refusal(h)
    assert refusal.code.value == "privacy_policy" and "dp_delta 1e-05" in refusal.message
    assert not (h.agents[DEVICE].state.root / "ledger.json").exists()


def test_the_ledger_accounts_at_the_devices_delta_whatever_the_task_says(tmp_path, sqlite_url):
    h = Harness(tmp_path, sqlite_url, devices=1, budgets={0: 50.0},
                dp={"noise_multiplier": 1.0, "delta": 1e-9})  # stricter than the device: accepted
    h.register_all()
    h.engine.tick()
    h.deliver_to_devices("task")
    [(_, update)] = h.take(h.to_coordinator, "update", DEVICE)
    ledger = json.loads((h.agents[DEVICE].state.root / "ledger.json").read_text())["ledger"]
    assert ledger["delta"] == 1e-5  # edge.toml's dp_delta (its default), not the task's 1e-9
    assert ledger["history"]  # it trained with DP, and the epsilon it reports is at its own delta
    from edge_sdk.training import PrivacyLedger
    assert parse_header(decode_envelope(update)).epsilon == pytest.approx(
        PrivacyLedger.from_json(json.dumps(ledger)).epsilon())
