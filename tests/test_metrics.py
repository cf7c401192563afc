"""Prometheus metrics (coordinator/service/metrics.py): after two real rounds (a real RoundEngine
and real EdgeAgents, no broker), `/metrics` parses with prometheus_client's parser and every
counter and gauge agrees with what is counted directly from the database; the per-device ε labels
disappear above `metrics_device_label_limit`. deploy/'s Grafana dashboard and Prometheus config
name only metrics the coordinator exposes.

Runs against SQLite and PostgreSQL (127.0.0.1:5432, database `test`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.service import ServiceSettings, Store
from coordinator.service.metrics import build_registry
from edge_sdk.protocol import MessageType, decode_envelope, encode_envelope, encode_message
from edge_sdk.protocol.messages import StatusHeader
from harness.fleet import Harness

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"

SNAPSHOT_EXTRA = {"inbox": {"queued": 3, "limit": 1000, "bytes": 4096, "max_bytes": 16777216,
                            "dropped_qos0": 2, "full_waits": 5, "over_limit": 1},
                  "handling": {"transient_failures": 7, "dead_lettered": 1}}


def scrape(store, config, snapshot=None) -> dict[str, dict[tuple, float]]:
    """`/metrics` as the coordinator serves it, parsed back: sample name -> labels -> value."""
    text = generate_latest(build_registry(store, config, snapshot)).decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("fedprune_")
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            assert key not in samples.setdefault(sample.name, {}), sample
            samples[sample.name][key] = sample.value
    return samples


def one(samples, name, **labels) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def two_rounds(tmp_path, db_url) -> Harness:
    """Round 1: dev-0's update accepted (and redelivered: a duplicate), dev-1's damaged (rejected),
    dev-2 refuses its task for its ε budget (and is exhausted). Round 2: dev-0 and dev-1 accepted.
    Then dev-1 reports offline."""
    h = Harness(tmp_path, db_url, devices=3, samples=64, budgets={2: 0.05}, dp={"noise_multiplier": 1.0},
                rounds={"min_devices": 1, "min_fraction": 0.3})
    h.register_all()
    h.engine.tick()
    h.deliver_to_devices("task")
    h.deliver_to_coordinator("refusal", "dev-2")
    (accepted,) = h.deliver_to_coordinator("update", "dev-0")
    h.engine.handle(*accepted)  # a QoS 1 redelivery
    (topic, payload), = h.take(h.to_coordinator, "update", "dev-1")
    envelope = decode_envelope(payload)
    damaged = bytearray(envelope.payload)
    damaged[-40] ^= 0xFF
    h.engine.handle(topic, encode_envelope(MessageType.UPDATE, envelope.header, bytes(damaged)))
    h.engine.tick()
    assert [r.state for r in h.store.rounds()] == ["committed"]

    h.engine.tick()
    assert set(h.store.tasks(2)) == {"dev-0", "dev-1"}
    h.deliver_to_devices("task")
    assert len(h.deliver_to_coordinator("update")) == 2
    h.engine.tick()
    assert [r.state for r in h.store.rounds()] == ["committed", "committed"] and h.engine.done
    h.engine.handle(h.topics.status("dev-1"), encode_message(StatusHeader(device_id="dev-1",
                                                                          online=False)))
    return h


def test_metrics_agree_with_the_database_after_two_rounds(tmp_path, db_url):
    h = two_rounds(tmp_path, db_url)
    store = h.store
    snapshot = {**h.engine.status(), **SNAPSHOT_EXTRA}
    m = scrape(store, h.config, lambda: snapshot)

    rounds = store.rounds()
    tasks = [t for r in rounds for t in store.tasks(r.number).values()]
    updates = [u for r in rounds for u in store.updates(r.number)]
    devices = store.devices()

    # Rounds.
    states = Counter(r.state.value for r in rounds)
    assert one(m, "fedprune_rounds_total", outcome="committed") == states["committed"] == 2
    assert one(m, "fedprune_rounds_total", outcome="aborted") == states["aborted"] == 0
    assert one(m, "fedprune_round_in_progress") == 0
    assert one(m, "fedprune_round_number") == 2
    assert one(m, "fedprune_rounds_planned") == h.config.rounds.total
    assert one(m, "fedprune_duplicate_updates_total") == sum(
        (r.summary or {}).get("duplicates", 0) for r in rounds) == 1
    assert one(m, "fedprune_artifact_refusals_total") == 0
    assert one(m, "fedprune_global_accuracy") == rounds[-1].summary["global_accuracy"]

    # Tasks by outcome and bounded reason: refusals by their code, as the round summary counts them.
    expected = Counter()
    for t in tasks:
        reason = ""
        if t.state == "refused":
            reason = t.reason.split(":")[0]
        elif t.state == "rejected":
            reason = "digest" if t.reason.startswith("payload_sha256") else t.reason
        expected[(t.state.value, reason)] += 1
    assert expected == {("accepted", ""): 3, ("refused", "privacy_budget"): 1,
                        ("rejected", "digest"): 1}
    got = {(dict(k)["outcome"], dict(k)["reason"]): v
           for k, v in m["fedprune_updates_total"].items() if v}
    assert got == expected
    assert one(m, "fedprune_updates_total", outcome="missing", reason="") == 0
    by_reason = Counter()
    for r in rounds:
        by_reason.update(r.summary["refused_by_reason"])
        assert r.summary["accepted"] == sum(t.state == "accepted" for t in store.tasks(r.number).values())
    assert one(m, "fedprune_updates_total", outcome="refused", reason="privacy_budget") == \
        by_reason["privacy_budget"]
    assert all(v == 0 for v in m["fedprune_round_tasks"].values())  # no round in progress
    assert {dict(k)["width"]: v for k, v in m["fedprune_tasks_total"].items()} == \
        {f"{w:g}": n for w, n in Counter(t.width_ratio for t in tasks).items()}

    # Bytes: the stored updates up, the task messages down; the summaries say the same.
    assert one(m, "fedprune_bytes_total", direction="up", kind="update") == \
        sum(u.bytes for u in updates) == sum(r.summary["bytes_up"] for r in rounds) > 0
    assert one(m, "fedprune_bytes_total", direction="down", kind="task") == \
        sum(t.bytes_down for t in tasks) == sum(r.summary["bytes_down"] for r in rounds) > 0
    assert one(m, "fedprune_bytes_total", direction="down", kind="artifact") == 0

    # Histograms: counts and sums from the rows' timestamps.
    durations = [r.finished_at - r.started_at for r in rounds if r.state == "committed"]
    assert one(m, "fedprune_round_duration_seconds_count") == len(durations) == 2
    assert abs(one(m, "fedprune_round_duration_seconds_sum") - sum(durations)) < 1e-3
    assert one(m, "fedprune_round_duration_seconds_bucket", le="+Inf") == 2
    finished = {r.number: r.finished_at for r in rounds}
    waits = [finished[u.round] - u.received_at for u in updates]
    assert one(m, "fedprune_update_time_to_commit_seconds_count") == len(waits) == 3
    assert abs(one(m, "fedprune_update_time_to_commit_seconds_sum") - sum(waits)) < 1e-3
    sent = {(t.round, t.device): t.sent_at for t in tasks}
    turnaround = [u.received_at - sent[(u.round, u.device)] for u in updates]
    assert one(m, "fedprune_update_turnaround_seconds_count") == 3
    assert abs(one(m, "fedprune_update_turnaround_seconds_sum") - sum(turnaround)) < 1e-3
    buckets = sorted(((float(dict(k)["le"]), v)
                      for k, v in m["fedprune_update_turnaround_seconds_bucket"].items()))
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))  # cumulative

    # Devices.
    assert one(m, "fedprune_devices_registered") == len(devices) == 3
    assert one(m, "fedprune_devices_online") == sum(d.online for d in devices) == 2
    assert one(m, "fedprune_devices_exhausted") == sum(d.exhausted for d in devices) == 1
    assert one(m, "fedprune_devices_fitting") == sum(d.fits for d in devices)
    assert {(dict(k)["width"], dict(k)["fits"]): v for k, v in m["fedprune_planned_devices"].items()} \
        == {(f"{w:g}", str(f).lower()): n for (w, f), n in
            Counter((d.width_ratio, d.fits) for d in devices).items()}

    # ε: per device below the label limit, and the fleet's aggregates.
    spent = {d.id: d.epsilon for d in devices if d.epsilon is not None}
    assert set(spent) == {"dev-0", "dev-1", "dev-2"}
    assert {dict(k)["device_id"]: v for k, v in m["fedprune_device_epsilon_spent"].items()} == spent
    assert one(m, "fedprune_epsilon_spent_max") == max(spent.values())
    assert one(m, "fedprune_devices_epsilon_spent_gcount") == len(spent)
    assert abs(one(m, "fedprune_devices_epsilon_spent_gsum") - sum(spent.values())) < 1e-9

    # The live counters come from the service's status snapshot.
    assert one(m, "fedprune_inbox_dropped_total", reason="qos0") == 2
    assert one(m, "fedprune_inbox_full_waits_total") == 5 and one(m, "fedprune_inbox_over_limit_total") == 1
    assert one(m, "fedprune_inbox_queued") == 3 and one(m, "fedprune_inbox_limit") == 1000
    assert one(m, "fedprune_inbox_bytes") == 4096 and one(m, "fedprune_inbox_max_bytes") == 16777216
    assert one(m, "fedprune_handling_transient_failures_total") == 7
    assert one(m, "fedprune_messages_dead_lettered_total") == 1
    assert one(m, "fedprune_messages_refused_total") == snapshot["messages"]["refused"]

    # Above the label limit: no device_id label anywhere, the aggregates unchanged.
    limited = scrape(store, h.config.model_copy(update={"metrics_device_label_limit": 1}))
    assert "fedprune_device_epsilon_spent" not in limited
    assert not any("device_id" in dict(k) for samples in limited.values() for k in samples)
    assert one(limited, "fedprune_epsilon_spent_max") == max(spent.values())
    assert limited["fedprune_updates_total"] == m["fedprune_updates_total"]
    assert "fedprune_inbox_queued" not in limited  # no snapshot: the database's metrics only


def test_a_scrape_mid_round_counts_only_closed_rounds(tmp_path):
    """Counters never go down: the open round's tasks are a gauge until the round closes."""
    h = Harness(tmp_path, f"sqlite:///{tmp_path / 'c.db'}", devices=2, samples=64)
    h.register_all()
    h.engine.tick()
    m = scrape(h.store, h.config)
    assert one(m, "fedprune_round_in_progress") == 1
    assert one(m, "fedprune_round_tasks", state="sent") == 2
    assert all(v == 0 for v in m["fedprune_updates_total"].values())
    assert one(m, "fedprune_rounds_total", outcome="committed") == 0


