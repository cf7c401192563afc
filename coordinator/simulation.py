"""Simulation: N devices running the real device code against one coordinator loop.

Nothing here is simulated except the network: every download and upload is encoded and decoded
with the wire codec, so the byte counts reported are the bytes a broker would carry. The loop
below is the driver whatever the backend: it plans, builds downloads, takes updates in and
aggregates; a backend (coordinator/backends/) only holds the devices and runs their tasks, in
this process or in Ray's workers, with the same results for the same seed.

Under central DP ([central_dp], coordinator/central_dp.py) a round's devices are drawn by
Poisson sampling, each at q = devices per round / clients (the draw its accounting assumes), and
the draw and the noise come from an OS-seeded generator: such a run is not repeated by its seed.

Under secure aggregation ([secure_aggregation], coordinator/secure_round.py) the devices keep
their uploads; once a round's devices have trained, this driver relays the SecAgg+ stages'
message bytes between the device objects and the server object, and the round's model moves by
the mean change the unmasked sum gives.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from device_profiles import DeviceProfile, parse_fleet_arg, sample_fleet
from device_profiles.tiers import tier_index
from edge_sdk.checkpoint import Checkpoint
from edge_sdk.client import TaskOutcome
from edge_sdk.data import ClientData
from edge_sdk.data.partition import needs_groups
from edge_sdk.data.partitioners import NEEDS_FLEET
from edge_sdk.data.sources import federated_data
from edge_sdk.models import build_model, model_spec
from edge_sdk.models.cost import footprint, inference_macs
from edge_sdk.slicing import width_spec
from edge_sdk.training import accuracy, chance_accuracy

from .backends import open_backend
from .backends.base import (  # noqa: F401  (privacy_entry: its home before the backends)
    DeviceResources,
    FleetSetup,
    SimulationBackend,
    TaskRun,
    privacy_entry,
)
from .byzantine import attack
from .central_dp import CentralDP, check_uploads
from .combine import RoundCombiner
from .config import SimulationSettings
from .device_scores import device_scores
from .exporting import check_variants, export_clients
from .planning.clock import task_time, time_to_accuracy
from .planning.fleet import DeviceAssignment, plan_fleet
from .rounds import RoundPipeline, Task, device_settings, dp_config, planner_settings
from .secure_round import SecureAggregation, ServerObserver, device_id
from .secure_round import check_uploads as check_secure_uploads
from .strategies import Strategy, build_strategy


@dataclass
class RoundResult:
    round: int
    # Accuracies, each on a stated model and data (docs/ARCHITECTURE.md, "Accuracy"):
    # None in a round the devices were not scored in (`eval_every`)
    personalized_accuracy: float | None  # each device's own model on its own test split, mean
    global_device_accuracy: float | None  # the global model on each device's test split, mean
    global_accuracy: float         # the global model on the dataset's official test set
    chance_accuracy: float         # the partition's chance: each device's majority class, mean
    bytes_up: int
    bytes_down: int
    seconds: float
    participants: int
    refused: int
    client_seconds: float = 0.0
    # The simulated clock (a planned fleet only): the round's simulated duration, and devices
    # whose task could not finish by the deadline (not aggregated) or whose model did not fit
    # in memory (full-all only: its training dies).
    simulated_seconds: float | None = None
    straggled: int = 0
    out_of_memory: int = 0
    left_out: int = 0
    devices: list[dict[str, Any]] = field(default_factory=list)
    # Under central DP: the coordinator's spending once this round's model is released
    # ({epsilon, delta, noise_multiplier, clip_norm, rounds, sample_rate}).
    central_dp: dict[str, Any] | None = None
    # Under secure aggregation: the round's devices, dropouts, withheld coordinates, epsilon,
    # bits, and each stage's bytes and seconds (coordinator/secure_round.py).
    secure_aggregation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()
                if k not in ("central_dp", "secure_aggregation") or v is not None}


@dataclass
class SimulationResult:
    config: dict[str, Any]
    rounds: list[RoundResult] = field(default_factory=list)
    privacy: list[dict[str, Any]] | None = None
    clients: list[dict[str, Any]] | None = None
    exports: list[dict[str, Any]] | None = None
    cost: dict[str, Any] = field(default_factory=dict)
    backend: dict[str, Any] | None = None  # a remote backend's placement and timing
    scores: dict[str, Any] = field(default_factory=dict)  # a fleet's device_scores
    # The final global model's materialised tensors, for a caller to keep (not in the JSON).
    weights: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        last = self.rounds[-1]
        final = {
            "personalized_accuracy": last.personalized_accuracy,
            "global_device_accuracy": last.global_device_accuracy,
            "global_accuracy": last.global_accuracy,
            "chance_accuracy": last.chance_accuracy,
            "bytes_up_total": sum(r.bytes_up for r in self.rounds),
            "bytes_down_total": sum(r.bytes_down for r in self.rounds),
            "client_seconds_total": sum(r.client_seconds for r in self.rounds),
            "updates_aggregated": sum(r.participants for r in self.rounds),
            "updates_lost": sum(r.straggled + r.out_of_memory for r in self.rounds),
            **self.cost,
            **self.scores,
        }
        if last.simulated_seconds is not None:
            seconds = [r.simulated_seconds for r in self.rounds]
            targets = tuple(self.config.get("target_accuracies") or ())
            final["simulated_seconds_total"] = sum(seconds)
            final["simulated_seconds_to_personalized_accuracy"] = time_to_accuracy(
                seconds, [r.personalized_accuracy for r in self.rounds], targets)
            final["simulated_seconds_to_global_accuracy"] = time_to_accuracy(
                seconds, [r.global_accuracy for r in self.rounds], targets)
        return {
            "config": self.config,
            "rounds": [r.to_dict() for r in self.rounds],
            "final": final,
            **({"privacy": self.privacy} if self.privacy is not None else {}),
            **({"clients": self.clients} if self.clients is not None else {}),
            **({"exports": self.exports} if self.exports is not None else {}),
            **({"backend": self.backend} if self.backend is not None else {}),
        }


# Called with (client id, task, download bytes, outcome or None) for every task a device is
# sent: tests check what devices received against what was planned.
TaskObserver = Callable[[int, Task, bytes, "TaskOutcome | None"], None]


def run_simulation(config: SimulationSettings, progress: bool = True,
                   profiles: list[DeviceProfile] | None = None,
                   observe: TaskObserver | None = None,
                   observe_server: ServerObserver | None = None) -> SimulationResult:
    """`profiles`: the fleet's devices, one per client, instead of sampling `config.fleet`.
    `observe_server`: sees every secure-aggregation message the coordinator sends or receives,
    and each round's unmasked result."""
    torch.manual_seed(config.seed)
    if profiles is None and config.fleet:  # the fleet comes first: a tier partition follows it
        profiles = sample_fleet(config.clients, parse_fleet_arg(config.fleet))
    tiers = _tiers(config, profiles) if needs_groups(config.partition) else None
    source = federated_data(config.data_settings, config.clients, config.partition, config.seed,
                            tiers)
    strategy = build_strategy(config, model_spec(config.model, source.info.input_shape,
                                                source.info.num_classes))
    spec = strategy.spec  # a strategy may change the architecture (FedDP's gates)
    if config.export_dir:  # refused now, not after the rounds
        check_variants(spec, config.export_formats, config.export_precisions)
    dp = dp_config(config)
    central = None
    if config.central_dp.enabled:
        check_uploads(strategy)
        central = CentralDP(config.central_dp, config.central_dp_sample_rate, config.rounds)
    if config.secure_aggregation.enabled:
        check_secure_uploads(strategy)
    shards = [data.capped(config.max_client_samples) for data in source.shards]
    fleet = _plan_fleet(config, strategy, shards, profiles) if profiles is not None else None
    test_x, test_y = source.test_x, source.test_y
    chance = float(np.mean([chance_accuracy(data.test_y) for data in shards]))

    global_model = build_model(spec, seed=config.seed)
    global_state = strategy.initial_state() or {k: v.detach().numpy().copy()
                                                 for k, v in global_model.state_dict().items()}
    rng = np.random.default_rng(config.seed)
    per_round = max(1, round(config.fraction * config.clients))
    secure = SecureAggregation(config.secure_aggregation, global_state, per_round, config.rounds,
                               config.seed) if config.secure_aggregation.enabled else None
    byzantine = config.byzantine
    malicious = byzantine.malicious(config.clients, config.seed) if byzantine.fraction else set()
    staleness = config.ffgg.max_staleness if config.strategy == "ffgg" else 0
    history = [global_state]  # the last `staleness` + 1 global states, newest last
    sizing = {a.device_index: a.plan for a in fleet} if fleet else {}
    result = SimulationResult(config=config.model_dump(),
                              clients=[a.to_dict() for a in fleet] if fleet else None)
    backend = open_backend(config.backend, _fleet_setup(config, fleet, tiers), shards)
    try:
        pipeline, global_state = _run_rounds(config, backend, strategy, shards, fleet, sizing,
                                             global_model, history, staleness, per_round,
                                             malicious, rng, chance, (test_x, test_y), result,
                                             observe, progress, central, secure, observe_server)
        widths = [pipeline.width_for(i, sizing.get(i)) for i in range(config.clients)]
        result.weights = strategy.materialize(global_state)
        if fleet:  # each device's accuracy with the model it runs, per tier
            result.scores = device_scores(backend.clients(), fleet, widths, strategy,
                                          result.weights, pipeline.slicing, result.rounds)
        result.cost = _inference_cost(spec, widths)
        if dp is not None:
            result.privacy = backend.privacy()
        if config.export_dir:
            final = Checkpoint(spec, {k: torch.from_numpy(v) for k, v in global_state.items()},
                               config.model, source.info.name, None, config.rounds)
            result.exports = export_clients(config.export_dir, backend.clients(), widths, final,
                                            source.info, slicing=pipeline.slicing,
                                            formats=config.export_formats,
                                            precisions=config.export_precisions,
                                            progress=progress)
        result.backend = backend.report()
    finally:
        backend.close()
    return result


