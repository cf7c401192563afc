"""Issue 22, item 3: what a device says about itself is bounded.

- No device steers FedAvg: a device that registered 1,000,000 samples is planned at 74,277 next to
  two devices of 60; uncapped it had 99.8% of the round's weight. Its weight is capped at
  `aggregator.max_weight_ratio` (k = 3) times the round's lower median weight (coordinator/
  combine.py), in the one combiner the simulator and the service share; checked on the combiner
  and through the real round engine with real edge agents and a real UPDATE claiming 1,000,000.
- Self-reported numbers in REGISTER, UPDATE and REFUSAL headers are finite and bounded
  (edge_sdk/protocol/messages.py), so nothing the coordinator stores or sums from them overflows.
- The metrics collector cannot overflow: two devices at epsilon 1e308 in PostgreSQL (stored
  before the bounds, or by anything writing the store) and /metrics still answers 200 with
  finite numbers.
"""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.combine import RoundCombiner, weight_cap
from coordinator.robust import AggregatorSettings
from coordinator.rounds import RoundPipeline
from coordinator.service.config import ServiceSettings
from coordinator.service.http_api import ApiServer, build_app
from coordinator.service.store import Store
from coordinator.strategies import build_strategy
from edge_sdk import codec
from edge_sdk.models import build_model
from edge_sdk.protocol import EnvelopeError, MessageType, decode_envelope, encode_envelope, parse_header
from edge_sdk.protocol.messages import MAX_EPSILON, MAX_SAMPLES, MAX_TRAIN_SECONDS
from edge_sdk.sizing import DevicePlan
from harness.databases import own_database
from harness.fleet import Harness
from harness.messages import update_message
from harness.strategies import SPEC, simulation_config

CLAIMED, PLANNED, HONEST = 1_000_000, 74_277.0, 60.0  # the numbers (rpi4-4gb, fedavg, fedp3_cnn)
# Since the upper-bound memory calibration a claim of 1,000,000 samples no longer fits an rpi4-4gb
# at all (the planner counts the data it must hold); 200,000 still does, with a planned weight
# over a hundred times an honest device's.
SERVICE_CLAIM = 200_000
K = AggregatorSettings().max_weight_ratio


def _share_of_the_first(added: list[float], **combiner) -> float:
    """The first update's share of what FedAvg's combiner makes of updates 1.0, 0.0, 0.0, ...
    added with these weights (every entry of the result is that share)."""
    strategy = build_strategy(simulation_config("fedavg"), SPEC)
    state = {n: np.zeros(tuple(v.shape), np.float32) for n, v in build_model(SPEC).state_dict().items()}
    combined = RoundCombiner(strategy, state, **combiner)
    for i, weight in enumerate(added):
        combined.add({n: codec.SparseTensor.from_dense(np.full(v.shape, 1.0 if i == 0 else 0.0,
                                                               np.float32))
                      for n, v in state.items()}, weight)
    result = combined.result()
    shares = {float(v.min()) for v in result.values()} | {float(v.max()) for v in result.values()}
    assert max(shares) - min(shares) < 1e-6
    return shares.pop()


def test_the_cap_is_k_times_the_rounds_lower_median():
    assert K == 3
    assert weight_cap([PLANNED, HONEST, HONEST], K) == 180.0
    assert weight_cap([PLANNED, HONEST], K) == 180.0  # two updates: the smaller one's k times
    assert weight_cap([5.0], K) == 15.0 and weight_cap([], K) == math.inf
    assert weight_cap([PLANNED, HONEST], None) == math.inf


@pytest.mark.parametrize("declared", [False, True], ids=["held", "declared"])
def test_a_device_claiming_a_million_samples_gets_at_most_k_medians(declared):
    weights = [PLANNED, HONEST, HONEST]
    uncapped = _share_of_the_first(weights, aggregator=AggregatorSettings(max_weight_ratio=None))
    assert uncapped == pytest.approx(PLANNED / (PLANNED + 2 * HONEST))  # 0.998: it steers alone
    share = _share_of_the_first(weights, weights=weights if declared else None)
    assert share == pytest.approx(K * HONEST / (K * HONEST + 2 * HONEST))  # 180 / 300
    assert share <= K * HONEST / (K * HONEST + 2 * HONEST) + 1e-6
    # Honest rounds are untouched: weights within k medians average exactly as FedAvg does.
    assert _share_of_the_first([100.0, 60.0, 60.0]) == pytest.approx(100 / 220)


def test_declared_weights_must_be_the_ones_added():
    with pytest.raises(ValueError, match="declared update weights"):
        _share_of_the_first([PLANNED, HONEST], weights=[HONEST, HONEST])


