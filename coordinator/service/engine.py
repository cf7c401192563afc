"""The coordinator's round state machine, driven by messages and the clock from one thread.

    (no round) --enough eligible devices--> collecting --all answered / deadline--> committing
    committing --checkpoint written--> committed            (or aborted below quorum; retried)

Everything that must survive a crash is in the store before anything depending on it is sent:
a round and its tasks before the tasks are published, an update before it is acknowledged, the
new global checkpoint before the round is marked committed. On restart the engine reloads the
last committed checkpoint, resumes the open round (re-sending its unanswered tasks; devices
de-duplicate by task key), and re-runs a commit that was interrupted, which is deterministic.

With several coordinators on one database ([cluster]), one engine leads (`leading`: registers,
opens, ticks and commits rounds, re-sends tasks) and every engine takes in updates and refusals;
a follower reads the open round from the database before each (`follow_round`), and a follower
that takes the lead resumes the open round exactly as a restart does (`take_lead`). A leader
writes under its leader epoch (the store's `fence`) and stamps it on every TASK and ARTIFACT
(`leader_epoch`, 0 with one coordinator): once another coordinator took over, its writes fail with
`Deposed` (raised, not refused: the service steps down), it publishes no task (`_send_tasks` checks
the epoch first), and devices refuse what it had already sent as `stale`.

Every message is hostile until parsed, and no content makes `handle` raise: a message that can
never be handled is refused with the reason (an ACK accepted=false when it names a task, a log
line otherwise) and the caller acknowledges it to the broker. Only failures that may pass (the
database is down, the disk is full: `is_transient`) escape, so that the service keeps the message
and tries again. `tick` likewise aborts a round whose commit fails for good, with the reason in its
summary, instead of failing again on every restart.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from device_profiles import DeviceProfile
from device_profiles.files import atomic_write
from edge_sdk import codec
from edge_sdk.sizing import DevicePlan
from edge_sdk.checkpoint import Checkpoint, load_checkpoint
from edge_sdk.models import build_model, model_spec
from edge_sdk.protocol.topics import DEVICE_TO_COORDINATOR
from edge_sdk.protocol.signing import load_private_key
from edge_sdk.rehearsal import peak_rss_bytes
from edge_sdk.protocol import (AckHeader, ArtifactHeader, Envelope, EnvelopeError, MessageType,
                               RefusalCode, TaskHeader, Topics, decode_envelope, encode_message,
                               parse_header, peek_header)
from edge_sdk.training import accuracy

from ..central_dp import CentralDP, CentralDPError, check_uploads, released_history
from ..combine import RoundCombiner
from ..heldout import contract_extra, held_out_data, verification_batch
from ..planning.memory import MemoryCoefficients
from ..planning.planner import plan_device
from ..secure_round import SecureAggregationError
from ..secure_round import check_uploads as check_secure_uploads
from ..rounds import (RoundPipeline, Task, UpdateRefused, device_key, device_settings, dp_config,
                      planner_settings)
from ..strategies import build_strategy
from .config import ServiceSettings
from .secure_stages import SecureStages, StageRefused
from .states import ROUND_IN_PROGRESS, TASK_MOVES, RoundState, TaskState
from .store import Deposed, RoundClosed, Store, TaskRow

log = logging.getLogger("fedprune.coordinator")

Publish = Callable[[str, bytes], None]

def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def is_transient(error: BaseException) -> bool:
    """A failure that may pass without the message changing: the database is down, locked or
    timed out, the disk is full. The message is kept and tried again, not refused."""
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, (OperationalError, InterfaceError, PoolTimeout, OSError))


class RoundEngine:
    def __init__(self, config: ServiceSettings, store: Store, publish: Publish,
                 clock: Callable[[], float] = time.time, leading: bool = True,
                 can_publish: Callable[[], bool] = lambda: True):
        """`leading` False: a cluster follower, which resumes nothing and sends no task until
        `take_lead`. `can_publish`: whether a task can be published without waiting (the link's
        window); the tasks it holds back are sent by the next ticks, between deliveries."""
        self.config, self.store, self.publish, self.clock = config, store, publish, clock
        self.can_publish = can_publish
        # The open round's tasks still to publish, in order: (device row, task row).
        self.unsent: deque[tuple[Any, TaskRow]] = deque()
        self.artifacts_due: tuple | None = None  # (chosen, tasks, number) once the tasks are out
        self.leading = leading
        self.topics = Topics(config.broker.fleet, config.broker.topic_prefix)
        # The fleet's data contract and held-out samples, from [data] or the benchmark `dataset`
        # (whose files are read only to evaluate, here, or on the first export).
        self.held_out = held_out_data(config.data_settings, read=config.evaluate)
        self.info = self.held_out.info
        self.strategy = build_strategy(config, model_spec(config.model, self.info.input_shape,
                                                         self.info.num_classes))
        self.spec = self.strategy.spec
        self.dp = dp_config(config)
        # User-level central DP ([central_dp]): its ledger is read from the committed rounds'
        # summaries whenever needed, so a restart or a new leader sees what was released.
        self.central = CentralDP.for_service(config)
        self.budget_spent: str | None = None  # central DP's budget allows no further round
        self.not_opening: str | None = None   # the last reason logged for not opening a round
        if self.central is not None:
            check_uploads(self.strategy)
        self.signing_key = load_private_key(config.signing_key) if config.signing_key else None
        self.test_x, self.test_y = ((self.held_out.x, self.held_out.y) if config.evaluate
                                    else (None, None))
        self.state_dir = Path(config.state_dir)
        self.planner = planner_settings(config, self.strategy, config.rounds.deadline_seconds)
        self.train = config.train
        self.coefficients = MemoryCoefficients.load()
        self.global_state = self._load_global()
        # Secure aggregation ([secure_aggregation], secure_stages.py): its round state is in
        # memory only, so a round found open at start (or by a new leader) is aborted.
        self.secure = None
        if config.secure_aggregation.enabled:
            check_secure_uploads(self.strategy)
            self.secure = SecureStages(config.secure_aggregation, self.global_state,
                                       config.rounds.devices_per_round, config.rounds.total,
                                       self._send_stage, lambda: self.epoch)
        self.pipeline: RoundPipeline | None = None
        self.tasks_built: dict[str, Task] = {}  # this round's task per device, built once
        self.waiting_since: float | None = None
        self.on_commit: Callable[[dict], None] | None = None
        # Called with the device's stored row (DeviceRow: profile, plan, fits, ...) after each
        # registration is planned and stored, from the engine's thread.
        self.on_register: Callable[[Any], None] | None = None
        self.counters: Counter[str] = Counter()  # messages refused or failed, for status()
        self.round = store.current_round()
        if self.round is not None:
            log.info("%s round %d (%s)", "resuming" if leading else "following", self.round.number,
                     self.round.state)
            self._prepare_pipeline(self.round.number)
            if leading:
                self._abort_secure_round() or self.resend_unanswered()

    # --- several coordinators ([cluster]) ------------------------------------------------------
    def follow_round(self) -> None:
        """A follower's view of the round the leader runs, read from the database: a new round
        brings the global model it started from (the last committed checkpoint)."""
        current = self.store.current_round()
        if current is not None and (self.pipeline is None
                                    or self.pipeline.round_number != current.number):
            self.global_state = self._load_global()
            self._prepare_pipeline(current.number)
        self.round = current

    def take_lead(self) -> None:
        """This engine leads from now on: resume the open round from the database as after a
        restart (the global model, the round, its unanswered tasks re-sent with the same ids)."""
        self.leading = True
        self.waiting_since = None
        self.global_state = self._load_global()
        self.round = self.store.current_round()
        if self.round is None:
            log.info("leading: no round open; %d of %d rounds committed", self.committed_rounds(),
                     self.config.rounds.total)
            return
        log.info("leading: resuming round %d (%s)", self.round.number, self.round.state)
        self._prepare_pipeline(self.round.number)
        self._abort_secure_round() or self.resend_unanswered()

    @property
    def epoch(self) -> int:
        """The leader epoch stamped on tasks and artifacts: the store's fence, 0 without one."""
        return self.store.fence or 0

    def step_down(self) -> None:
        """This engine no longer leads (its lock is gone): it only takes in updates."""
        self.leading = False
        self.waiting_since = None
        self._forget_sending()

    # --- global model ----------------------------------------------------------------------
    def _load_global(self) -> dict[str, np.ndarray]:
        last = self.store.last_committed()
        if last is not None and last.checkpoint:
            path, data = Path(last.checkpoint), None
            if self.config.cluster.enabled:  # the leader's state_dir may be another machine's
                data = self.store.checkpoint(last.number)
            if data is not None:
                path = self.state_dir / "checkpoints" / path.name
                atomic_write(path, data)
            saved = load_checkpoint(path)
            return {k: v.numpy().copy() for k, v in saved.state.items()}
        initial = self.strategy.initial_state()
        if initial is not None:
            return initial
        model = build_model(self.spec, seed=self.config.seed)
        return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    def committed_rounds(self) -> int:
        return sum(r.state == RoundState.COMMITTED for r in self.store.rounds())

    @property
    def done(self) -> bool:
        return self.round is None and (self.committed_rounds() >= self.config.rounds.total
                                       or self._gave_up() is not None)

    def _gave_up(self) -> str | None:
        """Why no further round is opened: too many aborted attempts, or central DP's budget
        spent for the devices there are (None: not given up)."""
        if self.budget_spent is not None:
            return self.budget_spent
        rounds = self.store.rounds()
        attempts = sum(r.state == RoundState.ABORTED for r in rounds)
        if attempts <= self.config.rounds.retries * self.config.rounds.total:
            return None
        last = next(r for r in reversed(rounds) if r.state == RoundState.ABORTED)
        return f"{attempts} rounds aborted (last: {(last.summary or {}).get('reason')})"

    # --- messages --------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, received_at: float | None = None) -> None:
        """Act on one message that arrived at `received_at` (now, by default: a busy engine must
        not judge an update late that arrived in time). Returns whatever its content (handled,
        or refused and reported); raises only a transient failure (`is_transient`), for the
        caller to try again."""
        try:
            self._dispatch(topic, payload, self.clock() if received_at is None else received_at)
        except Exception as exc:
            if is_transient(exc) or isinstance(exc, Deposed):
                raise
            self.counters["messages_failed"] += 1
            log.exception("could not handle a message on %s (%s: %s); it is dropped", topic,
                          type(exc).__name__, exc)
            self._tell_refused_update(topic, payload, f"the coordinator could not handle it: "
                                                      f"{type(exc).__name__}: {exc}")

    def _dispatch(self, topic: str, payload: bytes, received_at: float) -> None:
        try:
            kind, device = self.topics.device_of(topic)
        except ValueError as exc:
            self._refused_message("ignoring message: %s", exc)
            return
        expected = DEVICE_TO_COORDINATOR.get(kind)
        if expected is None:
            self._refused_message("ignoring a message on %s: devices do not publish there", topic)
            return
        try:
            envelope = decode_envelope(payload, self.config.broker.max_payload_bytes)
            header = parse_header(envelope)
        except EnvelopeError as exc:
            self._refused_message("refused a malformed %s message from %s: %s", kind, device, exc)
            self._tell_refused_update(topic, payload, f"update refused: {exc}")
            return
        if header.device_id != device:
            self._refused_message("message on %s's topic claims to be from %s; refused", device,
                                  header.device_id)
            return
        if envelope.type != expected:
            self._refused_message("%s sent a %s message on its %s topic; refused", device,
                                  envelope.type.name, kind)
            if envelope.type == MessageType.UPDATE:
                self._ack(header, False, f"update refused: an UPDATE goes on the update topic, "
                                         f"not on {kind}")
            return
        if envelope.type == MessageType.UPDATE:
            self._on_update(header, envelope.payload, received_at)
            return
        handler = {MessageType.REGISTER: self._on_register, MessageType.STATUS: self._on_status,
                   MessageType.REFUSAL: self._on_refusal, MessageType.SECAGG: self._on_stage}
        handler[envelope.type](header, envelope.payload)

    def _refused_message(self, text: str, *args) -> None:
        self.counters["messages_refused"] += 1
        log.warning(text, *args)

    def _tell_refused_update(self, topic: str, payload: bytes, reason: str) -> None:
        """An update refused before it was understood (too large, damaged, or failing) is still
        answered when its header names a task of the device whose topic it came on, so the device
        learns why."""
        try:
            kind, device = self.topics.device_of(topic)
            if kind != "update":
                return
            message_type, raw = peek_header(payload)
            header = parse_header(Envelope(message_type, raw), MessageType.UPDATE)
            if header.device_id == device:
                self._ack(header, False, reason)
        except (ValueError, EnvelopeError):
            return

    def _on_register(self, header, _payload: bytes) -> None:
        limit = self.config.max_device_samples
        if header.num_samples > limit:
            self._refused_message(
                "refused the registration of %s: it claims %d training samples, over "
                "max_device_samples = %d (its aggregation weight would be that count; raise "
                "max_device_samples in coordinator.toml if a device really holds more)",
                header.device_id, header.num_samples, limit)
            return
        try:
            profile = DeviceProfile.model_validate(header.profile)
        except ValidationError as exc:
            log.warning("device %s registered with an invalid profile: %s", header.device_id,
                        exc.errors()[0]["msg"])
            return
        settings = device_settings(self.planner, self.strategy, device_key(header.device_id),
                                   header.num_samples)
        plan = plan_device(profile, self.spec, self.config.model, settings, self.coefficients)
        self.store.upsert_device(
            header.device_id, profile=header.profile, num_samples=header.num_samples,
            formats=header.formats, plan=plan.model_dump(mode="json"), width_ratio=plan.width_ratio,
            fits=plan.fits, online=True, model_digest=header.model_digest,
            epsilon=header.epsilon_spent, epsilon_budget=header.epsilon_budget)
        log.info("registered %s (%s): width %g, physical batch %d, %d local samples, download %s "
                 "keep %g, upload %s keep %g, predicted peak %.0f MB; %s", header.device_id,
                 profile.name, plan.width_ratio, plan.physical_batch_size, plan.local_samples,
                 plan.download_dtype, plan.download_keep, plan.upload_dtype, plan.upload_keep,
                 plan.predicted_peak_bytes / 1e6,
                 "fits" if plan.fits else "does not fit: " + "; ".join(plan.reasons))
        if self.on_register:
            self.on_register(self.store.device(header.device_id))

    def _on_status(self, header, _payload: bytes) -> None:
        self.store.update_device(header.device_id, online=header.online)
        log.info("%s is %s", header.device_id, "online" if header.online else "offline")

    def _ack(self, header, accepted: bool, reason: str | None = None, duplicate: bool = False) -> None:
        """Signed like tasks (when the coordinator has a key): a forged ACK would make a device
        drop an update it still has to deliver."""
        self.publish(self.topics.ack(header.device_id), self._message(AckHeader(
            device_id=header.device_id, round=header.round, task=header.task, accepted=accepted,
            duplicate=duplicate, reason=reason)))

    def _on_update(self, header, payload: bytes, received_at: float) -> None:
        current = self.round
        if self.secure is not None:  # never stored: the coordinator takes only masked inputs
            self._ack(header, False, "update refused: this fleet runs secure aggregation; a "
                                     "device answers its task with SECAGG stage messages")
            return
        if current is None or header.round != current.number:
            stored = self.store.has_update(header.round, header.device_id, header.task)
            self._ack(header, stored, None if stored else
                      f"round {header.round} is not open (open: "
                      f"{current.number if current else 'none'}); the update is stale",
                      duplicate=stored)
            return
        task = self.store.task(current.number, header.device_id)
        if task is None or task.task != header.task:
            self._ack(header, False, f"no task {header.task} for {header.device_id} in round {current.number}")
            return
        if task.state == TaskState.ACCEPTED:  # QoS 1 redelivery or a replay: counted once
            self.store.count(current.number, "duplicates")
            self._ack(header, True, duplicate=True)
            return
        if current.state == RoundState.COMMITTING:  # resumed after a crash: its updates are fixed
            self._ack(header, False, f"round {current.number} is committing: the update came too "
                                     "late to be counted (nothing to resend)")
            return
        refused = self.store.refused_updates(current.number, header.device_id)
        if refused >= self.config.max_refused_updates:
            self._ack(header, False, f"{refused} updates for task {header.task} were refused; "
                                     "no further one is decoded this round")
            return
        if received_at > current.deadline:
            self.store.reject_update(current.number, header.device_id, "late", counted=False)
            self._ack(header, False, "late: the round's deadline had passed")
            return
        try:
            self._check_claims(header, payload)
            update = self.pipeline.intake(self._task_for(task), payload)
            self._check_norm(update)
        except (codec.CodecError, UpdateRefused) as exc:
            self.store.reject_update(current.number, header.device_id, str(exc))
            self._ack(header, False, f"update refused: {exc}")
            return
        try:
            stored = self.store.accept_update(current.number, header.device_id, header.task,
                                              payload, task.aggregation_weight, header.num_samples,
                                              header.epsilon, header.local_accuracy)
        except RoundClosed:  # another coordinator (the leader) closed the round meanwhile
            stored = self.store.has_update(current.number, header.device_id, header.task)
            self._ack(header, stored, None if stored else
                      f"round {current.number} closed: the update came too late to be counted",
                      duplicate=stored)
            return
        self.store.update_device(header.device_id, epsilon=header.epsilon,
                                 model_digest=self.pipeline.view(task.width_ratio).spec.digest())
        self._ack(header, True, duplicate=not stored)
        self.counters["updates_accepted"] += stored
        log.info("round %d: accepted %d-byte update from %s", current.number, len(payload),
                 header.device_id, extra={"device": header.device_id, "stored": stored})

    def _check_claims(self, header, payload: bytes) -> None:
        """What the header says must hold before the payload is decoded: its digest, and no more
        samples than the coordinator planned the device's task (and weight) with."""
        digest = hashlib.sha256(payload).hexdigest()
        if digest != header.payload_sha256:
            raise UpdateRefused(f"payload_sha256 {header.payload_sha256} does not match the "
                                   f"payload's sha256 {digest}: damaged or altered")
        planned = self.store.device(header.device_id).num_samples
        if header.num_samples > planned:
            raise UpdateRefused(f"num_samples {header.num_samples} is over the {planned} "
                                   f"samples {header.device_id} registered, which its task was "
                                   "planned and weighted with")

    def _check_norm(self, update: dict[str, codec.SparseTensor]) -> None:
        """Refuse a change from the global model larger than `max_update_norm` (L2, all tensors;
        `update` is over the global model)."""
        limit = self.config.max_update_norm
        if limit is None or self.strategy.bounded_updates:
            return
        squared = 0.0
        for name, tensor in update.items():
            start = self.global_state[name].reshape(-1)
            start = start if tensor.indices is None else start[tensor.indices]
            squared += float(np.sum((tensor.values.astype(np.float64) - start) ** 2))
        if squared > limit ** 2:
            raise UpdateRefused(f"the update changes the model by an L2 norm of {squared ** 0.5:.3g}, "
                                   f"over the coordinator's limit of {limit:g}")

    def _on_refusal(self, header, _payload: bytes) -> None:
        current = self.round
        if current is None or header.round != current.number:
            log.info("%s refused task %s of round %d (%s), which is not open: %s", header.device_id,
                     header.task, header.round, header.code.value, header.message)
            return
        task = self.store.task(current.number, header.device_id)
        if task is None or task.task != header.task:
            return
        if header.code == RefusalCode.BAD_ARTIFACT:  # information: the task itself runs on
            self.store.count(current.number, "artifact_refusals")
            log.warning("round %d: %s refused its exported model: %s", current.number,
                        header.device_id, header.message)
            return
        if header.code == RefusalCode.STALE:
            # A copy from a deposed leader (or a replay) that the device saw after a newer one:
            # the task it runs is the newer copy (same key), so the task's state stands, and it
            # says nothing of the device's privacy (not exhausted).
            self.store.count(current.number, "stale_refusals")
            log.warning("round %d: %s refused a stale copy of task %s: %s", current.number,
                        header.device_id, header.task, header.message,
                        extra={"event": "stale_refusal", "device": header.device_id})
            return
        if TaskState.REFUSED not in TASK_MOVES[task.state]:  # answered already: the answer stands
            return
        self.store.set_task(current.number, header.device_id, state=TaskState.REFUSED,
                            reason=f"{header.code.value}: {header.message}")
        if header.code in (RefusalCode.PRIVACY_BUDGET, RefusalCode.PRIVACY_POLICY):
            # Not eligible again: its budget is spent, or this run's DP settings are weaker than
            # its own config requires (they do not change while the coordinator runs).
            self.store.update_device(header.device_id, exhausted=True, epsilon=header.epsilon)
        elif header.code == RefusalCode.BAD_TASK:
            self.store.update_device(header.device_id, model_digest=None)  # resend everything next time
        log.warning("round %d: %s refused its task (%s): %s", current.number, header.device_id,
                    header.code.value, header.message)

    # --- the clock -------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance the open round by the clock. A step that fails for good (a stored update that
        no longer decodes, a summary the database refuses) aborts the round with the reason, so
        a restart does not fail on the same commit again; a transient failure is raised for the
        caller to retry (the round and its accepted updates are kept)."""
        try:
            self._advance(self.clock())
        except Exception as exc:
            if is_transient(exc) or isinstance(exc, Deposed) or self.round is None:
                raise
            log.exception("round %d: %s failed", self.round.number, self.round.state)
            self._abort(f"{self.round.state} failed: {type(exc).__name__}: {exc}")

    def _advance(self, now: float) -> None:
        if self.round is None:
            if self.committed_rounds() < self.config.rounds.total:
                self._maybe_open(now)
            return
        if self.round.state == RoundState.COMMITTING:
            self._commit()
            return
        self._send_tasks()
        if self.secure is not None:
            self._advance_secure(now)
            return
        counts = self.store.task_counts(self.round.number)
        if counts.get(TaskState.SENT, 0) == 0 or now >= self.round.deadline:
            accepted = counts.get(TaskState.ACCEPTED, 0)
            if accepted >= self.round.quorum:
                self._commit()
            else:
                self._abort(f"{accepted} accepted updates, quorum {self.round.quorum}")

    def _maybe_open(self, now: float) -> None:
        rounds = self.config.rounds
        eligible = self.store.eligible_devices()
        if len(eligible) < rounds.min_devices:
            self.waiting_since = None
            return
        gave_up = self._gave_up()
        if gave_up is not None:
            self._not_opening(gave_up)
            return
        if self.waiting_since is None:
            self.waiting_since = now
            if len(eligible) < rounds.devices_per_round and rounds.registration_grace_seconds > 0:
                log.info("%d of %d devices eligible for the next round; waiting up to %g s for more",
                         len(eligible), rounds.devices_per_round, rounds.registration_grace_seconds,
                         extra={"event": "waiting_for_devices"})
        if len(eligible) < rounds.devices_per_round and now - self.waiting_since < rounds.registration_grace_seconds:
            return
        self.waiting_since = None
        over_budget = self._central_over_budget(len(eligible))
        if over_budget is not None:  # final: the engine is done (exit_when_done exits)
            self.budget_spent = over_budget
            self._not_opening(over_budget)
            return
        self._open(eligible, now)

    def _not_opening(self, reason: str) -> None:
        """Say why no round opens once, not on every tick."""
        if reason != self.not_opening:
            log.error("not opening another round: %s", reason)
        self.not_opening = reason

    def _central_ledger(self):
        return self.central.ledger_over(released_history(
            r.summary for r in self.store.rounds() if r.state == RoundState.COMMITTED))

    def _central_over_budget(self, eligible: int) -> str | None:
        """Why central DP's budget allows no further round drawn from `eligible` devices."""
        if self.central is None:
            return None
        return self._central_ledger().over_budget(
            min(self.config.rounds.devices_per_round, eligible) / eligible)

    def _central_population(self, number: int) -> list[Task]:
        """The task each device the round was drawn from would have had (central DP's
        denominators), from the population stored when the round opened."""
        stored = (self.store.round_row(number).summary or {}).get("central_dp") or {}
        if "population" not in stored:
            raise CentralDPError(f"round {number} was opened without central DP, so the "
                                 "population it was drawn from is unknown; it is not released")
        tasks = []
        for device_id, width in stored["population"]:
            device = self.store.device(device_id)
            sizing = DevicePlan.model_validate(device.plan).model_copy(update={"width_ratio": width})
            tasks.append(self.pipeline.task(device_key(device_id), device.num_samples, sizing))
        return tasks

    def _prepare_pipeline(self, number: int) -> None:
        self.pipeline = RoundPipeline(self.strategy, self.config, self.global_state, number,
                                      self.train)
        self.tasks_built = {}

    def _task_for(self, task: TaskRow) -> Task:
        """The device's task from the round pipeline, at the width the round opened it with."""
        if task.device not in self.tasks_built:
            device = self.store.device(task.device)
            sizing = DevicePlan.model_validate(device.plan).model_copy(
                update={"width_ratio": task.width_ratio})
            self.tasks_built[task.device] = self.pipeline.task(device_key(device.id),
                                                               device.num_samples, sizing)
        return self.tasks_built[task.device]

    def _task_message(self, device, task: TaskRow, deadline: float) -> bytes:
        built = self._task_for(task)
        holds_copy = device.model_digest == self.pipeline.view(built.width_ratio).spec.digest()
        payload = self.pipeline.download(built, device_has_private_copy=holds_copy)
        header = TaskHeader(
            device_id=device.id, round=task.round, task=task.task, plan=built.plan.to_dict(),
            train=built.train.model_dump(),
            dp=self.config.dp.model_dump(exclude={"epsilon_budget"}) if self.dp else None,
            planned_rounds=self.config.rounds.total, selection_rate=self._selection_rate(),
            deadline=deadline, width_ratio=built.width_ratio, leader_epoch=self.epoch,
            secure_aggregation=None if self.secure is None else
            self.secure.task_settings(built, self.pipeline, self.global_state))
        return self._message(header, payload)

    def _selection_rate(self) -> float:
        """A device's chance of being drawn in a round: devices per round over the devices that
        can be drawn now (its DP noise is sized by it, so it errs high when few are eligible)."""
        eligible = len(self.store.eligible_devices())
        return min(1.0, self.config.rounds.devices_per_round / max(1, eligible))

    def _message(self, header, payload: bytes = b"") -> bytes:
        """The envelope of `header` (its `edge_sdk.protocol` model) and `payload`: every message
        the coordinator sends (tasks, artifacts, acks) is signed when it has a signing key."""
        return encode_message(header, payload, signing_key=self.signing_key)

    def _open(self, eligible, now: float) -> None:
        number = self.store.next_round_number()
        # Under central DP the draw is secret (OS-seeded): one replayable from the seed would
        # give away who took part, which the accounting's sampling assumes hidden.
        rng = np.random.default_rng([self.config.seed, number]) if self.central is None \
            else self.central.rng
        eligible = sorted(eligible, key=lambda d: d.id)  # the draw, not the order they registered
        count = min(self.config.rounds.devices_per_round, len(eligible))
        chosen = [eligible[i] for i in sorted(rng.choice(len(eligible), count, replace=False))]
        self._prepare_pipeline(number)
        deadline = now + self.config.rounds.deadline_seconds
        quorum = max(1, math.ceil(self.config.rounds.min_fraction * count))
        tasks = [TaskRow(round=number, device=d.id, task=uuid.uuid4().hex[:16],  # the store: sent
                         width_ratio=d.width_ratio, aggregation_weight=1.0, bytes_down=0, sent_at=now)
                 for d in chosen]
        for device, task in zip(chosen, tasks):
            task.aggregation_weight = self._task_for(task).plan.aggregation_weight
            task.bytes_down = len(self._task_message(device, task, deadline))
        self.store.open_round(number, deadline, [d.id for d in chosen], quorum, tasks)
        if self.secure is not None and not self._open_secure(tasks, deadline):
            return
        if self.central is not None:  # the population the round is drawn from, for its commit
            self.store.set_round(number, summary={"central_dp": {
                "population": [[d.id, d.width_ratio] for d in eligible]}})
        self.round = self.store.current_round()
        log.info("round %d: sending tasks to %d devices (quorum %d, deadline in %.0f s)", number,
                 count, quorum, self.config.rounds.deadline_seconds)
        # Persisted first: a crash while sending re-sends on restart. Built one at a time, and
        # sent while the link takes them without waiting: the rest by the next ticks, after the
        # updates that came meanwhile, so neither the tasks nor the updates pile up in memory.
        self.unsent = deque(zip(chosen, tasks))
        self.artifacts_due = (chosen, tasks, number) if self.config.export.enabled else None
        self._send_tasks()

    def _send_tasks(self) -> None:
        """Publish the open round's unsent tasks while the link takes them without waiting; once
        all are out, its artifacts (export on)."""
        if not self.unsent and self.artifacts_due is None:
            return
        self.store.check_fence()  # a deposed leader publishes nothing (devices refuse it anyway)
        while self.unsent and self.can_publish():
            device, task = self.unsent.popleft()
            self.publish(self.topics.task(device.id),
                         self._task_message(device, task, self.round.deadline))
        if self.unsent:
            return
        log.info("round %d: every task sent", self.round.number)
        if self.artifacts_due is not None:
            chosen, tasks, number = self.artifacts_due
            self.artifacts_due = None
            artifact_bytes = self._send_artifacts(chosen, tasks, number)
            self.store.set_round(number, summary={"artifact_bytes": artifact_bytes})

    def _forget_sending(self) -> None:
        """No task or artifact is due any more: the round ended, or this engine stopped leading."""
        self.unsent.clear()
        self.artifacts_due = None
        if self.secure is not None:
            self.secure.close()

    def resend_unanswered(self) -> None:
        """Re-send the open round's unanswered tasks (same ids; devices never run a task twice):
        after a restart, or after the broker connection came back (those not sent yet among
        them, once)."""
        if self.round is None or self.round.state != RoundState.COLLECTING:
            return
        devices = {d.id: d for d in self.store.devices()}
        self.unsent = deque((devices[device_id], task)
                            for device_id, task in self.store.tasks(self.round.number).items()
                            if task.state == TaskState.SENT and device_id in devices)
        self._send_tasks()

    @functools.cached_property
    def _verify_inputs(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The inputs every export is verified on, and their labels, taken once: the held-out
        samples (a benchmark coordinator that does not evaluate reads its files here, on its
        first export, not every round), or seeded random inputs of the input shape (no labels)
        under a contract without samples."""
        held = self.held_out
        if held.x is None and self.config.data_settings.source == "benchmark":
            held = held_out_data(self.config.data_settings)
        return verification_batch(held, self.config.export.verify_samples, self.config.seed)

    def _send_artifacts(self, chosen, tasks: list[TaskRow], number: int) -> int:
        """The model each device starts the round from, exported for its width and runtime; its
        header names the device's task, which a refusal of the artifact names in turn."""
        from export import ExportError, export_bundle

        x, y = self._verify_inputs
        bundles, sent = {}, 0
        for device, task in zip(chosen, tasks):
            formats = [f for f in self.config.export.formats if f in device.formats]
            if not formats:
                continue
            key = (device.width_ratio, formats[0])
            if key not in bundles:
                out = self.state_dir / "exports" / f"round-{number:04d}" / f"w{device.width_ratio:g}-{formats[0]}"
                try:
                    bundles[key] = (out, export_bundle(
                        self.pipeline.model_at(device.width_ratio), out,
                        spec=self.pipeline.view(device.width_ratio).spec,
                        model_name=self.config.model, info=self.info,
                        device_id=f"width-{device.width_ratio:g}", verify_x=x, verify_y=y,
                        round_number=number - 1,
                        width_ratio=device.width_ratio, formats=(formats[0],)))
                except ExportError as exc:
                    log.error("round %d: export for width %g failed: %s", number, device.width_ratio, exc)
                    bundles[key] = None
            if bundles[key] is None:
                continue
            out, manifest = bundles[key]
            entry = manifest.artifacts[0]
            message = self._message(
                ArtifactHeader(device_id=device.id, round=number - 1, task=task.task,
                               manifest=manifest.model_dump(mode="json"),
                               artifact=entry.compressed_path, leader_epoch=self.epoch),
                (out / entry.compressed_path).read_bytes())
            self.publish(self.topics.artifact(device.id), message)
            sent += len(message)
        return sent

    # --- commit ----------------------------------------------------------------------------
    def _commit(self) -> None:
        number = self.round.number
        if self.round.state == RoundState.COLLECTING:  # else resumed: committing already
            self.store.set_round(number, state=RoundState.COMMITTING)
            self.round = self.store.round_row(number)
        tasks = self.store.tasks(number)
        central, central_rate = None, None
        if self.central is not None:
            population = self._central_population(number)
            central_rate = len(tasks) / len(population)
            central = self.central.round(population, self.pipeline, central_rate)
        secure = None
        if self.secure is not None:  # the unmasked sum's mean change; no update is stored
            secure, secure_summary = self.secure.aggregate(self.global_state, [
                r.summary for r in self.store.rounds() if r.state == RoundState.COMMITTED])
            self.store.set_round(number, summary={**(self.store.round_row(number).summary or {}),
                                                  "secure_aggregation": secure_summary})
        combiner = RoundCombiner(self.strategy, self.global_state, self.config.aggregator,
                                 self.config.seed, central=central or secure,
                                 weights=None if secure else self.store.update_weights(number))
        bytes_up, epsilons, local, contributions = 0, [], [], []
        for update in self.store.updates(number):
            if secure is None:
                combiner.add(self.pipeline.intake(self._task_for(tasks[update.device]),
                                                  update.payload), update.weight)
            contributions.append(f"{update.device}/{update.task}")
            bytes_up += update.bytes if secure is None else 0  # secure: counted by its stages
            if update.epsilon is not None:
                epsilons.append(update.epsilon)
            if update.local_accuracy is not None:
                local.append(update.local_accuracy)
        if secure is not None:  # what the stages carried: the masked inputs, keys and shares
            bytes_up += secure_summary["bytes_up"]
        new_state = combiner.result()
        path = self.state_dir / "checkpoints" / f"global-r{number:04d}.pt"
        checkpoint = Checkpoint(self.spec, {k: torch.from_numpy(v) for k, v in new_state.items()},
                                self.config.model, self.info.name, None, number,
                                extra=contract_extra(self.info))
        checkpoint.save(path)
        if self.config.cluster.enabled:  # before the round is committed: followers load it
            self.store.save_checkpoint(number, path.read_bytes())
        global_accuracy = None
        if self.test_x is not None:
            model = build_model(self.spec)
            model.load_state_dict({k: torch.from_numpy(v)
                                   for k, v in self.strategy.materialize(new_state).items()})
            global_accuracy = accuracy(model, self.test_x, self.test_y)
        states = Counter(t.state for t in tasks.values())
        self._mark_missing(number, tasks)
        summary = {**(self.store.round_row(number).summary or {}), "round": number,
                   "selected": len(tasks), "accepted": states[TaskState.ACCEPTED],
                   "refused": states[TaskState.REFUSED], "rejected": states[TaskState.REJECTED],
                   "missing": states[TaskState.SENT],
                   # Past the deadline: late updates and tasks never answered (not aggregated).
                   "straggled": states[TaskState.SENT] + sum(
                       t.state == TaskState.REJECTED and t.reason == "late" for t in tasks.values()),
                   "refused_by_reason": dict(Counter((t.reason or "").split(":")[0] for t in tasks.values()
                                                     if t.state == TaskState.REFUSED)),
                   "bytes_up": bytes_up,
                   "bytes_down": sum(t.bytes_down for t in tasks.values())
                   + (secure_summary["bytes_down"] if secure is not None else 0),
                   "epsilon_max": max(epsilons) if epsilons else None,
                   "personalized_accuracy": float(np.mean(local)) if local else None,
                   "global_accuracy": global_accuracy,
                   "seconds": self.clock() - self.round.started_at,
                   "contributions": contributions}
        if central is not None:  # the coordinator's spending once this model is released
            summary["central_dp"] = {**self._central_ledger().released(central_rate),
                                     "population": len(population)}
        self.store.set_round(number, state=RoundState.COMMITTED, checkpoint=str(path),
                             finished_at=self.clock(), summary=summary)
        self.global_state, self.round = new_state, None
        self._forget_sending()  # the deadline may have passed before every task was sent
        log.info("round %d committed: %d of %d updates accepted (%d straggled, %d refused, %d "
                 "rejected), %s bytes up, %s down, personalized accuracy %s, global %s, epsilon "
                 "max %s, %.1f s", number, summary["accepted"], summary["selected"],
                 summary["straggled"], summary["refused"], summary["rejected"],
                 f"{summary['bytes_up']:,}", f"{summary['bytes_down']:,}",
                 _share(summary["personalized_accuracy"]), _share(global_accuracy),
                 "-" if summary["epsilon_max"] is None else f"{summary['epsilon_max']:.2f}",
                 summary["seconds"], extra={"event": "round_committed", "summary": summary})
        if self.on_commit:
            self.on_commit(summary)

    # --- secure aggregation (secure_stages.py) ------------------------------------------------
    def _open_secure(self, tasks: list[TaskRow], deadline: float) -> bool:
        """The round's secure stages; False (the round aborted with the reason) if it cannot run
        them."""
        self.round = self.store.current_round()
        try:
            self.secure.open(self.round.number, {t.device: self._task_for(t) for t in tasks},
                             {t.device: t.task for t in tasks}, self.pipeline, self.global_state,
                             deadline, self.config.rounds.deadline_seconds)
        except SecureAggregationError as exc:
            self._abort(str(exc))
            return False
        return True

    def _abort_secure_round(self) -> bool:
        """A secure round found open at start or on taking the lead cannot go on: its keys and
        running sum were in the memory of the process that opened it. Aborted (True) so that a
        new one opens."""
        if self.secure is None or self.round is None:
            return False
        self._abort("the coordinator restarted (or a new leader took over) during a "
                    "secure-aggregation round; its stage state was in memory only")
        return True

    def _send_stage(self, device: str, header, payload: bytes) -> None:
        self.publish(self.topics.secagg_down(device), self._message(header, payload))

    def _on_stage(self, header, payload: bytes) -> None:
        if self.secure is None:
            self._refused_message("%s sent a secure-aggregation stage message; this fleet does "
                                  "not run secure aggregation", header.device_id)
            return
        current = self.round
        task = None if current is None else self.store.task(current.number, header.device_id)
        try:
            self.secure.receive(header, payload, task)
        except StageRefused as exc:
            self._refused_message("refused a %s stage message from %s (round %d, task %s): %s",
                                  header.stage.value, header.device_id, header.round, header.task,
                                  exc)
            return
        if header.stage.value == "masked":  # in the sum: the task is answered (nothing stored)
            try:
                self.store.accept_update(current.number, header.device_id, header.task, b"",
                                         task.aggregation_weight, header.num_samples,
                                         header.epsilon, header.local_accuracy, size=len(payload))
            except RoundClosed:
                return
            log.info("round %d: masked input of %s added to the sum", current.number,
                     header.device_id)

    def _advance_secure(self, now: float) -> None:
        """The open secure round's stages by the clock; commit once unmasked, abort with the
        reason when too few devices are left."""
        number = self.round.number
        try:
            verdict = self.secure.advance(now, self.store.tasks(number), not self.unsent)
        except SecureAggregationError as exc:
            self._abort(str(exc))
            return
        if verdict != "commit":
            return
        accepted = self.store.task_counts(number).get(TaskState.ACCEPTED, 0)
        if accepted < self.round.quorum:
            self._abort(f"{accepted} masked inputs in the sum, quorum {self.round.quorum}")
            return
        self._commit()

    def _mark_missing(self, number: int, tasks: dict[str, TaskRow]) -> None:
        """The round closes: tasks never answered are missing."""
        for device_id, task in tasks.items():
            if task.state == TaskState.SENT:
                self.store.set_task(number, device_id, state=TaskState.MISSING)

    def _abort(self, why: str) -> None:
        number = self.round.number
        self._mark_missing(number, self.store.tasks(number))
        summary = {**(self.store.round_row(number).summary or {}), "reason": why}
        self.store.set_round(number, state=RoundState.ABORTED, finished_at=self.clock(),
                             summary=summary)
        log.warning("round %d aborted: %s; a new round will be opened", number, why)
        self.round = None
        self._forget_sending()

    # --- status ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        devices = self.store.devices()
        rounds = self.store.rounds()
        current = next((r for r in reversed(rounds) if r.state in ROUND_IN_PROGRESS), None)
        progress = None
        if current is not None:
            tasks = self.store.tasks(current.number)
            progress = {"round": current.number, "state": current.state,
                        "deadline_in": max(0.0, current.deadline - self.clock()),
                        "selected": len(tasks), "quorum": current.quorum,
                        "answered": {s.value: sum(t.state == s for t in tasks.values())
                                     for s in (TaskState.SENT, TaskState.ACCEPTED,
                                               TaskState.REFUSED, TaskState.REJECTED)}}
        return {"fleet": self.config.broker.fleet,
                "process": {"peak_rss_bytes": peak_rss_bytes(), "devices_registered": len(devices)},
                "messages": {"refused": self.counters["messages_refused"],
                             "failed": self.counters["messages_failed"]},
                "rounds_committed": sum(r.state == RoundState.COMMITTED for r in rounds),
                "rounds_total": self.config.rounds.total, "current": progress,
                "devices": [{"id": d.id, "online": d.online, "width_ratio": d.width_ratio,
                             "fits": d.fits, "epsilon": d.epsilon, "exhausted": d.exhausted,
                             "device_class": d.profile.get("name")} for d in devices],
                "rounds": [{"number": r.number, "state": r.state, **(r.summary or {})} for r in rounds]}