def _tiers(config: SimulationSettings, profiles: list[DeviceProfile] | None) -> list[int]:
    """Each client's tier for a tier partition: of the devices that are then planned, so the
    data follows exactly the devices that run."""
    if profiles is None:
        raise ValueError(f"partition {config.partition!r} {NEEDS_FLEET}: set fleet "
                         f"(e.g. fleet = \"catalogue\")")
    if len(profiles) != config.clients:
        raise ValueError(f"{len(profiles)} profiles for {config.clients} clients")
    return [tier_index(p) for p in profiles]


def _fleet_setup(config: SimulationSettings, fleet: list[DeviceAssignment] | None,
                 tiers: list[int] | None) -> FleetSetup:
    """The devices as a backend builds them: named data, training settings and resources."""
    resources = tuple(DeviceResources(a.profile.cpu_cores, a.plan.predicted_peak_bytes)
                      for a in fleet) if fleet else (DeviceResources(),) * config.clients
    return FleetSetup(config.data_settings, config.clients, config.partition,
                      config.seed, config.max_client_samples, config.train, dp_config(config),
                      config.rounds, config.device_threads, resources, config.ray_address,
                      selection_rate=max(1, round(config.fraction * config.clients)) / config.clients,
                      model=config.model, groups=None if tiers is None else tuple(tiers),
                      device_state=config.device_state)


