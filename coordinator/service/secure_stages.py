"""Secure aggregation (SecAgg+ with distributed discrete Gaussian noise) in the coordinator
service: one round's stages over MQTT, driven by the engine's messages and clock.

    TASK (with `secure_aggregation`) -> the device trains and keeps its change
    SETUP -> ADVERTISE        closes when every device answered, or at the round's deadline
    KEYS -> SHARES            closes when every device asked answered, or STAGE_FRACTION of the
    FORWARD -> MASKED         round's deadline_seconds after it opened (each stage its own)
    UNMASK_REQUEST -> UNMASK  then the unmasked sum -> the strategy's server step -> commit

The library (`edge_sdk/secagg/`) does the cryptography; this module relays its bytes as SECAGG
messages (docs/PROTOCOL.md, "Secure aggregation over MQTT") and decides when a stage closes: a
device that has not answered by then has dropped, and the library carries on without it (its
masks rebuilt from its neighbours' shares) or refuses below the threshold, which aborts the round
with the reason. The quantization and noise, the supports and the mean change come from
`coordinator/secure_round.py`, as in `fedprune simulate`.

What the coordinator holds: each masked input is added into the server's running sum as it
arrives and stored nowhere (the task is marked accepted with an empty payload: the store holds no
device's input, masked or not); only the round's unmasked sum, decoded into the mean change, is
used. All key material and the running sum live in this process's memory only: a coordinator
that restarts (or a new leader) aborts the open round and opens a new one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_sdk.protocol.envelope import EnvelopeError
from edge_sdk.protocol.messages import (SecAggHeader, SecAggStage, SecureTask, SecureTensor,
                                        check_secagg_payload)
from edge_sdk.secagg import SecAggError, SecAggResult, SecAggServer

from ..secure_round import (SecureAggregate, SecureAggregation, SecureAggregationError,
                            check_task, global_offsets, layout_of)
from .states import TaskState

log = logging.getLogger("fedprune.coordinator")

# Each stage after the first may take this share of the round's deadline_seconds: the first
# (ADVERTISE) waits for training, up to the round's deadline; key exchange, masking and unmasking
# are seconds of work on a device.
STAGE_FRACTION = 0.25

# stage sent -> (the answer it asks for, the stage that follows)
_ANSWERS = {SecAggStage.SETUP: SecAggStage.ADVERTISE, SecAggStage.KEYS: SecAggStage.SHARES,
            SecAggStage.FORWARD: SecAggStage.MASKED, SecAggStage.UNMASK_REQUEST: SecAggStage.UNMASK}

class StageRefused(ValueError):
    """A stage message the coordinator will not take in; the text is the reason logged."""


@dataclass
class _Round:
    """The open round's stages: the library's server, who was asked and who answered."""

    number: int
    tasks: dict[str, str]                   # device -> task id
    server: SecAggServer
    deadline: float                         # the round's: the first stage closes by it
    stage_seconds: float
    asked: SecAggStage | None = None        # the stage sent last (None: SETUP not sent yet)
    waiting: set[str] = field(default_factory=set)
    closes_at: float = 0.0
    opened: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    result: SecAggResult | None = None


class SecureStages:
    """The service's secure aggregation: the run's quantization and noise (as the simulator's),
    and the stages of the open round."""

    def __init__(self, settings: Any, global_state: Mapping[str, np.ndarray],
                 devices_per_round: int, rounds: int, send: Callable[[str, SecAggHeader, bytes], None],
                 epoch: Callable[[], int]):
        self.settings = settings
        self.run = SecureAggregation(settings, global_state, devices_per_round, rounds)
        self.send, self.epoch = send, epoch
        self.round: _Round | None = None
        # Called with (stage, device) once a device's stage message is taken in, before anything
        # else is handled (tests stop a device at a chosen point with it).
        self.on_received: Callable[[str, str], None] | None = None

    # --- the round's tasks ---------------------------------------------------------------------
    def task_settings(self, task: Any, pipeline: Any, global_state: Mapping[str, np.ndarray]
                      ) -> SecureTask:
        """TASK's `secure_aggregation` for `task`: the quantization and noise, and where each
        uploaded tensor sits in the global vector."""
        offsets = global_offsets(global_state)
        q = self.run.quantize
        return SecureTask(clip_norm=q.clip, scale=q.scale, bits=q.bits, noise_sigma=q.noise_sigma,
                          tensors=[SecureTensor(name=name, offset=offsets[name],
                                                size=int(np.asarray(global_state[name]).size))
                                   for name in task.plan.uploaded])

    def open(self, number: int, tasks: Mapping[str, Any], task_ids: Mapping[str, str],
             pipeline: Any, global_state: Mapping[str, np.ndarray], deadline: float,
             deadline_seconds: float) -> None:
        """The round's server over the chosen devices' supports (known from their plans);
        SecureAggregationError when the round cannot run securely."""
        self.round = None
        if len(tasks) < 2:
            raise SecureAggregationError(f"{len(tasks)} device(s) chosen; secure aggregation "
                                         "needs at least 2")
        offsets = global_offsets(global_state)
        supports = {}
        for device, task in tasks.items():
            check_task(task)
            layout = layout_of(task, pipeline, offsets)
            for name, coordinates in layout.coordinates:
                if coordinates.size > 1 and not np.all(np.diff(coordinates) > 0):
                    raise SecureAggregationError(
                        f"secure_aggregation: {device}'s tensor {name} maps to global coordinates "
                        "out of order; the device could not place its entries from its support")
            supports[device] = layout.support
        server = self.run.server_for(supports)
        self.round = _Round(number, dict(task_ids), server, deadline,
                            STAGE_FRACTION * deadline_seconds)

    def close(self) -> None:
        """The round ended (committed, aborted) or this engine stopped leading: its state goes."""
        self.round = None

    # --- messages from devices -----------------------------------------------------------------
    def receive(self, header: SecAggHeader, payload: bytes, task: Any) -> None:
        """Take in one device's stage message; StageRefused with the reason otherwise. `task`:
        the device's TaskRow in the open round (None: it has none)."""
        current = self.round
        if current is None or header.round != current.number:
            raise StageRefused(f"round {header.round} has no secure-aggregation stage open")
        if task is None or task.task != header.task or current.tasks.get(header.device_id) != header.task:
            raise StageRefused(f"no task {header.task} for {header.device_id} in round {current.number}")
        try:
            check_secagg_payload(header, payload, sender_is_device=True)
        except EnvelopeError as exc:
            raise StageRefused(str(exc)) from None
        if current.asked is None or header.stage != _ANSWERS[current.asked]:
            expected = "nothing yet" if current.asked is None else _ANSWERS[current.asked].value
            raise StageRefused(f"a {header.stage.value} message while the round waits for "
                               f"{expected}")
        if header.device_id not in current.waiting:
            raise StageRefused(f"{header.device_id} was not asked for {header.stage.value} now "
                               "(answered already, or dropped at an earlier stage)")
        server = current.server
        receive = {SecAggStage.ADVERTISE: server.receive_advertise,
                   SecAggStage.SHARES: server.receive_shares,
                   SecAggStage.MASKED: server.receive_masked_input,
                   SecAggStage.UNMASK: server.receive_unmask}[header.stage]
        try:
            sender = receive(payload)
        except SecAggError as exc:
            raise StageRefused(str(exc)) from None
        if sender != header.device_id:
            raise StageRefused(f"the {header.stage.value} message inside names {sender}")
        current.waiting.discard(header.device_id)
        current.bytes[header.stage.value] = current.bytes.get(header.stage.value, 0) + len(payload)
        if self.on_received is not None:
            self.on_received(header.stage.value, header.device_id)

    # --- the clock -------------------------------------------------------------------------------
    def advance(self, now: float, tasks: Mapping[str, Any], all_sent: bool) -> str | None:
        """Closes the open stage when every device asked has answered (or refused its task) or its
        time is up, and sends the next. Returns "commit" once the sum is unmasked; raises
        SecureAggregationError with the reason when the round cannot complete."""
        current = self.round
        if current is None:
            return None
        if current.asked is None:
            if all_sent:  # after the tasks: a device takes its SETUP once it has trained
                self._ask(current, SecAggStage.SETUP, {d: current.server.setup_message(d)
                                                       for d in sorted(current.tasks)}, now)
                current.closes_at = current.deadline
            return None
        gone = {d for d, t in tasks.items() if t.state == TaskState.REFUSED}
        if current.waiting - gone and now < current.closes_at:
            return None
        stage = current.asked
        current.seconds[_ANSWERS[stage].value] = now - current.opened
        current.dropped[_ANSWERS[stage].value] = sorted(current.waiting)
        if current.waiting:
            log.warning("round %d: %s did not answer %s in time; dropped", current.number,
                        ", ".join(sorted(current.waiting)), stage.value)
        server = current.server
        try:
            if stage == SecAggStage.SETUP:
                self._ask(current, SecAggStage.KEYS, server.keys_messages(), now)
            elif stage == SecAggStage.KEYS:
                self._ask(current, SecAggStage.FORWARD, server.forward_messages(), now)
            elif stage == SecAggStage.FORWARD:
                self._ask(current, SecAggStage.UNMASK_REQUEST, server.unmask_requests(), now)
            else:
                current.result = server.result()
                return "commit"
        except SecAggError as exc:
            raise SecureAggregationError(f"secure aggregation stopped after {stage.value}: "
                                         f"{exc}") from None
        return None

    def _ask(self, current: _Round, stage: SecAggStage, messages: Mapping[str, bytes],
             now: float) -> None:
        current.asked, current.waiting, current.opened = stage, set(messages), now
        current.closes_at = now + current.stage_seconds
        for device, message in messages.items():
            current.bytes[stage.value] = current.bytes.get(stage.value, 0) + len(message)
            self.send(device, SecAggHeader(device_id=device, round=current.number,
                                           task=current.tasks[device], stage=stage,
                                           leader_epoch=self.epoch()), message)
        log.info("round %d: secure aggregation: %s sent to %d devices", current.number,
                 stage.value, len(messages))

    # --- commit ----------------------------------------------------------------------------------
    def aggregate(self, global_state: Mapping[str, np.ndarray], committed_summaries
                  ) -> tuple[SecureAggregate, dict[str, Any]]:
        """The unmasked round's mean change (secure_round's, as the simulator's) and what the
        round's summary keeps of it. `committed_summaries`: earlier rounds', whose
        noise multipliers the privacy ledger is read from (a restart keeps the spending)."""
        current = self.round
        result = current.result
        started = time.perf_counter()
        self.run.history = [(1.0, s["secure_aggregation"]["noise_multiplier"])
                            for s in committed_summaries
                            if (s or {}).get("secure_aggregation", {}).get("noise_multiplier")]
        mean = self.run.mean(global_state, result)
        report = {"devices": len(current.tasks), "bits": self.run.quantize.bits,
                  "threshold": self.run.threshold_used, "survivors": len(result.survivors),
                  "dropped_before_input": list(result.dropped),
                  "dropped_at": current.dropped,
                  "recovered": sorted(set(current.dropped.get("unmask", []))
                                      & set(result.survivors)),
                  "released_coordinates": int(np.count_nonzero(result.released)),
                  "withheld_coordinates": int(np.count_nonzero((result.holders > 0)
                                                               & ~result.released)),
                  "noise_shares": result.min_released_holders, "stage_bytes": current.bytes,
                  "bytes_up": sum(current.bytes.get(stage.value, 0) for stage in _ANSWERS.values()),
                  "bytes_down": sum(current.bytes.get(stage.value, 0) for stage in _ANSWERS),
                  "stage_seconds": {**current.seconds,
                                    "decode": time.perf_counter() - started},
                  **self.run.spend(result.min_released_holders)}
        return mean, report
