"""Prometheus metrics of the coordinator: `build_registry(store, config, snapshot)`.

Everything about rounds, tasks, updates and devices is derived from the database at scrape time
by one collector (`StoreCollector`), with a handful of aggregate queries; nothing is counted in
memory alongside the writes. So:

* the metrics can never disagree with the database (nor with `/status`, which reads it too), and
  a restarted coordinator reports the same counters as before it stopped, not zeros;
* the scrape never touches the engine's thread or its objects: it opens its own sessions on the
  store (SQLite allows concurrent readers, PostgreSQL is built for them), and the engine's code
  has no metrics calls to forget or to fail.

Counters count only what no longer changes, so they never go down between scrapes: a task's state
is final once its round is closed (committed or aborted: later updates and refusals for it are
answered "not open"), so `fedprune_updates_total` counts the tasks of closed rounds; tasks of the
round in progress are the gauge `fedprune_round_tasks`. Stored updates, sent tasks and closed
rounds are never deleted.

The live counters the database does not hold (messages dropped by the MQTT link's inbox, handling
failures retried or dead-lettered, messages refused before decoding) come from `snapshot`, the
service's status dict (`CoordinatorService.status`), read once per scrape.

Label cardinality is bounded: refusal reasons are the device's refusal code, rejection reasons one
of a fixed few kinds (`rejection_kind`), widths the planner's few ratios, and the per-device
`fedprune_device_epsilon_spent{device_id}` only while the fleet has at most
`metrics_device_label_limit` devices; above it only fleet aggregates of ε are exposed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (CounterMetricFamily, GaugeHistogramMetricFamily,
                                    GaugeMetricFamily, HistogramMetricFamily, Metric)
from prometheus_client.registry import Collector
from sqlalchemy import and_, case, func, select

from edge_sdk.protocol.messages import MAX_EPSILON, RefusalCode

from .states import ROUND_IN_PROGRESS, RoundState, TaskState
from .store import DeviceRow, RoundRow, Store, TaskRow, UpdateRow

log = logging.getLogger(__name__)

DEFAULT_DEVICE_LABEL_LIMIT = 100
# Rounds last from seconds (tests, demos) to hours (a fleet of phones charging overnight).
ROUND_SECONDS_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
UPDATE_SECONDS_BUCKETS = (0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)
EPSILON_BUCKETS = (0.5, 1, 2, 4, 8, 16, 32)

FINAL_TASK_OUTCOMES = (TaskState.ACCEPTED, TaskState.REFUSED, TaskState.REJECTED,
                       TaskState.MISSING)
_REFUSAL_CODES = frozenset(code.value for code in RefusalCode)
# What the engine writes as a rejected task's reason (engine._on_update, _check_claims,
# _check_norm), by its opening words; anything else is an update that did not decode or check.
_REJECTIONS = (("late", "late"), ("payload_sha256 ", "digest"), ("num_samples ", "num_samples"),
               ("the update changes the model by an L2 norm", "norm"))


def refusal_code(reason: str | None) -> str:
    """A refused task's reason label: the device's refusal code (the engine stores
    "code: message"; `refused_by_reason` in the round summary counts the same)."""
    code = (reason or "").split(":")[0]
    return code if code in _REFUSAL_CODES else "other"


def rejection_kind(reason: str | None) -> str:
    """A rejected task's reason label: late, digest, num_samples, norm or invalid (it did not
    decode or match the task: codec and intake errors, whose texts are unbounded)."""
    for prefix, kind in _REJECTIONS:
        if (reason or "").startswith(prefix):
            return kind
    return "invalid"


def reason_label(state: TaskState | str, reason: str | None) -> str:
    """The bounded `reason` label of a task in `state` ("" for accepted and missing ones)."""
    if state == TaskState.REFUSED:
        return refusal_code(reason)
    if state == TaskState.REJECTED:
        return rejection_kind(reason)
    return ""


def width_label(width: float) -> str:
    return f"{width:g}"


def _histogram_query(value, buckets: Sequence[float]) -> list:
    """count, sum and one cumulative count per bucket of `value`, as SQL aggregates."""
    return [func.count(value), func.coalesce(func.sum(value), 0.0),
            *(func.coalesce(func.sum(case((value <= b, 1), else_=0)), 0) for b in buckets)]


def _histogram(name: str, documentation: str, buckets: Sequence[float], row,
               family=HistogramMetricFamily) -> Metric:
    count, total, *cumulative = row
    pairs = [(f"{b:g}", float(c)) for b, c in zip(buckets, cumulative)] + [("+Inf", float(count))]
    if family is GaugeHistogramMetricFamily:
        return family(name, documentation, buckets=pairs, gsum_value=float(total))
    return family(name, documentation, buckets=pairs, sum_value=float(total))


class StoreCollector(Collector):
    """The coordinator's metrics, read from `store` (and `snapshot`, if given) at each scrape."""

    def __init__(self, store: Store, config: Any = None,
                 snapshot: Callable[[], Mapping[str, Any]] | None = None):
        self.store, self.config, self.snapshot = store, config, snapshot
        self.device_label_limit = getattr(config, "metrics_device_label_limit",
                                          DEFAULT_DEVICE_LABEL_LIMIT)

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked: the families depend on the fleet's size (per-device labels)

    def collect(self) -> Iterator[Metric]:
        with self.store.session() as s:
            yield from self._rounds(s)
            yield from self._tasks(s)
            yield from self._bytes(s)
            yield from self._timings(s)
            yield from self._devices(s)
        yield from self._live()

    # --- rounds ----------------------------------------------------------------------------
    def _rounds(self, s) -> Iterator[Metric]:
        by_state = dict(s.execute(select(RoundRow.state, func.count()).group_by(RoundRow.state)).all())
        rounds = CounterMetricFamily(
            "fedprune_rounds", "Closed rounds by outcome: committed (a new global checkpoint) or "
            "aborted (below quorum at the deadline, or the commit failed for good; its round "
            "number is attempted again).", labels=["outcome"])
        for outcome in (RoundState.COMMITTED, RoundState.ABORTED):
            rounds.add_metric([outcome.value], by_state.get(outcome, 0))
        yield rounds
        yield GaugeMetricFamily(
            "fedprune_round_in_progress", "1 while a round is collecting or committing, else 0.",
            value=int(any(by_state.get(state, 0) for state in ROUND_IN_PROGRESS)))
        yield GaugeMetricFamily(
            "fedprune_round_number", "The number of the latest round opened (0: none yet).",
            value=s.scalar(select(func.max(RoundRow.number))) or 0)
        if self.config is not None and getattr(self.config, "rounds", None) is not None:
            yield GaugeMetricFamily("fedprune_rounds_planned",
                                    "Rounds to commit in all (coordinator.toml rounds.total).",
                                    value=self.config.rounds.total)
        counts = s.execute(select(
            func.coalesce(func.sum(RoundRow.summary["duplicates"].as_integer()), 0),
            func.coalesce(func.sum(RoundRow.summary["artifact_refusals"].as_integer()), 0))).one()
        yield CounterMetricFamily(
            "fedprune_duplicate_updates", "Second copies of accepted updates (QoS 1 redelivery or "
            "replays), acknowledged and not counted again.", value=counts[0])
        yield CounterMetricFamily(
            "fedprune_artifact_refusals", "Exported models (artifacts) that devices refused.",
            value=counts[1])
        accuracy = s.scalar(select(RoundRow.summary["global_accuracy"].as_float())
                            .where(RoundRow.state == RoundState.COMMITTED)
                            .order_by(RoundRow.number.desc()).limit(1))
        family = GaugeMetricFamily("fedprune_global_accuracy", "Test accuracy of the latest "
                                   "committed global model (0..1; no sample before one, or "
                                   "with evaluate = false).", labels=[])
        if accuracy is not None:
            family.add_metric([], accuracy)
        yield family

    # --- tasks and updates -----------------------------------------------------------------
    def _tasks(self, s) -> Iterator[Metric]:
        closed = (select(TaskRow.state, TaskRow.reason, func.count()).select_from(TaskRow)
                  .join(RoundRow, RoundRow.number == TaskRow.round)
                  .where(RoundRow.state.in_((RoundState.COMMITTED, RoundState.ABORTED)))
                  .group_by(TaskRow.state, TaskRow.reason))
        outcomes: dict[tuple[str, str], int] = {(state.value, ""): 0
                                                for state in (TaskState.ACCEPTED, TaskState.MISSING)}
        for state, reason, count in s.execute(closed):
            key = (TaskState(state).value, reason_label(state, reason))
            outcomes[key] = outcomes.get(key, 0) + count
        updates = CounterMetricFamily(
            "fedprune_updates", "Tasks of closed rounds by their final outcome: accepted (its "
            "update was stored; aggregated if the round committed), refused (the device refused "
            "the task; reason: its refusal code), rejected (its last update was refused; reason: "
            "late, digest, num_samples, norm or invalid), missing (never answered).",
            labels=["outcome", "reason"])
        for (outcome, reason), count in sorted(outcomes.items()):
            updates.add_metric([outcome, reason], count)
        yield updates

        current = (select(TaskRow.state, func.count()).select_from(TaskRow)
                   .join(RoundRow, RoundRow.number == TaskRow.round)
                   .where(RoundRow.state.in_(ROUND_IN_PROGRESS)).group_by(TaskRow.state))
        in_round = {TaskState(state): count for state, count in s.execute(current)}
        tasks = GaugeMetricFamily("fedprune_round_tasks",
                                  "Tasks of the round in progress by state (none between rounds).",
                                  labels=["state"])
        for state in TaskState:
            tasks.add_metric([state.value], in_round.get(state, 0))
        yield tasks

        widths = CounterMetricFamily(
            "fedprune_tasks", "Tasks sent (one per selected device and round; re-sends of the "
            "same task not counted) by the width ratio the planner gave the device.",
            labels=["width"])
        for width, count in s.execute(select(TaskRow.width_ratio, func.count())
                                      .group_by(TaskRow.width_ratio).order_by(TaskRow.width_ratio)):
            widths.add_metric([width_label(width)], count)
        yield widths

    def _bytes(self, s) -> Iterator[Metric]:
        up = s.scalar(select(func.coalesce(func.sum(UpdateRow.bytes), 0)))
        down = s.scalar(select(func.coalesce(func.sum(TaskRow.bytes_down), 0)))
        artifacts = s.scalar(select(func.coalesce(
            func.sum(RoundRow.summary["artifact_bytes"].as_integer()), 0)))
        family = CounterMetricFamily(
            "fedprune_bytes", "Bytes moved: up/update = payloads of stored (accepted) updates; "
            "down/task = task messages as first sent (envelope and model; re-sends after a "
            "reconnect not counted); down/artifact = exported-model messages.",
            labels=["direction", "kind"])
        family.add_metric(["up", "update"], up)
        family.add_metric(["down", "task"], down)
        family.add_metric(["down", "artifact"], artifacts)
        yield family

    def _timings(self, s) -> Iterator[Metric]:
        seconds = RoundRow.finished_at - RoundRow.started_at
        row = s.execute(select(*_histogram_query(seconds, ROUND_SECONDS_BUCKETS))
                        .where(RoundRow.state == RoundState.COMMITTED)).one()
        yield _histogram("fedprune_round_duration_seconds",
                         "Committed rounds, from opening (tasks sent) to the commit.",
                         ROUND_SECONDS_BUCKETS, row)
        wait = RoundRow.finished_at - UpdateRow.received_at
        row = s.execute(select(*_histogram_query(wait, UPDATE_SECONDS_BUCKETS))
                        .select_from(UpdateRow).join(RoundRow, RoundRow.number == UpdateRow.round)
                        .where(RoundRow.state == RoundState.COMMITTED)).one()
        yield _histogram("fedprune_update_time_to_commit_seconds",
                         "Updates aggregated into a committed round, from the update's arrival "
                         "(stored) to the round's commit: how long accepted work waits.",
                         UPDATE_SECONDS_BUCKETS, row)
        turnaround = UpdateRow.received_at - TaskRow.sent_at
        row = s.execute(select(*_histogram_query(turnaround, UPDATE_SECONDS_BUCKETS))
                        .select_from(UpdateRow).join(TaskRow, and_(TaskRow.round == UpdateRow.round,
                                            TaskRow.device == UpdateRow.device,
                                            TaskRow.task == UpdateRow.task))).one()
        yield _histogram("fedprune_update_turnaround_seconds",
                         "Stored updates, from their task's sending to the update's arrival: "
                         "download, local training and upload on the device.",
                         UPDATE_SECONDS_BUCKETS, row)

    # --- devices ---------------------------------------------------------------------------
    def _devices(self, s) -> Iterator[Metric]:
        registered, online, exhausted, fitting = s.execute(select(
            func.count(), func.coalesce(func.sum(case((DeviceRow.online, 1), else_=0)), 0),
            func.coalesce(func.sum(case((DeviceRow.exhausted, 1), else_=0)), 0),
            func.coalesce(func.sum(case((DeviceRow.fits, 1), else_=0)), 0))).one()
        yield GaugeMetricFamily("fedprune_devices_registered", "Devices registered.", value=registered)
        yield GaugeMetricFamily("fedprune_devices_online",
                                "Registered devices whose last status message said online.",
                                value=online)
        yield GaugeMetricFamily("fedprune_devices_fitting",
                                "Registered devices the memory planner found a plan that fits for.",
                                value=fitting)
        yield GaugeMetricFamily("fedprune_devices_exhausted",
                                "Devices no longer selected: their privacy budget is spent, or "
                                "this run's DP settings are weaker than their own.", value=exhausted)
        planned = GaugeMetricFamily(
            "fedprune_planned_devices", "Registered devices by the planner's decision: the "
            "width ratio of their submodel (fits: whether the plan fits the device's memory).",
            labels=["width", "fits"])
        for width, fits, count in s.execute(
                select(DeviceRow.width_ratio, DeviceRow.fits, func.count())
                .group_by(DeviceRow.width_ratio, DeviceRow.fits)
                .order_by(DeviceRow.width_ratio, DeviceRow.fits)):
            planned.add_metric([width_label(width), "true" if fits else "false"], count)
        yield planned

        epsilon = DeviceRow.epsilon
        # Summed within the protocol's bound: a row stored before it (or by hand) at 1e308 would
        # make the sum Infinity, and an error on PostgreSQL (the whole scrape a 500).
        bounded = case((epsilon > MAX_EPSILON, MAX_EPSILON), else_=epsilon)
        row = s.execute(select(*_histogram_query(bounded, EPSILON_BUCKETS))
                        .where(epsilon.is_not(None))).one()
        yield _histogram("fedprune_devices_epsilon_spent",
                         "Devices by the privacy budget (DP epsilon) they last reported spent "
                         "(a distribution of current values; devices without DP left out).",
                         EPSILON_BUCKETS, row, family=GaugeHistogramMetricFamily)
        highest = s.scalar(select(func.max(epsilon)))
        yield GaugeMetricFamily("fedprune_epsilon_spent_max",
                                "The largest privacy budget (DP epsilon) a device reported spent "
                                "(0: none reported).", value=highest or 0.0)
        if registered <= self.device_label_limit:
            per_device = GaugeMetricFamily(
                "fedprune_device_epsilon_spent", "Privacy budget (DP epsilon) each device last "
                "reported spent; exposed only while the fleet has at most "
                "metrics_device_label_limit devices.", labels=["device_id"])
            for device_id, spent in s.execute(select(DeviceRow.id, epsilon)
                                              .where(epsilon.is_not(None)).order_by(DeviceRow.id)):
                per_device.add_metric([device_id], spent)
            yield per_device

    # --- live counters of the running service ----------------------------------------------
    def _live(self) -> Iterator[Metric]:
        if self.snapshot is None:
            return
        try:
            status = self.snapshot()
        except Exception:  # a scrape must still show the database's metrics
            log.exception("metrics: the service's status could not be read")
            return
        broker = status.get("broker") or {}
        if broker:
            yield GaugeMetricFamily("fedprune_broker_connected", "1 while the MQTT connection to "
                                    "the broker is up, else 0.",
                                    value=1 if broker.get("state") == "connected" else 0)
            yield CounterMetricFamily("fedprune_broker_reconnects", "Connections to the broker "
                                      "after the first.", value=broker.get("reconnects", 0))
        inbox = status.get("inbox") or {}
        handling = status.get("handling") or {}
        messages = status.get("messages") or {}
        process = status.get("process") or {}
        if inbox:
            dropped = CounterMetricFamily(
                "fedprune_inbox_dropped", "Messages the MQTT link dropped on arrival: qos0 (the "
                "protocol never uses QoS 0).", labels=["reason"])
            dropped.add_metric(["qos0"], inbox.get("dropped_qos0", 0))
            yield dropped
            yield CounterMetricFamily(
                "fedprune_inbox_full_waits", "Deliveries that waited for room in the engine's full "
                "inbox (the link stopped reading from the broker meanwhile).",
                value=inbox.get("full_waits", 0))
            yield CounterMetricFamily(
                "fedprune_inbox_over_limit", "Deliveries queued past the inbox's limits because "
                "the engine made no room within half the keepalive.", value=inbox.get("over_limit", 0))
            yield GaugeMetricFamily("fedprune_inbox_queued", "Messages waiting for the engine.",
                                    value=inbox.get("queued", 0))
            yield GaugeMetricFamily("fedprune_inbox_bytes", "Payload bytes waiting for the engine.",
                                    value=inbox.get("bytes", 0))
            yield GaugeMetricFamily("fedprune_inbox_limit", "The inbox's limit (broker.inbox_limit).",
                                    value=inbox.get("limit", 0))
            yield GaugeMetricFamily("fedprune_inbox_max_bytes",
                                    "The inbox's byte limit (broker.inbox_max_bytes).",
                                    value=inbox.get("max_bytes", 0))
        if handling:
            yield CounterMetricFamily(
                "fedprune_handling_transient_failures", "Handlings of a message that failed for a "
                "reason that may pass (database down or locked, disk full) and were retried.",
                value=handling.get("transient_failures", 0))
            yield CounterMetricFamily(
                "fedprune_messages_dead_lettered", "Messages whose handling failed every retry, "
                "kept in state_dir/dead-letter/ and acknowledged.",
                value=handling.get("dead_lettered", 0))
        if messages:
            yield CounterMetricFamily(
                "fedprune_messages_refused", "Messages refused before handling (oversized, "
                "undecodable, unsigned or for another fleet).", value=messages.get("refused", 0))
            yield CounterMetricFamily(
                "fedprune_messages_failed", "Messages whose handling raised an unexpected error.",
                value=messages.get("failed", 0))
        if process.get("peak_rss_bytes") is not None:
            yield GaugeMetricFamily("fedprune_process_peak_rss_bytes",
                                    "The coordinator process's peak resident memory.",
                                    value=process["peak_rss_bytes"])


def build_registry(store: Store, config: Any = None,
                   snapshot: Callable[[], Mapping[str, Any]] | None = None) -> CollectorRegistry:
    """A registry holding the coordinator's metrics (a `StoreCollector` on `store`); serve it
    with `prometheus_client.generate_latest(registry)`. `config` is the ServiceSettings
    (`metrics_device_label_limit`, `rounds.total`); `snapshot` returns the service's status dict."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, config, snapshot))
    return registry