def _run_rounds(config: SimulationSettings, backend: SimulationBackend, strategy: Strategy,
                shards: list[ClientData], fleet: list[DeviceAssignment] | None,
                sizing: dict, global_model: torch.nn.Module, history: list, staleness: int,
                per_round: int, malicious: set[int], rng: np.random.Generator, chance: float,
                test: tuple[torch.Tensor, torch.Tensor], result: SimulationResult,
                observe: TaskObserver | None, progress: bool,
                central: CentralDP | None = None, secure: SecureAggregation | None = None,
                observe_server: ServerObserver | None = None) -> tuple[RoundPipeline, dict]:
    """Every round: the round's tasks are all sent before any answer is taken in (a backend may
    run them at once), then the answers are taken in device by device in the order the devices
    were chosen, so aggregation is the same whatever ran when. Returns the last round's pipeline
    and the final global state."""
    train, dp, byzantine = config.train, dp_config(config), config.byzantine
    global_state = history[-1]
    bar = tqdm(total=config.rounds * per_round, disable=None if progress else True, unit="task",
               desc=f"{config.strategy} {config.partition}")
    pipeline = None
    for round_number in range(1, config.rounds + 1):
        started = time.perf_counter()
        chosen = sorted(rng.choice(config.clients, per_round, replace=False).tolist()) \
            if central is None else central.draw(config.clients)
        pipelines = {age: RoundPipeline(strategy, config, history[-1 - age], round_number, train,
                                        slicing_round=round_number - age)
                     for age in range(len(history))}
        pipeline = pipelines[0]
        combiner = RoundCombiner(strategy, global_state, config.aggregator, config.seed,
                                 central=None if central is None else central.round(
                                     _population(pipeline, shards, fleet, sizing), pipeline))
        row = RoundResult(round_number, 0.0, 0.0, 0.0, chance, 0, 0, 0.0, 0, 0,
                          simulated_seconds=0.0 if fleet else None)
        secure_round = None if secure is None else secure.round(global_state)
        sent = []
        for device_index in chosen:
            assignment = fleet[device_index] if fleet else None
            if assignment is not None and not assignment.selected:  # no submodel it can hold
                bar.update(1)
                row.left_out += 1
                continue
            num_train = len(shards[device_index].train_y)
            age = int(rng.integers(0, len(history))) if staleness else 0  # async: a stale start
            task = pipelines[age].task(device_index, num_train, sizing.get(device_index))
            payload = pipelines[age].download(task,
                                              device_has_private_copy=backend.has_model(device_index))
            row.bytes_down += len(payload)
            entry = {"client": device_index, **task.sizing(), "download_bytes": len(payload)}
            runs, before_upload = True, None
            if assignment is not None:
                entry["predicted_peak_bytes"] = assignment.plan.predicted_peak_bytes
                before_upload = _starts_on_the_clock(assignment, num_train, task, payload, dp,
                                                     config, entry, row)
                runs = before_upload is not None
            pending = backend.submit(device_index, task, payload) if runs else None
            sent.append((device_index, age, task, payload, entry, assignment, before_upload,
                         pending))
        for device_index, age, task, payload, entry, assignment, before_upload, pending in sent:
            bar.update(1)
            outcome = None
            if pending is not None:
                run = backend.result(pending)
                if secure_round is not None and not run.outcome.refused:  # it keeps its upload
                    secure_round.join(device_index, backend.clients()[device_index], task,
                                      pipelines[age], run.outcome)
                outcome = _taken(run, entry, row)
                if assignment is not None:
                    _finish_on_the_clock(assignment, task, payload, outcome, before_upload, dp,
                                         config, entry, row)
            if observe is not None:
                observe(device_index, task, payload, outcome)
            if dp is not None:  # what the device has spent so far (`fedprune report` plots it)
                entry["epsilon"] = outcome.epsilon if outcome is not None and \
                    outcome.epsilon is not None else backend.epsilon(device_index)
            row.devices.append(entry)
            if outcome is None or entry["outcome"] != "accepted":
                continue
            if secure_round is not None:
                row.participants += 1
                continue
            base = history[-1 - age]
            update = pipelines[age].intake(task, outcome.payload)
            if device_index in malicious:
                update = attack(update, base, byzantine, rng)
            combiner.add(update, task.plan.aggregation_weight, base)
            row.participants += 1
        if secure_round is not None:
            combiner = _secure_combiner(secure_round, strategy, global_state, config,
                                        observe_server, row)
        global_state = combiner.result() if combiner is not None else global_state
        if central is not None:
            row.central_dp = central.spend()
        history = (history + [global_state])[-(staleness + 1):]
        weights = strategy.materialize(global_state)
        global_model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        if round_number % config.eval_every == 0 or round_number == config.rounds:
            scores = backend.evaluate(strategy.spec, weights, global_model)
            row.personalized_accuracy = float(np.nanmean([own for own, _ in scores]))
            row.global_device_accuracy = float(np.nanmean([glob for _, glob in scores]))
        else:
            row.personalized_accuracy = row.global_device_accuracy = None
        row.global_accuracy = accuracy(global_model, *test)
        row.seconds = time.perf_counter() - started
        result.rounds.append(row)
        bar.set_postfix(personal=shown_accuracy(row.personalized_accuracy, 3),
                        glob=f"{row.global_accuracy:.3f}")
        if progress and bar.disable:  # not a terminal (tqdm's check): a line a round instead
            print(f"{config.strategy} {config.partition}: round {round_number}/{config.rounds}, "
                  f"{row.participants} updates, personal {shown_accuracy(row.personalized_accuracy)}, global "
                  f"{row.global_accuracy:.4f}, {row.seconds:.1f} s" + (
                      "" if row.central_dp is None else
                      f", eps {row.central_dp['epsilon']:.2f}") + _secure_note(row),
                  file=sys.stderr, flush=True)
    bar.close()
    return pipeline, global_state


