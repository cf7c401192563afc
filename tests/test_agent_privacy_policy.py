"""The device's own configuration decides its privacy, whatever the coordinator's task says: a
device with an epsilon budget or `require_dp` refuses a task without DP (REFUSAL privacy_policy,
never training); it refuses a task whose delta is above its own `dp_delta`, whose noise is below
its `min_noise_multiplier` or whose own epsilon is above its `max_task_epsilon`; and its ledger
accounts at its own delta, the epsilon it reports being the ledger's.

Each task trains at the noise worked out from its own settings, never one kept from an earlier
task, and a refused task saves nothing: across an agent restart (a new EdgeAgent on the same state
directory), a refused bad task does not block a later good one, and the noise each task's Opacus
optimizer used, the epsilon the ledger records and Opacus's and dp-accounting's accountants agree.

The real engine and real agents, message by message (tests/harness/fleet.py).
"""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from edge_sdk.agent import EdgeSettings
from edge_sdk.protocol import decode_envelope, parse_header
from edge_sdk.training import PrivacyLedger
from harness.device_tasks import first_task, restart_agent, send_task, task_variant
from harness.devices import DEVICE, refusals_in
from harness.fleet import Harness
from test_privacy import independent_epsilon


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
    assert parse_header(decode_envelope(update)).epsilon == pytest.approx(
        PrivacyLedger.from_json(json.dumps(ledger)).epsilon())


# --- each task's own noise; nothing saved for a refused task; restarts -------------------------
def _saved_history(h: Harness) -> list[tuple[float, float, int]]:
    ledger = json.loads((h.agents[DEVICE].state.root / "ledger.json").read_text())
    assert set(ledger) == {"ledger"}, "only the ledger is saved, no noise beside it"
    return [tuple(entry) for entry in ledger["ledger"]["history"]]


def _opacus_epsilon(history, delta: float = 1e-5) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("policy", [{"require_dp": True}, {"epsilon_budget": 8.0}])
def test_too_little_noise_is_refused_saves_nothing_and_a_later_good_task_trains(tmp_path, sqlite_url,
                                                                                policy):
    """Before: a require_dp device trained at noise 1e-6 (epsilon ~1e12); a budgeted one refused
    it but kept its noise, and after a restart trained every later task at it: refused forever."""
    h = Harness(tmp_path, sqlite_url, devices=1, dp={"noise_multiplier": 1.0})
    genuine = first_task(h)
    agent = restart_agent(h, **policy)
    send_task(h, task_variant(genuine, task="bad", dp={"noise_multiplier": 1e-6}))
    refusal = _only_refusal(h)
    assert refusal.code.value == "privacy_policy"
    assert "noise multiplier 1e-06, below this device's min_noise_multiplier 0.5" in refusal.message
    assert sorted(p.name for p in agent.state.root.iterdir()) == ["outbox", "tasks.json"]
    assert agent.state.tasks() == {"r000001-bad": "refused"}

    restart_agent(h)
    send_task(h, task_variant(genuine, task="good", dp={"noise_multiplier": 1.0}))
    [(_, update)] = h.take(h.to_coordinator, "update", DEVICE)
    [(noise, rate, steps)] = _saved_history(h)
    assert noise == 1.0
    epsilon = parse_header(decode_envelope(update)).epsilon
    assert epsilon == pytest.approx(_opacus_epsilon([(noise, rate, steps)]))
    assert epsilon == pytest.approx(independent_epsilon([(noise, rate, steps)], 1e-5), rel=0.01)


def test_a_task_whose_own_epsilon_is_over_the_ceiling_is_refused(tmp_path, sqlite_url):
    h = Harness(tmp_path, sqlite_url, devices=1, dp={"noise_multiplier": 1.0})
    genuine = first_task(h)
    agent = restart_agent(h, require_dp=True)
    # Above the minimum noise, but this task alone would spend epsilon ~13
    send_task(h, task_variant(genuine, task="weak", dp={"noise_multiplier": 0.55}))
    refusal = _only_refusal(h)
    assert refusal.code.value == "privacy_policy"
    assert "over this device's max_task_epsilon 10 (edge.toml)" in refusal.message
    assert not (agent.state.root / "ledger.json").exists()
    restart_agent(h, require_dp=True, max_task_epsilon=100.0)  # the device's own choice
    send_task(h, task_variant(genuine, task="weak-again", dp={"noise_multiplier": 0.55}))
    assert len(h.take(h.to_coordinator, "update", DEVICE)) == 1
    assert [entry[0] for entry in _saved_history(h)] == [0.55]


def test_every_task_trains_at_its_own_noise_before_and_after_a_restart(tmp_path, sqlite_url):
    """Before: the first task's noise was kept (and restored from disk) for every later task."""
    h = Harness(tmp_path, sqlite_url, devices=1, budgets={0: 50.0}, dp={"noise_multiplier": 1.0})
    genuine = first_task(h)
    send_task(h, task_variant(genuine, task="first", dp={"noise_multiplier": 2.0}))
    send_task(h, task_variant(genuine, round=2, task="second", dp={"noise_multiplier": 1.0}))
    restart_agent(h)
    send_task(h, task_variant(genuine, round=3, task="third", planned_rounds=4,
                              dp={"target_epsilon": 3.0, "delta": 1e-5}))
    updates = [parse_header(decode_envelope(p)) for _, p in h.take(h.to_coordinator, "update", DEVICE)]
    assert [u.task for u in updates] == ["first", "second", "third"]
    history = _saved_history(h)
    assert [noise for noise, _, _ in history[:2]] == [2.0, 1.0]
    _, rate, steps = history[2]  # calibrated from this task's own target, rounds and sampling
    assert history[2][0] == pytest.approx(get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=rate, steps=steps * 4, accountant="rdp"))
    for count, update in enumerate(updates, 1):  # what each update reports is the ledger's then
        assert update.epsilon == pytest.approx(_opacus_epsilon(history[:count]))
        assert update.epsilon == pytest.approx(independent_epsilon(history[:count], 1e-5), rel=0.01)


def test_a_device_without_a_policy_refuses_an_epsilon_no_update_can_report(tmp_path, sqlite_url):
    """Before: a device with no privacy settings trained at noise 1e-9, then could not build its
    UPDATE (epsilon ~1e18, over the protocol's bound) and left the task unanswered."""
    h = Harness(tmp_path, sqlite_url, devices=1, dp={"noise_multiplier": 1.0})
    genuine = first_task(h)
    agent = restart_agent(h)
    assert not agent.config.dp_required
    send_task(h, task_variant(genuine, task="none", dp={"noise_multiplier": 1e-9}))
    refusal = _only_refusal(h)
    assert refusal.code.value == "privacy_policy" and "an update can report" in refusal.message
    assert not (agent.state.root / "ledger.json").exists()