def exposed_names() -> set[str]:
    """Every series name the registry exposes (counters with _total, histograms' series)."""
    store = Store("sqlite://")
    try:
        families = list(build_registry(store, ServiceSettings(), lambda: {
            **SNAPSHOT_EXTRA, "messages": {"refused": 0, "failed": 0},
            "process": {"peak_rss_bytes": 1}}).collect())
    finally:
        store.close()
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum"),
                "gaugehistogram": ("_bucket", "_gcount", "_gsum")}
    return {family.name + suffix for family in families for suffix in suffixes[family.type]}


def test_the_grafana_dashboard_names_only_exposed_metrics():
    dashboard = json.loads((DEPLOY / "grafana" / "fedprune.json").read_text())
    expressions = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                expressions.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(dashboard)
    assert len(expressions) >= 8
    exposed = exposed_names()
    named = {name for expr in expressions for name in re.findall(r"\bfedprune_\w+", expr)}
    assert named and named <= exposed, sorted(named - exposed)
    for needed in ("fedprune_rounds_total", "fedprune_updates_total", "fedprune_bytes_total",
                   "fedprune_round_duration_seconds_bucket", "fedprune_devices_online",
                   "fedprune_devices_registered", "fedprune_planned_devices",
                   "fedprune_epsilon_spent_max"):
        assert needed in named, needed
    assert any("histogram_quantile" in e and "fedprune_round_duration_seconds_bucket" in e
               for e in expressions)


def test_the_prometheus_config_scrapes_the_coordinator():
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    assert re.search(r"^\s*- job_name: fedprune-coordinator$", text, re.M)
    assert re.search(r"^\s*metrics_path: /metrics$", text, re.M)
    assert re.search(r"^\s*- targets: \[\"127\.0\.0\.1:8080\"\](\s*#.*)?$", text, re.M)
    assert re.search(r"^\s*#\s*authorization:", text, re.M)  # the bearer token, for a remote API