def shown_accuracy(value: float | None, digits: int = 4) -> str:
    """An accuracy as printed; "-" in a round the devices were not scored in."""
    return "-" if value is None else f"{value:.{digits}f}"


def _population(pipeline: RoundPipeline, shards: list[ClientData],
                fleet: list[DeviceAssignment] | None, sizing: dict) -> list[Task]:
    """Every client's task this round, drawn or not: what central DP's denominators count
    (a fleet's device that holds no submodel is drawn like the others and holds nothing)."""
    return [pipeline.task(i, len(data.train_y), sizing.get(i)) for i, data in enumerate(shards)
            if fleet is None or fleet[i].selected]


def _taken(run: TaskRun, entry: dict, row: RoundResult) -> TaskOutcome:
    """A device's answer, recorded: refused, or what it trained and sent."""
    outcome = run.outcome
    row.client_seconds += run.seconds
    entry["outcome"] = "refused" if outcome.refused else "accepted"
    if outcome.refused:
        row.refused += 1
    elif outcome.payload is None:  # kept on the device (secure aggregation)
        entry["trained_samples"] = outcome.num_samples
    else:
        row.bytes_up += len(outcome.payload)
        entry.update(upload_bytes=len(outcome.payload), trained_samples=outcome.num_samples)
    return outcome


