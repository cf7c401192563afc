"""Where a coordinator cluster aggregates: streamed from PostgreSQL at commit, or partial sums.

    python benchmarks/cluster_aggregation.py [--updates 200] [--intake 2] [--json-out FILE]

One round of `--updates` lightweight updates of the mlp model (fedavg: every tensor uploaded,
fp32, the update a device would send after training, with a little noise; no training), stored
in a PostgreSQL database of the benchmark's own through the store's real `accept_update`.
Then the two ways to aggregate, each timed and its Python/numpy memory peak taken with
tracemalloc (numpy reports its buffers there):

- stream at commit (what the engine does): the leader reads the stored updates one at a time,
  decodes each against its task (`RoundPipeline.intake`) and adds it to the round's combiner.
- partial sums: each of `--intake` processes keeps the running sums of the updates it accepted
  (StreamingAggregator's sums, weights and counts: mergeable for the weighted mean only), and
  for crash safety writes them in the same transaction as each update it stores (a partial held
  in memory alone dies with its process, and its updates with it); at commit the leader merges
  the `--intake` partials. Timed: the extra intake work per update, and the commit's merge.

Both give the same model (checked). The numbers are in docs/ARCHITECTURE.md ("Several
coordinators"). PostgreSQL: FEDPRUNE_TEST_POSTGRES's server, default 127.0.0.1:5432 trust auth.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
import tracemalloc
import uuid
from collections.abc import Callable

import numpy as np
import sqlalchemy
from sqlalchemy import LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from coordinator.combine import RoundCombiner
from coordinator.rounds import RoundPipeline
from coordinator.service.config import ServiceSettings
from coordinator.service.store import Base, Store, TaskRow
from coordinator.strategies import build_strategy
from edge_sdk import codec
from edge_sdk.data import load_dataset
from edge_sdk.models import build_model, model_spec

SERVER = os.environ.get("FEDPRUNE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


class PartialRow(Base):
    """One intake process's running sums (the benchmark's table; the service has none)."""
    __tablename__ = "bench_partial_sums"
    node: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


def _measure(action: Callable[[], object]) -> tuple[object, float, int]:
    """(result, seconds, tracemalloc peak bytes above what was allocated before)."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    result = action()
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return result, seconds, peak


def _pack(aggregator) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{f"{kind}:{name}": array for kind, arrays in
                        (("s", aggregator._sums), ("w", aggregator._weights), ("c", aggregator._counts))
                        for name, array in arrays.items()}, updates=np.array(aggregator.updates))
    return buffer.getvalue()


def _merge_into(aggregator, data: bytes) -> None:
    with np.load(io.BytesIO(data)) as saved:
        for key in saved.files:
            if key == "updates":
                aggregator.updates += int(saved[key])
                continue
            kind, name = key.split(":", 1)
            target = {"s": aggregator._sums, "w": aggregator._weights, "c": aggregator._counts}[kind]
            if name in target:
                target[name] += saved[key]
            else:
                target[name] = saved[key].copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--intake", type=int, default=2, help="intake processes (partial sums)")
    parser.add_argument("--json-out")
    args = parser.parse_args()

    config = ServiceSettings(strategy="fedavg", model="mlp", evaluate=False,
                             export={"enabled": False})
    info = load_dataset(config.dataset, config.data_dir).info
    strategy = build_strategy(config, model_spec(config.model, info.input_shape, info.num_classes))
    global_state = {k: v.detach().numpy().copy()
                    for k, v in build_model(strategy.spec, seed=0).state_dict().items()}
    pipeline = RoundPipeline(strategy, config, global_state, 1, config.train)
    task = pipeline.task(0, 100)
    rng = np.random.default_rng(0)

    def payload() -> bytes:
        return codec.encode({name: codec.SparseTensor(
            global_state[name].shape, None,
            (global_state[name] + rng.normal(0, 0.01, global_state[name].shape)).astype(np.float32).reshape(-1))
            for name in task.plan.uploaded})

    server = sqlalchemy.make_url(SERVER)
    name = f"fedprune_aggbench_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    store = Store(server.set(database=name).render_as_string(hide_password=False))
    try:
        devices = [f"dev-{i:04d}" for i in range(args.updates)]
        for device in devices:
            store.upsert_device(device, profile={}, num_samples=100, formats=[], plan={},
                                width_ratio=1.0, fits=True)
        store.open_round(1, time.time() + 3600, devices, 1, [
            TaskRow(round=1, device=d, task=f"t{i}", width_ratio=1.0, aggregation_weight=1.0 + i % 3,
                    bytes_down=0, sent_at=time.time()) for i, d in enumerate(devices)])
        weights = {d: 1.0 + i % 3 for i, d in enumerate(devices)}

        # Intake, as every coordinator does it: decode and check, then store. Partial sums add
        # to the process's running sums and write them with the update (timed apart).
        # Each intake process knows the round's weights (its tasks'), so it folds as it goes.
        partials = [RoundCombiner(strategy, global_state, config.aggregator, config.seed,
                                  weights=list(weights.values())) for _ in range(args.intake)]
        intake_seconds, partial_seconds, update_bytes = 0.0, 0.0, 0
        for i, device in enumerate(devices):
            data = payload()
            update_bytes += len(data)
            started = time.perf_counter()
            decoded = pipeline.intake(task, data)
            store.accept_update(1, device, f"t{i}", data, weights[device], 100, None)
            intake_seconds += time.perf_counter() - started
            started = time.perf_counter()
            partial = partials[i % args.intake]
            partial.add(decoded, weights[device])
            with store.session.begin() as s:
                s.merge(PartialRow(node=f"intake-{i % args.intake}", data=_pack(partial.aggregator)))
            partial_seconds += time.perf_counter() - started
        partial_bytes = len(_pack(partials[0].aggregator))
        del partials

        def stream() -> dict[str, np.ndarray]:
            combiner = RoundCombiner(strategy, global_state, config.aggregator, config.seed,
                                     weights=store.update_weights(1))
            for update in store.updates(1):
                combiner.add(pipeline.intake(task, update.payload), update.weight)
            return combiner.result()

        def merge() -> dict[str, np.ndarray]:
            combiner = RoundCombiner(strategy, global_state, config.aggregator, config.seed)
            with store.session() as s:
                nodes = list(s.scalars(sqlalchemy.select(PartialRow.node)))
            for node in nodes:
                with store.session() as s:
                    _merge_into(combiner.aggregator, s.get(PartialRow, node).data)
            return combiner.result()

        streamed, stream_seconds, stream_peak = _measure(stream)
        merged, merge_seconds, merge_peak = _measure(merge)
        same = all(np.allclose(streamed[k], merged[k], atol=1e-6) for k in streamed)
        parameters = sum(v.size for v in global_state.values())
        result = {
            "updates": args.updates, "intake_processes": args.intake, "model": "mlp",
            "parameters": int(parameters), "update_bytes_mean": update_bytes // args.updates,
            "intake_seconds_per_update": intake_seconds / args.updates,
            "stream_at_commit": {"seconds": stream_seconds, "peak_bytes": stream_peak},
            "partial_sums": {"commit_seconds": merge_seconds, "commit_peak_bytes": merge_peak,
                             "extra_intake_seconds_per_update": partial_seconds / args.updates,
                             "extra_bytes_written_per_update": partial_bytes},
            "same_model": bool(same), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "load_average": os.getloadavg()[0],
        }
    finally:
        store.close()
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    print(json.dumps(result, indent=1))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
