"""The device's MQTT loop: register, take tasks, train (with DP), answer, survive disconnects.

The connection is the shared `MqttTransport` (edge_sdk/protocol/transport.py): paho runs the
network in its own thread (keepalives continue while the device trains); received messages go into
its inbox, which `run` drains one at a time, so training, state and ledger are only ever touched by
one thread. Sessions are persistent (clean_session=False) and every publish is QoS 1, so a task
sent while the device was offline arrives when it returns, and an update is resent from the outbox
(on every reconnect, and every `resend_seconds` while connected) until the coordinator
acknowledges it. Everything the agent sends goes through its `publish` (the transport's unless
one is injected, as tests do) and is built from its header model (`encode_message`).

Every message is hostile until proven otherwise: `handle` never raises. A message that can never
be handled (unparseable, forged, naming a path, asking for less privacy than the device's own
config allows) is acknowledged to the broker, so it is not redelivered forever, and reported: a
REFUSAL when it names a task of this device, a log line with the reason otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from ..checkpoint import Checkpoint, load_checkpoint
from ..client import LocalClient
from ..data.sources import device_data
from ..models import ModelSpec, SpecError, allow_reference, check_structure, model_names
from ..models.network import load_toolchain
from ..plan import SubmodelPlan
from ..protocol import (AckHeader, ArtifactHeader, Envelope, EnvelopeError, MessageType,
                        RefusalCode, RefusalHeader, RegisterHeader, StatusHeader, TaskHeader,
                        Topics, UpdateHeader, decode_envelope, encode_message, parse_header,
                        peek_header)
from ..protocol.messages import (MAX_EPSILON, MAX_SAMPLES, MAX_SKIP_REASONS, SecAggHeader,
                                 SecAggStage, SecureTask, check_secagg_payload)
from ..secagg import SecAggError
from ..secagg.messages import decode_setup
from ..secagg.quantize import QuantizeSettings
from ..secagg.supports import from_ranges
from ..secure_update import SecureDevice, SecureLayout
from ..protocol.signing import load_public_key, verify
from ..protocol.topics import COORDINATOR_TO_DEVICE, check_id
from ..protocol.transport import MqttTransport, TransportError
from ..runtime.bundle_files import ManifestError, unpack
from ..runtime.manifest import BundleManifest, artifact_file_name
from ..runtime.predictor import MAX_ARTIFACT_BYTES
from ..training import PrivacyLedger
from ..settings import DPSettings
from ..validation import describe
from .config import EdgeSettings
from .state import DeviceState, StateError, check_plain_name, task_key

log = logging.getLogger("fedprune.edge")

# Signed by the coordinator when the device holds its key: nothing else is acted upon.
_SIGNED_TYPES = (MessageType.TASK, MessageType.ACK, MessageType.ARTIFACT, MessageType.SECAGG)

# publish(topic, payload, retain=False): QoS 1, as `MqttTransport.publish`.
Publish = Callable[..., object]


def mqtt_client_id(config) -> str:
    """The device's MQTT client id: its user name where the broker has credentials (it binds the
    two), else `<fleet>.<device_id>`: device ids are unique within a fleet, client ids must be
    unique on the broker, and two fleets (two demos) on one broker both have a `dev-00`."""
    return config.username or f"{config.fleet}.{config.device_id}"

class ArtifactRefused(ValueError):
    """An exported model the device will not store; the text is the reason sent back."""


def load_profile_dict(config: EdgeSettings, state: DeviceState) -> dict[str, Any]:
    """"catalogue:<name>", a profile JSON path, or "measure": profile this device once (quick
    compute tests, link measured through the broker) and keep the result in the state dir."""
    from device_profiles import catalogue_profile, load_profile

    spec = config.profile
    if spec.startswith("catalogue:"):
        return catalogue_profile(spec.split(":", 1)[1]).model_dump(mode="json")
    if spec == "measure":
        measured = state.root / "profile.json"
        if not measured.exists():
            from ..profiling import measure_profile
            log.info("measuring this device's profile (once; kept in %s)", measured)
            # The link test connects as the agent does: its broker, credentials and fleet CA.
            profile = measure_profile(
                name=config.device_id, broker=config.broker, quick=True, disk_path=state.root,
                progress=False, username=config.username, password=config.password,
                tls_ca=config.tls_ca,
                topic=Topics(config.fleet, config.topic_prefix).profile(config.device_id))
            profile.save(measured)
        spec = str(measured)
    return load_profile(spec).model_dump(mode="json")


class EdgeAgent:
    def __init__(self, config: EdgeSettings, publish: Publish | None = None):
        self.config = config
        # Loading the data and the toolchain can take a while: say first what will connect where.
        log.info("device %s of fleet %s: loading its profile, data and model toolchain, then "
                 "connecting to the broker at %s", config.device_id, config.fleet, config.broker)
        for reference in config.models:  # registered by the config's validation; again if copied
            allow_reference(reference)
        self.topics = Topics(config.fleet, config.topic_prefix)
        self.state = DeviceState(config.state_dir)
        self.profile = load_profile_dict(config, self.state)
        # The device's own samples, split here; only counts (usable, skipped by reason) leave it.
        loaded = device_data(config.data)
        self.data = loaded.data.with_train_limit(config.max_samples)
        self.data_contract, self.data_skipped, self.data_name = \
            loaded.contract, loaded.skipped, loaded.name
        load_toolchain()  # before registering: a task's deadline runs from when it is sent
        self.client: LocalClient | None = None
        self.stopping = threading.Event()
        self.coordinator_key = load_public_key(config.coordinator_key) if config.coordinator_key else None
        self._sent_at: dict[str, float] = {}  # outbox key -> monotonic time it was last published
        self.fence = self.state.load_fence()  # the newest leader epoch and round acted on
        self.unhandled = 0  # messages acknowledged without being handled (poison, forgeries)
        # Secure aggregation: the trained task whose stages are open (its SecAggClient, its
        # change), in memory only, and a SETUP that came before its task had trained.
        self.secure: _SecureTask | None = None
        self.early_setup: tuple[SecAggHeader, bytes] | None = None
        device = config.device_id
        # The last will says offline (retained); `stop` publishes it too on a clean shutdown.
        self.transport = MqttTransport(
            mqtt_client_id(config), config.broker, username=config.username, password=config.password,
            tls_ca=config.tls_ca, keepalive=config.keepalive,
            subscriptions=self.topics.device_subscriptions(device), on_connect=self._on_connect,
            will=(self.topics.status(device), self._status(False)), logger=log)
        self.inbox, self.connected = self.transport.inbox, self.transport.connected
        self.publish: Publish = publish or self.transport.publish

    # --- connection ------------------------------------------------------------------------
    def _on_connect(self) -> None:
        """Run by the transport on every (re)connection, once the subscriptions are made."""
        device = self.config.device_id
        self.publish(self.topics.status(device), self._status(True), retain=True)
        # Retained: a coordinator that starts (or restarts) later still sees every registration.
        self.publish(self.topics.register(device), self._registration(), retain=True)
        for key in self.state.outbox_keys():  # every unacknowledged update, same key
            self._resend(key)

    def _status(self, online: bool) -> bytes:
        return encode_message(StatusHeader(device_id=self.config.device_id, online=online))

    def _registration(self) -> bytes:
        ledger = self.state.load_ledger()
        model_file = self.state.root / "model.pt"
        digest = load_checkpoint(model_file).spec.digest() if model_file.exists() else None
        return encode_message(RegisterHeader(
            device_id=self.config.device_id, profile=self.profile,
            num_samples=len(self.data.train_y), formats=list(self.config.formats),
            sdk_version=_sdk_version(), epsilon_budget=self.config.epsilon_budget,
            epsilon_spent=ledger.epsilon() if ledger else None, model_digest=digest,
            skipped=_bounded(self.data_skipped)))

    # --- main loop -------------------------------------------------------------------------
    def start(self) -> None:
        self.transport.start()

    def stop(self) -> None:
        self.stopping.set()
        self.transport.stop()

    def run(self, until: float | None = None) -> None:
        """Handle messages until stopped (or until the unix time `until`).

        Every message is acknowledged once handled, including one that could not be: `handle`
        has reported it, and redelivering it would only fail again on every reconnect.
        """
        self.start()
        give_up = self.config.broker_give_up_seconds
        try:
            while not self.stopping.is_set() and (until is None or time.time() < until):
                if self.connected.is_set():
                    self.resend_overdue()
                elif give_up is not None and (why := self.transport.unreachable(give_up)):
                    raise TransportError(
                        f"{why}. Check that the broker runs and that edge.toml's broker (address "
                        "and port), username/password and tls_ca are right; "
                        "broker_give_up_seconds sets how long to try")
                try:
                    delivery = self.inbox.get(timeout=0.5)
                except queue.Empty:
                    continue
                self.handle(delivery.topic, delivery.payload)
                self.transport.ack(delivery.mid, delivery.qos)
        finally:
            self.stop()

    def resend_overdue(self) -> None:
        """Publish again every update still unacknowledged `resend_seconds` after it was sent:
        a coordinator that could not store it (and so did not acknowledge it) gets it again
        without waiting for a reconnect. The coordinator counts an update once per (device,
        round, task), so resending one whose ACK is merely late costs bandwidth, never a count.
        """
        now = time.monotonic()
        for key, sent_at in list(self._sent_at.items()):  # the network thread may add keys
            if now - sent_at >= self.config.resend_seconds:
                self._resend(key)

    def _resend(self, key: str) -> None:
        envelope = self.state.outbox_entry(key)
        if envelope is None:  # acknowledged meanwhile
            self._sent_at.pop(key, None)
            return
        log.info("resending unacknowledged update %s", key)
        self._publish_update(key, envelope)

    def _publish_update(self, key: str, envelope: bytes) -> None:
        self._sent_at[key] = time.monotonic()
        self.publish(self.topics.update(self.config.device_id), envelope)

    def handle(self, topic: str, payload: bytes) -> None:
        """Handle one message. Never raises: whatever a message causes is caught and reported."""
        try:
            self._dispatch(topic, payload)
        except Exception as exc:  # noqa: BLE001 - no message may stop the device
            self._report_unhandled(topic, payload, exc)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        envelope = decode_envelope(payload, self.config.max_payload_bytes)
        kind, device = self.topics.device_of(topic)
        if device != self.config.device_id or COORDINATOR_TO_DEVICE.get(kind) != envelope.type:
            raise EnvelopeError(f"a {envelope.type.name} message does not belong on {topic}")
        if self.coordinator_key is not None and envelope.type in _SIGNED_TYPES:
            try:
                verify(envelope.header, envelope.payload, self.coordinator_key)
            except EnvelopeError as exc:
                self._refuse_forged(envelope, exc)
                return
        header = parse_header(envelope)
        if header.device_id != self.config.device_id:
            raise EnvelopeError(f"the header names device {header.device_id!r}, not this one")
        if envelope.type == MessageType.TASK:
            self._on_task(header, envelope.payload)
        elif envelope.type == MessageType.SECAGG:
            self._on_stage(header, envelope.payload)
        elif envelope.type == MessageType.ACK:
            self._on_ack(header)
        else:
            self._on_artifact(header, envelope.payload)

    def _report_unhandled(self, topic: str, payload: bytes, error: Exception) -> None:
        """Tell the coordinator why, if the message names one of this device's tasks."""
        self.unhandled += 1
        reason = f"{type(error).__name__}: {error}"[:2000]
        if not isinstance(error, ValueError):  # not a refusal of bad input: a bug to look at
            log.error("message on %s could not be handled", topic, exc_info=error)
        log.warning("acknowledged a message on %s that cannot be handled (%s)", topic, reason)
        named = self._named_task(payload)
        if named is None:
            return
        kind, round_number, task = named
        if kind == MessageType.ARTIFACT:
            self._send_refusal(round_number + 1, task, RefusalCode.BAD_ARTIFACT,
                               f"artifact refused: {reason}")
        elif kind == MessageType.TASK:
            code = RefusalCode.BAD_TASK if isinstance(error, ValueError) else RefusalCode.INTERNAL
            self._send_refusal(round_number, task, code, f"task cannot be handled: {reason}")

    def _named_task(self, payload: bytes) -> tuple[MessageType, int, str] | None:
        """(type, round, task) a TASK or ARTIFACT message names for this device, if it can be
        read, and, when the device holds the coordinator's key, only if it is signed by it."""
        try:
            if self.coordinator_key is not None:
                envelope = decode_envelope(payload, self.config.max_payload_bytes)
                verify(envelope.header, envelope.payload, self.coordinator_key)
                kind, header = envelope.type, envelope.header
            else:
                kind, header = peek_header(payload)
            round_number, task = header.get("round"), header.get("task")
            first = 0 if kind == MessageType.ARTIFACT else 1  # an artifact's task is the next round's
            if kind not in (MessageType.TASK, MessageType.ARTIFACT) or \
                    header.get("device_id") != self.config.device_id or \
                    type(round_number) is not int or round_number < first:
                return None
            check_id("task id", task)  # a task id that is not an id is not repeated back
            return kind, round_number, task
        except Exception:  # noqa: BLE001 - unreadable: the log line is all that can be done
            return None

    # --- tasks -----------------------------------------------------------------------------
    def _on_task(self, header: TaskHeader, payload: bytes) -> None:
        device = self.config.device_id
        key = task_key(header.round, header.task)
        done = self.state.tasks().get(key)
        if done is not None:  # a redelivered task: answer again, never train twice
            pending = self.state.outbox_entry(key)
            if pending is not None:
                self._publish_update(key, pending)
            log.info("task %s already %s", key, done)
            return
        stale = self.fence.stale(f"the task of round {header.round}", header.leader_epoch,
                                 header.round)
        if stale is not None:  # not recorded: the answer is the same whenever it comes again
            self._refuse(header, RefusalCode.STALE, stale, record=False)
            return
        self.secure = None  # a new task supersedes the stages of an earlier one
        dp = self._task_dp(header)
        client = self._client(header, dp)
        try:
            plan = SubmodelPlan.from_dict(header.plan)
            charge = client.dp_charge(plan)
        except (ValueError, TypeError, KeyError) as exc:
            self._refuse(header, RefusalCode.BAD_TASK, f"task cannot be run as sent: {exc}")
            return
        problem = self._model_problem(plan.spec) or \
            self.data_contract.mismatch(plan.spec.input_shape, plan.spec.num_classes)
        if problem is not None:
            self._refuse(header, RefusalCode.BAD_TASK, problem)
            return
        breach = self._privacy_breach(dp, charge)
        if breach is not None:
            self._refuse(header, RefusalCode.PRIVACY_POLICY, breach)
            return
        log.info("round %d: task at width %g, physical batch %s, %s local samples, upload %s "
                 "keep %g", header.round, header.width_ratio, client.train_config.physical_batch_size,
                 plan.local_samples or "all", plan.upload_dtype, plan.upload_keep)
        started = time.perf_counter()
        try:
            outcome = client.run_task(plan, payload)
        except ValueError as exc:  # TaskError, CodecError: the task itself is wrong
            self._refuse(header, RefusalCode.BAD_TASK, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - report, don't die: the fleet keeps going
            log.exception("training failed")
            self._refuse(header, RefusalCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        if outcome.refused:
            self._refuse(header, RefusalCode.PRIVACY_BUDGET, outcome.refused, outcome.epsilon)
            return
        if outcome.epsilon is not None and not outcome.epsilon <= MAX_EPSILON:
            # Even a device with no privacy policy cannot report this: the protocol bounds epsilon
            # so that every sum of it stays finite, and such noise protects nothing anyway.
            self._refuse(header, RefusalCode.PRIVACY_POLICY,
                         f"the task would bring this device's epsilon to {outcome.epsilon:.3g}, over "
                         f"the {MAX_EPSILON:g} an update can report: send more noise")
            return
        if header.secure_aggregation is not None:
            self._keep_for_secure_aggregation(header, plan, client, outcome, started)
            return
        envelope = encode_message(UpdateHeader(
            device_id=device, round=header.round, task=header.task,
            num_samples=outcome.num_samples, epsilon=outcome.epsilon,
            train_seconds=time.perf_counter() - started, local_accuracy=client.evaluate(),
            payload_sha256=hashlib.sha256(outcome.payload).hexdigest()), outcome.payload)
        if len(envelope) > self.config.max_payload_bytes:
            self._refuse(header, RefusalCode.BAD_TASK, f"the update is {len(envelope):,} bytes, over "
                         f"the fleet's limit of {self.config.max_payload_bytes:,}; plan a smaller "
                         "upload (fp16, sparser) for this device")
            return
        # Accepted: what it spent, what it trained and the round it acted on are saved before
        # the update is sent (a refused task, above, saved none of them).
        if client.ledger is not None:
            self.state.save_ledger(client.ledger)
        self._save_models(client, plan.spec.name, header)
        self._advance_fence(header.leader_epoch, header.round)
        self.state.put_outbox(key, envelope)  # on disk before it is sent: a crash resends it
        self.state.mark(key, "sent")
        self._publish_update(key, envelope)
        log.info("round %d: sent %d-byte update (epsilon %s)", header.round, len(envelope),
                 f"{outcome.epsilon:.3f}" if outcome.epsilon is not None else "n/a")

    # --- secure aggregation ----------------------------------------------------------------
    def _keep_for_secure_aggregation(self, header: TaskHeader, plan: SubmodelPlan,
                                     client: LocalClient, outcome, started: float) -> None:
        """The task trained: nothing is sent in the clear. Its change stays in memory for the
        round's stages (a restart loses it: that round goes on without this device)."""
        key = task_key(header.round, header.task)
        device = SecureDevice(self.config.device_id, client)
        device.keep_upload(outcome, plan.uploaded)
        report = {"num_samples": outcome.num_samples, "epsilon": outcome.epsilon,
                  "train_seconds": min(time.perf_counter() - started, 1e7),
                  "local_accuracy": client.evaluate()}
        if client.ledger is not None:
            self.state.save_ledger(client.ledger)
        self._save_models(client, plan.spec.name, header)
        self._advance_fence(header.leader_epoch, header.round)
        self.state.mark(key, "secure")
        self.secure = _SecureTask(header.round, header.task, header.secure_aggregation, device,
                                  report)
        log.info("round %d: trained; the change waits for the round's secure aggregation",
                 header.round)
        early, self.early_setup = self.early_setup, None
        if early is not None and (early[0].round, early[0].task) == (header.round, header.task):
            self._on_stage(*early)

    def _on_stage(self, header: SecAggHeader, payload: bytes) -> None:
        """One secure-aggregation stage: the library's answer goes back on secagg_up. A message
        the library refuses raises (SecAggError: logged, acknowledged); the device's step stays
        where it was, ready for the genuine message."""
        check_secagg_payload(header, payload, sender_is_device=False)
        task = self.secure
        if task is None or (task.round, task.task) != (header.round, header.task):
            if header.stage == SecAggStage.SETUP and                     task_key(header.round, header.task) not in self.state.tasks():
                self.early_setup = (header, payload)  # its task has not been handled yet
                return
            raise SecAggError(f"no secure-aggregation state for task "
                              f"{task_key(header.round, header.task)} on this device (not "
                              "trained here, or it restarted since)")
        digest = hashlib.sha256(payload).digest()
        if task.answers.get(header.stage, (None,))[0] == digest:  # a QoS 1 redelivery
            self.publish(self.topics.secagg_up(self.config.device_id), task.answers[header.stage][1])
            return
        device, report = task.device, {}
        if header.stage == SecAggStage.SETUP:
            answer = device.setup(payload, _layout(payload, task.settings, device),
                                  QuantizeSettings(task.settings.clip_norm, task.settings.scale,
                                                   task.settings.bits, task.settings.noise_sigma))
        elif header.stage == SecAggStage.KEYS:
            answer = device.share_keys(payload)
        elif header.stage == SecAggStage.FORWARD:
            answer, report = device.mask_input(payload), task.report
        else:
            answer = device.unmask(payload)  # the device's secrets are gone from here on
        stage = {SecAggStage.SETUP: SecAggStage.ADVERTISE, SecAggStage.KEYS: SecAggStage.SHARES,
                 SecAggStage.FORWARD: SecAggStage.MASKED,
                 SecAggStage.UNMASK_REQUEST: SecAggStage.UNMASK}[header.stage]
        message = encode_message(SecAggHeader(
            device_id=self.config.device_id, round=header.round, task=header.task, stage=stage,
            **report), answer)
        task.answers[header.stage] = (digest, message)
        self.publish(self.topics.secagg_up(self.config.device_id), message)
        log.info("round %d: secure aggregation: answered %s (%d bytes)", header.round,
                 header.stage.value, len(answer))

    def _model_problem(self, spec: ModelSpec) -> str | None:
        """Why this device cannot build the task's model as the coordinator did, if it cannot:
        it has no model of that name, the model fails to load or build, or it builds a network
        of another structure (both digests named)."""
        if spec.name not in model_names():
            return _unknown_model(spec.name, self.config.models)
        try:
            check_structure(spec)
        except SpecError as exc:
            return str(exc)
        return None

    def _task_dp(self, header: TaskHeader) -> DPSettings | None:
        """The task's DP settings with the device's own budget (never the coordinator's)."""
        if header.dp is None:
            return None
        return header.dp.model_copy(update={"epsilon_budget": self.config.epsilon_budget})

    def _privacy_breach(self, dp: DPSettings | None,
                        charge: tuple[float, float, int] | None) -> str | None:
        """Why the task asks for less privacy than this device's config allows, if it does.
        `charge`: (noise, sample rate, steps) the task would train at (`LocalClient.dp_charge`)."""
        config = self.config
        if not config.dp_required:
            return None
        if dp is None:
            return ("this device trains only with differential privacy (its edge.toml sets "
                    f"{'epsilon_budget' if config.epsilon_budget is not None else 'require_dp'}) "
                    "and the task has no dp settings; send it with dp")
        if not dp.delta <= config.dp_delta:
            return (f"the task's dp.delta {dp.delta:g} is above this device's dp_delta "
                    f"{config.dp_delta:g}; a larger delta is a weaker guarantee. Send "
                    f"dp.delta <= {config.dp_delta:g}")
        noise, rate, steps = charge
        if not noise >= config.min_noise_multiplier:
            return (f"the task trains at noise multiplier {noise:.3g}, below this device's "
                    f"min_noise_multiplier {config.min_noise_multiplier:g} (edge.toml); send a "
                    f"dp.noise_multiplier >= {config.min_noise_multiplier:g}, or a smaller "
                    "dp.target_epsilon or more planned rounds")
        epsilon = PrivacyLedger(config.dp_delta, accountant=dp.accountant).epsilon([charge])
        if not epsilon <= config.max_task_epsilon:
            return (f"this task alone would spend epsilon {epsilon:.3g} at delta "
                    f"{config.dp_delta:g} (noise {noise:.3g}, sample rate {rate:.4f}, {steps} "
                    f"steps), over this device's max_task_epsilon {config.max_task_epsilon:g} "
                    "(edge.toml); send more noise, fewer epochs or fewer local samples")
        return None

    def _client(self, header: TaskHeader, dp: DPSettings | None) -> LocalClient:
        """The device's trainer for this task. Its settings (train, dp, planned rounds) are the
        task's; what it carries over from earlier tasks (ledger, model) is read from disk, as
        the last task the device accepted saved it, so a refused task leaves nothing behind and
        a restart changes nothing. The ledger's budget and delta are the device's own."""
        if self.client is None:  # kept in memory for what is not saved: HideNseek's scores
            self.client = LocalClient(self.data, header.train, secret_noise=True)
        client = self.client
        client.train_config, client.dp, client.planned_rounds = header.train, dp, header.planned_rounds
        client.selection_rate = header.selection_rate
        client.ledger = self.state.load_ledger()
        if client.ledger is None and dp is not None:
            client.ledger = PrivacyLedger(self.config.dp_delta, accountant=dp.accountant)
        if client.ledger is not None:  # the history re-accounts exactly at any delta
            client.ledger.budget_epsilon = self.config.epsilon_budget
            client.ledger.delta = self.config.dp_delta
        model_file, sent_file = self.state.root / "model.pt", self.state.root / "sent.pt"
        saved = load_checkpoint(model_file) if model_file.exists() else None
        client.spec, client.state = (saved.spec, saved.state) if saved is not None else (None, {})
        client.personal_state = None
        if saved is not None and sent_file.exists():  # model.pt is the personal model
            client.personal_state, client.state = saved.state, load_checkpoint(sent_file).state
        return client

    def _save_models(self, client: LocalClient, model_name: str, header: TaskHeader) -> None:
        """model.pt: the model this device uses (the personal model); sent.pt: what DP-SGD
        trained, whose private tensors start its next DP training, when the two differ."""
        def checkpoint(state):
            return Checkpoint(client.spec, state, model_name, self.data_name,
                              self.config.device_id, header.round, header.width_ratio)
        sent_file = self.state.root / "sent.pt"
        if client.personal_state is None:
            checkpoint(client.state).save(self.state.root / "model.pt")
            sent_file.unlink(missing_ok=True)
            return
        checkpoint(client.state).save(sent_file)
        checkpoint(client.personal_state).save(self.state.root / "model.pt")

    def _advance_fence(self, leader_epoch: int, round_number: int) -> None:
        """Remember (on disk) the newest leader epoch and round this device has acted on."""
        fence = self.fence.advanced(leader_epoch, round_number)
        if fence != self.fence:
            self.state.save_fence(fence)
            self.fence = fence

    def _refuse(self, header: TaskHeader, code: RefusalCode, message: str,
                epsilon: float | None = None, record: bool = True) -> None:
        self._send_refusal(header.round, header.task, code, message, epsilon, record)

    def _send_refusal(self, round_number: int, task: str, code: RefusalCode, message: str,
                      epsilon: float | None = None, record: bool = False) -> None:
        """REFUSAL for (round, task); `record` marks the task refused so it is never run. Not
        for forgeries (their id must not block the real task) nor for a refused artifact (the
        task it came with is unaffected)."""
        key = task_key(round_number, task)
        if record:
            self.state.mark(key, "refused")
        log.warning("refusing task %s (%s): %s", key, code.value, message)
        self.publish(self.topics.refusal(self.config.device_id), encode_message(RefusalHeader(
            device_id=self.config.device_id, round=round_number, task=task, code=code,
            message=message[:4000], epsilon=epsilon)))

    def _refuse_forged(self, envelope: Envelope, error: EnvelopeError) -> None:
        """A message that is not the coordinator's is never acted upon; a forged task is
        answered if it names one (not recorded: its id must not block the real task)."""
        self.unhandled += 1
        log.warning("ignoring a %s message not signed by the coordinator: %s",
                    envelope.type.name, error)
        if envelope.type == MessageType.TASK:
            try:
                header = parse_header(envelope)
                self._refuse(header, RefusalCode.BAD_TASK, f"refused: {error}", record=False)
            except (EnvelopeError, StateError):
                return

    def _on_ack(self, header: AckHeader) -> None:
        key = task_key(header.round, header.task)
        if key not in self.state.tasks():
            log.warning("ACK for %s, an update this device never sent; ignored", key)
            return
        self.state.drop_outbox(key)
        self._sent_at.pop(key, None)
        self.state.mark(key, "acked" if header.accepted else "rejected")
        if not header.accepted:
            log.warning("coordinator rejected update %s: %s", key, header.reason)

    # --- artifacts -------------------------------------------------------------------------
    def _on_artifact(self, header: ArtifactHeader, payload: bytes) -> None:
        starts = header.round + 1  # the round whose task it comes with, which a refusal names
        stale = self.fence.stale(f"the artifact of round {header.round} (the model round {starts} "
                                 "starts from)", header.leader_epoch, starts)
        if stale is not None:
            self._send_refusal(starts, header.task, RefusalCode.STALE, stale)
            return
        try:
            manifest, name = self._checked_artifact(header, payload)
        except ArtifactRefused as exc:
            self._send_refusal(starts, header.task, RefusalCode.BAD_ARTIFACT, str(exc))
            return
        self.state.save_artifact(manifest, name, payload)
        self._advance_fence(header.leader_epoch, starts)
        log.info("round %d: stored exported model %s", header.round, name)

    def _checked_artifact(self, header: ArtifactHeader, payload: bytes) -> tuple[dict, str]:
        """The manifest to store (one entry, under the device's own file names) and the name of
        the compressed file, once the manifest validates and the payload matches its sha256."""
        try:
            manifest = BundleManifest.model_validate(header.manifest)
        except ValidationError as exc:
            raise ArtifactRefused(f"the manifest is invalid: {describe(exc, 'manifest')}") from None
        entry = next((a for a in manifest.artifacts if a.compressed_path == header.artifact), None)
        if entry is None:
            raise ArtifactRefused(f"the message names artifact {header.artifact[:200]!r}, which "
                                  "its manifest does not list")
        try:  # never used as paths (the device names its files), but a sender that tries is refused
            check_plain_name(entry.path), check_plain_name(entry.compressed_path)
        except StateError as exc:
            raise ArtifactRefused(f"the manifest's artifact names a path: {exc}") from None
        if len(payload) != entry.compressed_bytes:
            raise ArtifactRefused(f"the payload is {len(payload):,} bytes, the manifest says "
                                  f"{entry.compressed_bytes:,}")
        _check_decompressed(payload, entry.bytes, entry.sha256)
        name = artifact_file_name(entry.format, entry.precision)
        stored = entry.model_copy(update={"path": name, "compressed_path": f"{name}.zst"})
        return manifest.model_copy(update={"artifacts": (stored,)}).model_dump(mode="json"), \
            stored.compressed_path


class _SecureTask:
    """A trained task waiting for its secure-aggregation stages (memory only)."""

    def __init__(self, round_number: int, task: str, settings: SecureTask, device: SecureDevice,
                 report: dict[str, Any]):
        self.round, self.task, self.settings, self.device, self.report = \
            round_number, task, settings, device, report
        # stage received -> (sha256 of its payload, the answer sent): a redelivered stage message
        # is answered again with the same bytes, never with new keys or a new masked input
        self.answers: dict[SecAggStage, tuple[bytes, bytes]] = {}


def _layout(setup: bytes, settings: SecureTask, device: SecureDevice) -> SecureLayout:
    """Where this device's uploaded entries sit in the global vector: its support as SETUP names
    it (which the library then checks against the parameters' digest), split by the tensor spans
    TASK gave; each span must hold exactly as many coordinates as the device trained entries of
    that tensor, and the spans all of the support."""
    parsed = decode_setup(setup)
    support = from_ranges(*parsed.supports[parsed.recipient]) \
        if parsed.recipient in parsed.supports else None
    if support is None:
        raise SecAggError("SETUP carries no support for this device")
    names = {t.name for t in settings.tensors}
    trained = set(device.client.state) & set(device.client.started)
    if not names <= trained:
        raise SecAggError(f"TASK's secure_aggregation names tensors {sorted(names - trained)} "
                          "this device did not train")
    coordinates, placed = [], 0
    for tensor in settings.tensors:
        inside = support[(support >= tensor.offset) & (support < tensor.offset + tensor.size)]
        entries = device.client.state[tensor.name].numel()
        if inside.size != entries:
            raise SecAggError(f"SETUP's support holds {inside.size} coordinates of tensor "
                              f"{tensor.name}, which has {entries} entries on this device")
        coordinates.append((tensor.name, inside))
        placed += inside.size
    if placed != support.size:
        raise SecAggError(f"SETUP's support has {support.size - placed} coordinates outside the "
                          "tensors TASK names")
    return SecureLayout(tuple(coordinates))


def _unknown_model(name: str, listed: tuple[str, ...]) -> str:
    """The refusal of a task naming a model this device does not have, and what to set."""
    has = f"edge.toml's models lists {', '.join(listed)}" if listed else "edge.toml lists no models"
    if ":" in name:
        return (f"this device has no model {name!r} ({has}): add it to models in edge.toml, e.g. "
                f"models = {json.dumps([*listed, name])}, with its module beside edge.toml or its "
                "package installed, and restart the device")
    return (f"this device has no model {name!r}: it is neither built in nor a fedprune.models "
            f"entry point installed here ({has}); install the package that provides it, or list "
            "its package.module:function in edge.toml's models, and restart the device")


def _check_decompressed(packed: bytes, size: int, sha256: str) -> None:
    """Refuse unless `packed` decompresses to exactly `size` bytes with this sha256 (the
    runtime's bounded `unpack`: a decompression bomb costs at most `size` + 1 bytes)."""
    if size > MAX_ARTIFACT_BYTES:
        raise ArtifactRefused(f"the manifest says {size:,} bytes; the limit is {MAX_ARTIFACT_BYTES:,}")
    try:
        digest = hashlib.sha256(unpack(packed, size, "the payload")).hexdigest()
    except ManifestError as exc:
        raise ArtifactRefused(str(exc)) from None
    if digest != sha256:
        raise ArtifactRefused(f"the decompressed artifact has sha256 {digest[:16]}..., "
                              f"the manifest says {sha256[:16]}...: corrupt or replaced")


def _bounded(skipped: dict[str, int]) -> dict[str, int]:
    """Skip counts within REGISTER's bounds: a plug-in source with more reasons than the header
    carries reports its rarest ones together as `other`."""
    if len(skipped) <= MAX_SKIP_REASONS:
        return {reason: min(count, MAX_SAMPLES) for reason, count in skipped.items()}
    ranked = sorted(skipped.items(), key=lambda kv: -kv[1])
    kept = dict(ranked[:MAX_SKIP_REASONS - 1])
    kept["other"] = kept.get("other", 0) + sum(count for _, count in ranked[MAX_SKIP_REASONS - 1:])
    return {reason: min(count, MAX_SAMPLES) for reason, count in kept.items()}


def _sdk_version() -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version("fedprune")
    except importlib.metadata.PackageNotFoundError:
        return "dev"