def _secure_note(row: RoundResult) -> str:
    """A round's secure aggregation in its progress line."""
    report = row.secure_aggregation
    if report is None:
        return ""
    if not report["committed"]:
        return f", secure aggregation failed: {report['reason']}"
    epsilon = report.get("epsilon")
    return f", secure sum of {report['survivors']}" + (
        "" if epsilon is None else f", eps {epsilon:.2f}")


def _secure_combiner(secure_round, strategy: Strategy, global_state: dict,
                     config: SimulationSettings, observe_server: ServerObserver | None,
                     row: RoundResult
                     ) -> RoundCombiner | None:
    """The round's secure stages, recorded in `row` (their bytes counted as sent), and the
    combiner that takes the mean change they give through the strategy's server step; None for
    a round that cannot be unmasked (the global model stays as it is)."""
    aggregate, report = secure_round.aggregate(observe_server)
    row.secure_aggregation = report
    exchanged = secure_round.bytes_by_device()
    for entry in row.devices:
        down, up = exchanged.get(device_id(entry["client"]), (0, 0))
        if down or up:
            entry.update(secure_bytes_down=down, secure_bytes_up=up)
        row.bytes_down += down
        row.bytes_up += up
    row.participants = report.get("survivors", 0)
    if aggregate is None:
        return None
    return RoundCombiner(strategy, global_state, config.aggregator, config.seed, central=aggregate)