def test_the_round_engine_caps_a_device_that_claims_a_million_samples(tmp_path, sqlite_url):
    """The service path: real agents train, dev-2 registered 200,000 samples and its UPDATE
    header claims them; the committed model gives it k x 60, not its planned weight."""
    h = Harness(tmp_path, sqlite_url, devices=3, samples=int(HONEST))
    h.register_all()
    registration = decode_envelope(h.agents["dev-2"]._registration()).header
    h.engine.handle(h.topics.register("dev-2"), encode_envelope(
        MessageType.REGISTER, {**registration, "num_samples": SERVICE_CLAIM}))
    h.engine.tick()
    weights = {d: t.aggregation_weight for d, t in h.store.tasks(1).items()}
    planned = weights.pop("dev-2")
    assert weights == {"dev-0": HONEST, "dev-1": HONEST} and planned > 100 * HONEST, planned
    h.deliver_to_devices("task")
    updates = {h.topics.device_of(t)[1]: (t, p) for t, p in h.take(h.to_coordinator, "update")}
    topic, message = updates["dev-2"]
    envelope = decode_envelope(message)
    updates["dev-2"] = (topic, update_message(envelope.header, envelope.payload, num_samples=SERVICE_CLAIM))
    for topic, message in updates.values():
        h.engine.handle(topic, message)
    assert all(a.accepted for d in h.agents for a in h.deliver_acks(d))
    before = {k: v.copy() for k, v in h.engine.global_state.items()}
    h.engine.tick()
    assert h.store.last_committed().number == 1

    # Each upload over the global model, through the round pipeline the engine uses (dev-2 is
    # planned narrower: its entries are a subset), then the coverage-aware weighted mean by hand.
    pipeline = RoundPipeline(h.engine.strategy, h.config, before, 1, h.engine.train)
    uploads = {}
    for device_id, (_, message) in updates.items():
        device = h.store.device(device_id)
        task = pipeline.task(device.index, device.num_samples, DevicePlan.model_validate(device.plan))
        uploads[device_id] = pipeline.intake(task, decode_envelope(message).payload)

    def mean(weight_of_dev2: float) -> dict[str, np.ndarray]:
        weights = {"dev-0": HONEST, "dev-1": HONEST, "dev-2": weight_of_dev2}
        result = {}
        for name, old in before.items():
            total, weight = np.zeros(old.size), np.zeros(old.size)
            for device_id, update in uploads.items():
                where = slice(None) if update[name].indices is None else update[name].indices
                total[where] += weights[device_id] * update[name].values.astype(np.float64)
                weight[where] += weights[device_id]
            result[name] = np.where(weight > 0, total / np.maximum(weight, 1e-300), old.reshape(-1))
        return result

    capped, uncapped = mean(K * HONEST), mean(planned)
    for name, new in h.engine.global_state.items():
        np.testing.assert_allclose(new.reshape(-1), capped[name], rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(capped[n], uncapped[n], atol=1e-4) for n in before)


# --- self-reported numbers ---------------------------------------------------------------------
def _parse(kind: MessageType, header: dict):
    return parse_header(decode_envelope(encode_envelope(kind, header)))


UPDATE = {"device_id": "dev-0", "round": 1, "task": "t1", "num_samples": 60, "payload_sha256": "0" * 64}
REGISTER = {"device_id": "dev-0", "profile": {}, "num_samples": 60}
REFUSAL = {"device_id": "dev-0", "round": 1, "task": "t1", "code": "internal", "message": "x"}


@pytest.mark.parametrize("kind, header, field, value", [
    (MessageType.UPDATE, UPDATE, "epsilon", 1e308),
    (MessageType.UPDATE, UPDATE, "num_samples", 2**31),
    (MessageType.UPDATE, UPDATE, "num_samples", 10**19),
    (MessageType.UPDATE, UPDATE, "train_seconds", 1e308),
    (MessageType.UPDATE, UPDATE, "local_accuracy", 1.5),
    (MessageType.REGISTER, REGISTER, "epsilon_spent", 1e308),
    (MessageType.REGISTER, REGISTER, "epsilon_budget", 1e308),
    (MessageType.REGISTER, REGISTER, "num_samples", 2**31),
    (MessageType.REFUSAL, REFUSAL, "epsilon", 1e308),
], ids=lambda v: v if isinstance(v, str) else None)
def test_self_reported_numbers_are_bounded(kind, header, field, value):
    assert _parse(kind, header)  # the header without the field is fine
    with pytest.raises(EnvelopeError, match=field):
        _parse(kind, {**header, field: value})


def test_the_largest_allowed_numbers_are_taken():
    header = _parse(MessageType.UPDATE, {**UPDATE, "epsilon": MAX_EPSILON, "num_samples": MAX_SAMPLES,
                                         "train_seconds": MAX_TRAIN_SECONDS})
    assert (header.epsilon, header.num_samples) == (MAX_EPSILON, MAX_SAMPLES)


# --- the metrics collector ---------------------------------------------------------------------
def test_metrics_do_not_overflow_on_postgresql_with_two_devices_at_epsilon_1e308():
    """Served by the real HTTP API on a real socket, over PostgreSQL, where the sum of two
    epsilons of 1e308 was "value out of range: overflow" and /metrics a 500."""
    with own_database("metrics") as url:
        store = Store(url)
        server = None
        try:
            for device in ("dev-0", "dev-1"):  # as stored before the header bounds (or by hand)
                store.upsert_device(device, profile={}, num_samples=60, formats=[], plan={},
                                    width_ratio=1.0, fits=True, epsilon=1e308)
            config = ServiceSettings(database=url, http_port=0)
            server = ApiServer(build_app(store, config, lambda: {}), "127.0.0.1", 0).start()
            reply = httpx.get(f"{server.url}/metrics", timeout=10)
        finally:
            if server is not None:
                server.stop()
            store.close()
    assert reply.status_code == 200, reply.text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(reply.text) for s in family.samples}
    assert all(math.isfinite(v) for v in samples.values()), \
        [k for k, v in samples.items() if not math.isfinite(v)]
    assert samples[("fedprune_devices_epsilon_spent_gcount", ())] == 2
    assert samples[("fedprune_devices_epsilon_spent_gsum", ())] == 2 * MAX_EPSILON
    assert samples[("fedprune_epsilon_spent_max", ())] == 1e308  # a maximum is not a sum
