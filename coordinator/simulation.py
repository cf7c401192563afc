"""In-process simulation: N devices running the real device code against one coordinator loop.

Nothing here is simulated except the network: every download and upload is encoded and decoded
with the wire codec, so the byte counts reported are the bytes a broker would carry.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from edge_sdk import codec
from edge_sdk.checkpoint import Checkpoint
from edge_sdk.client import LocalClient
from edge_sdk.data import ClientData, load_dataset, make_client_data, to_tensor
from edge_sdk.models import build_model, model_spec
from edge_sdk.models.cost import footprint, inference_macs
from edge_sdk.slicing import width_spec
from edge_sdk.training import DPConfig, TrainConfig, accuracy

from .combine import RoundCombiner
from .config import SimulationConfig
from .exporting import export_clients
from .planning.fleet import SubmodelViews, plan_fleet
from .planning.planner import PlannerSettings
from .byzantine import ByzantineSettings, attack
from .robust import RobustSettings
from .strategies import Strategy, build_strategy


@dataclass
class RoundResult:
    round: int
    personalized_accuracy: float
    global_accuracy: float
    bytes_up: int
    bytes_down: int
    seconds: float
    participants: int
    refused: int
    client_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SimulationResult:
    config: dict[str, Any]
    rounds: list[RoundResult] = field(default_factory=list)
    privacy: list[dict[str, Any]] | None = None
    clients: list[dict[str, Any]] | None = None
    exports: list[dict[str, Any]] | None = None
    cost: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        last = self.rounds[-1]
        return {
            "config": self.config,
            "rounds": [r.to_dict() for r in self.rounds],
            "final": {
                "personalized_accuracy": last.personalized_accuracy,
                "global_accuracy": last.global_accuracy,
                "bytes_up_total": sum(r.bytes_up for r in self.rounds),
                "bytes_down_total": sum(r.bytes_down for r in self.rounds),
                "client_seconds_total": sum(r.client_seconds for r in self.rounds),
                **self.cost,
            },
            **({"privacy": self.privacy} if self.privacy is not None else {}),
            **({"clients": self.clients} if self.clients is not None else {}),
            **({"exports": self.exports} if self.exports is not None else {}),
        }


def make_strategy(config: SimulationConfig, spec) -> Strategy:
    return build_strategy(config, spec)


def dp_config(config: SimulationConfig) -> DPConfig | None:
    if not config.dp.enabled:
        return None
    return DPConfig(**config.dp.model_dump())


def run_simulation(config: SimulationConfig, progress: bool = True) -> SimulationResult:
    torch.manual_seed(config.seed)
    source = load_dataset(config.dataset, config.data_dir)
    strategy = make_strategy(config, model_spec(config.model, source.info.input_shape,
                                                source.info.num_classes))
    spec = strategy.spec  # a strategy may change the architecture (FedDP's gates)
    train = TrainConfig(**config.train.model_dump())
    dp = dp_config(config)
    shards = [_capped(data, config.max_client_samples)
              for data in make_client_data(source, config.clients, config.partition, config.seed)]
    fleet = _plan_fleet(config, spec, shards) if config.fleet else None
    clients = [LocalClient(_fleet_shard(data, fleet), _fleet_train(train, data.client_id, fleet), dp,
                           planned_rounds=config.rounds, seed=config.seed) for data in shards]
    widths = _widths(config, fleet)
    if any(w < 1 for w in widths) and (any(layer.gate < 1 for layer in spec.layers)
                                       or strategy.download_masks is not None):
        raise ValueError(f"{config.strategy} runs at full width only (FedDP gates and HideNseek "
                         "masks are not width-sliced); drop --fleet / width_levels")
    eligible = [a.plan.fits for a in fleet] if fleet else [True] * config.clients
    test_x, test_y = to_tensor(source.test_x, source.info), torch.tensor(source.test_y)

    global_model = build_model(spec, seed=config.seed)
    global_state = strategy.initial_state() or {k: v.detach().numpy().copy()
                                                 for k, v in global_model.state_dict().items()}
    rng = np.random.default_rng(config.seed)
    per_round = max(1, round(config.fraction * config.clients))
    byzantine = ByzantineSettings(**config.byzantine.model_dump(), seed=config.seed)
    malicious = byzantine.malicious(config.clients) if byzantine.fraction else set()
    robust = RobustSettings(**config.aggregator.model_dump(), seed=config.seed)
    staleness = config.ffgg.max_staleness if config.strategy == "ffgg" else 0
    history = [global_state]  # the last `staleness` + 1 global states, newest last
    slicing = strategy.slicing or config.slicing
    result = SimulationResult(config=config.model_dump(),
                              clients=[a.to_dict() for a in fleet] if fleet else None)
    bar = tqdm(total=config.rounds * per_round, disable=not progress, unit="task",
               desc=f"{config.strategy} {config.partition}")
    for round_number in range(1, config.rounds + 1):
        started = time.perf_counter()
        chosen = sorted(rng.choice(config.clients, per_round, replace=False).tolist())
        dtype = codec.ValueDtype.from_name(strategy.download_dtype or config.codec.download_dtype)
        views_by_age = {age: SubmodelViews(spec, history[-1 - age], dtype, slicing, round_number - age,
                                           strategy.download_masks)
                        for age in range(len(history))}
        combiner = RoundCombiner(strategy, global_state, robust)
        bytes_up = bytes_down = refused = 0
        client_seconds = 0.0
        for client_id in chosen:
            bar.update(1)
            if not eligible[client_id]:  # the planner found no submodel this device can hold
                refused += 1
                continue
            client = clients[client_id]
            age = int(rng.integers(0, len(history))) if staleness else 0  # async: a stale start
            base = history[-1 - age]
            view = views_by_age[age].view(widths[client_id])
            plan = view.adapt(strategy.plan(client_id, round_number, client.num_train))
            payload = view.downloads.payload(plan, device_has_private_copy=client.spec is not None)
            bytes_down += len(payload)
            started_task = time.perf_counter()
            outcome = client.run_task(plan, payload)
            client_seconds += time.perf_counter() - started_task
            if outcome.refused:
                refused += 1
                continue
            bytes_up += len(outcome.payload)
            update = view.to_global(codec.decode(outcome.payload,
                                                 {n: view.shapes[n] for n in plan.uploaded},
                                                 known_indices=strategy.upload_known_indices))
            if client_id in malicious:
                update = attack(update, base, byzantine, rng)
            combiner.add(update, plan.aggregation_weight, base)
        global_state = combiner.result()
        history = (history + [global_state])[-(staleness + 1):]
        global_model.load_state_dict({k: torch.from_numpy(v)
                                      for k, v in strategy.materialize(global_state).items()})
        personal = [c.evaluate(c.personal_model() or global_model) for c in clients]
        result.rounds.append(RoundResult(
            round=round_number,
            personalized_accuracy=float(np.nanmean(personal)),
            global_accuracy=accuracy(global_model, test_x, test_y),
            bytes_up=bytes_up, bytes_down=bytes_down,
            seconds=time.perf_counter() - started, client_seconds=client_seconds,
            participants=len(chosen) - refused, refused=refused))
        bar.set_postfix(personal=f"{result.rounds[-1].personalized_accuracy:.3f}",
                        glob=f"{result.rounds[-1].global_accuracy:.3f}")
    bar.close()
    result.cost = _inference_cost(spec, widths)
    if dp is not None:
        result.privacy = [privacy_entry(c) for c in clients]
    if config.export_dir:
        final = Checkpoint(spec, {k: torch.from_numpy(v) for k, v in global_state.items()},
                           config.model, source.info.name, None, config.rounds)
        result.exports = export_clients(config.export_dir, clients, widths, final, source.info,
                                        slicing=config.slicing, formats=config.export_formats,
                                        precisions=config.export_precisions, progress=progress)
    return result


def _widths(config: SimulationConfig, fleet) -> list[float]:
    if fleet:
        return [a.plan.width_ratio for a in fleet]
    if config.width_levels:
        return [config.width_levels[i % len(config.width_levels)] for i in range(config.clients)]
    return [1.0] * config.clients


def _inference_cost(spec, widths: list[float]) -> dict[str, Any]:
    """FLOPs per sample of the models devices run (2 x MACs; gated channels skipped)."""
    per_width = {w: 2 * inference_macs(spec if w >= 1 else width_spec(spec, w)) for w in set(widths)}
    return {"flops_per_sample_full": 2 * footprint(spec).macs,
            "flops_per_sample_mean": float(np.mean([per_width[w] for w in widths])),
            "flops_per_sample_by_width": {f"{w:g}": f for w, f in sorted(per_width.items())}}


def _plan_fleet(config: SimulationConfig, spec, shards: list[ClientData]):
    settings = PlannerSettings(deadline_seconds=config.deadline_seconds,
                               batch_size=config.train.batch_size, dp=config.dp.enabled,
                               momentum=config.train.momentum, slicing=config.slicing)
    return plan_fleet(config.fleet, spec, config.model, [len(d.train_y) for d in shards], settings)


def _fleet_shard(data: ClientData, fleet) -> ClientData:
    """A device trains on as many samples per round as its plan's compute budget allows."""
    if fleet is None:
        return data
    n = max(1, fleet[data.client_id].plan.local_samples)
    return ClientData(data.client_id, data.train_x[:n], data.train_y[:n], data.test_x, data.test_y)


def _fleet_train(train: TrainConfig, client_id: int, fleet) -> TrainConfig:
    if fleet is None:
        return train
    return dataclasses.replace(train, physical_batch_size=fleet[client_id].plan.physical_batch_size)


def _capped(data: ClientData, limit: int | None) -> ClientData:
    """Keep at most `limit` samples per client, in the same 70/30 proportion (quick runs, tests)."""
    if limit is None or len(data.train_y) + len(data.test_y) <= limit:
        return data
    n_train = max(1, round(limit * len(data.train_y) / (len(data.train_y) + len(data.test_y))))
    n_test = max(1, limit - n_train)
    return ClientData(data.client_id, data.train_x[:n_train], data.train_y[:n_train],
                      data.test_x[:n_test], data.test_y[:n_test])


def privacy_entry(client: LocalClient) -> dict[str, Any]:
    ledger = client.ledger
    sigma, rate = (ledger.history[0][0], ledger.history[0][1]) if ledger.history else (None, None)
    return {"client": client.client_id, "epsilon": ledger.epsilon(), "delta": ledger.delta,
            "noise_multiplier": sigma, "sample_rate": rate, "steps": ledger.steps,
            "accountant": ledger.accountant}