def _starts_on_the_clock(assignment: DeviceAssignment, num_train: int, task: Task,
                         payload: bytes, dp, config: SimulationSettings, entry: dict,
                         row: RoundResult) -> float | None:
    """Whether a planned device's task runs at all on the simulated clock: its simulated
    seconds up to its upload when it does, None when not. A device whose model does not fit in
    its memory dies in training; one that cannot have finished training by the deadline is cut
    off there (not trained, nothing sent)."""
    deadline = config.deadline_seconds
    profile, epochs = assignment.profile, task.train.local_epochs
    samples = num_train if task.plan.local_samples is None else min(task.plan.local_samples,
                                                                    num_train)
    before_upload = task_time(profile, task.plan.spec, dp is not None, len(payload), 0, samples,
                              epochs)
    if assignment.out_of_memory:
        entry.update(outcome="out_of_memory", seconds=before_upload.download_seconds)
        row.out_of_memory += 1
        row.simulated_seconds = max(row.simulated_seconds, min(deadline, before_upload.download_seconds))
        return None
    if before_upload.total > deadline:
        entry.update(outcome="straggled", seconds=before_upload.total)
        row.straggled += 1
        row.simulated_seconds = deadline
        return None
    return before_upload.total


def _finish_on_the_clock(assignment: DeviceAssignment, task: Task, payload: bytes,
                         outcome: TaskOutcome, before_upload: float, dp,
                         config: SimulationSettings, entry: dict, row: RoundResult) -> None:
    """A planned device's task on the simulated clock, once it answered: a refused task ends
    before its upload; one whose upload ends past the deadline sent it, but it is not
    aggregated. The round lasts until its last device answers, at most the deadline."""
    if outcome.refused:
        entry["seconds"] = before_upload
        return
    deadline = config.deadline_seconds
    clock = task_time(assignment.profile, task.plan.spec, dp is not None, len(payload),
                      len(outcome.payload), outcome.num_samples, task.train.local_epochs)
    late = clock.total > deadline
    entry.update(outcome="straggled" if late else "accepted", seconds=clock.total)
    row.straggled += late
    row.simulated_seconds = max(row.simulated_seconds, min(deadline, clock.total))


def _inference_cost(spec, widths: list[float]) -> dict[str, Any]:
    """FLOPs per sample of the models devices run (2 x MACs; gated channels skipped)."""
    per_width = {w: 2 * inference_macs(spec if w >= 1 else width_spec(spec, w)) for w in set(widths)}
    return {"flops_per_sample_full": 2 * footprint(spec).macs,
            "flops_per_sample_mean": float(np.mean([per_width[w] for w in widths])),
            "flops_per_sample_by_width": {f"{w:g}": f for w, f in sorted(per_width.items())}}


def _plan_fleet(config: SimulationSettings, strategy: Strategy, shards: list[ClientData],
                profiles: list[DeviceProfile] | None) -> list[DeviceAssignment]:
    """Each device sized from its profile, for the transfer layout of its own plan (which
    tensors it uploads decides where download and upload keep apply)."""
    settings = planner_settings(config, strategy, config.deadline_seconds)
    per_device = [device_settings(settings, strategy, i, len(d.train_y))
                  for i, d in enumerate(shards)]
    return plan_fleet(config.fleet or "catalogue", strategy.spec, config.model, per_device,
                      config.sizing, profiles)
