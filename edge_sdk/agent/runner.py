"""The device's MQTT loop: register, take tasks, train (with DP), answer, survive disconnects.

paho runs the network in its own thread (keepalives continue while the device trains); received
messages go into a queue that `run` drains one at a time, so training, state and ledger are only
ever touched by one thread. Sessions are persistent (clean_session=False) and every publish is
QoS 1, so a task sent while the device was offline arrives when it returns, and an update is
resent from the outbox until the coordinator acknowledges it.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from ..checkpoint import Checkpoint, load_checkpoint
from ..client import LocalClient
from ..data import client_data_for, load_dataset
from ..plan import SubmodelPlan
from ..protocol import (AckHeader, ArtifactHeader, EnvelopeError, MessageType, RefusalCode,
                        TaskHeader, Topics, decode_envelope, encode_envelope, parse_header)
from ..training import DPConfig, PrivacyLedger, TrainConfig
from ..protocol.signing import load_public_key, verify
from ..protocol.transport import make_client
from .config import EdgeConfig
from .state import DeviceState, task_key

log = logging.getLogger("fedprune.edge")


def load_profile_dict(config: EdgeConfig, state: DeviceState) -> dict[str, Any]:
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
            profile = measure_profile(name=config.device_id, broker=config.broker, quick=True,
                                      disk_path=state.root, progress=False)
            measured.write_text(profile.model_dump_json(indent=2))
        spec = str(measured)
    return load_profile(spec).model_dump(mode="json")


class EdgeAgent:
    def __init__(self, config: EdgeConfig):
        self.config = config
        self.topics = Topics(config.fleet, config.topic_prefix)
        self.state = DeviceState(config.state_dir)
        self.profile = load_profile_dict(config, self.state)
        source = load_dataset(config.data.dataset, config.data.data_dir)
        data = client_data_for(source, config.data.clients, config.data.partition,
                               config.data.seed, config.data.client_id)
        if config.max_samples and len(data.train_y) > config.max_samples:
            n = config.max_samples
            data = type(data)(data.client_id, data.train_x[:n], data.train_y[:n],
                              data.test_x[:max(1, n // 2)], data.test_y[:max(1, n // 2)])
        self.data = data
        self.client: LocalClient | None = None
        self.inbox: queue.Queue[tuple[str, bytes, int, int]] = queue.Queue()
        self.connected = threading.Event()
        self.stopping = threading.Event()
        self.coordinator_key = load_public_key(config.coordinator_key) if config.coordinator_key else None
        self.mqtt = self._make_client()

    # --- connection ------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        config = self.config
        client, self.address = make_client(config.device_id, config.broker, config.username,
                                           config.password, config.tls_ca)
        client.will_set(self.topics.status(self.config.device_id),
                        encode_envelope(MessageType.STATUS,
                                        {"device": self.config.device_id, "online": False}),
                        qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)  # exponential backoff
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        # Acknowledged only after handling: a task received just before a crash is redelivered.
        client.manual_ack_set(True)
        client.on_message = lambda c, u, msg: self.inbox.put((msg.topic, msg.payload, msg.mid, msg.qos))
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            log.warning("broker refused the connection: %s", reason_code)
            return
        device = self.config.device_id
        for topic in self.topics.device_subscriptions(device):
            client.subscribe(topic, qos=1)
        client.publish(self.topics.status(device),
                       encode_envelope(MessageType.STATUS, {"device": device, "online": True}),
                       qos=1, retain=True)
        # Retained: a coordinator that starts (or restarts) later still sees every registration.
        client.publish(self.topics.register(device), self._registration(), qos=1, retain=True)
        for key, envelope in self.state.outbox():  # unacknowledged updates: resend, same key
            log.info("resending update %s", key)
            client.publish(self.topics.update(device), envelope, qos=1)
        self.connected.set()
        log.info("connected to %s as %s", self.config.broker, device)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None):
        self.connected.clear()
        if not self.stopping.is_set():
            log.warning("disconnected (%s); reconnecting with backoff", reason_code)

    def _registration(self) -> bytes:
        ledger, _ = self.state.load_ledger()
        model_file = self.state.root / "model.pt"
        digest = load_checkpoint(model_file).spec.digest() if model_file.exists() else None
        header = {"device": self.config.device_id, "profile": self.profile,
                  "num_samples": len(self.data.train_y), "formats": list(self.config.formats),
                  "sdk_version": _sdk_version(), "epsilon_budget": self.config.epsilon_budget,
                  "epsilon_spent": ledger.epsilon() if ledger else None, "model_digest": digest}
        return encode_envelope(MessageType.REGISTER, header)

    # --- main loop -------------------------------------------------------------------------
    def start(self) -> None:
        self.mqtt.connect_async(self.address.host, self.address.port, keepalive=self.config.keepalive)
        self.mqtt.loop_start()

    def stop(self) -> None:
        self.stopping.set()
        device = self.config.device_id
        if self.connected.is_set():
            self.mqtt.publish(self.topics.status(device), encode_envelope(
                MessageType.STATUS, {"device": device, "online": False}), qos=1, retain=True
            ).wait_for_publish(5)
        self.mqtt.disconnect()
        self.mqtt.loop_stop()

    def run(self, until: float | None = None) -> None:
        """Handle messages until stopped (or until the unix time `until`)."""
        self.start()
        try:
            while not self.stopping.is_set() and (until is None or time.time() < until):
                try:
                    topic, payload, mid, qos = self.inbox.get(timeout=0.5)
                except queue.Empty:
                    continue
                self.handle(topic, payload)
                self.mqtt.ack(mid, qos)
        finally:
            self.stop()

    def handle(self, topic: str, payload: bytes) -> None:
        try:
            envelope = decode_envelope(payload, self.config.max_payload_bytes)
            if self.coordinator_key is not None and envelope.type in (MessageType.TASK,
                                                                      MessageType.ARTIFACT):
                try:
                    verify(envelope.header, envelope.payload, self.coordinator_key)
                except EnvelopeError as exc:
                    self._refuse_forged(envelope, exc)
                    return
            if envelope.type == MessageType.TASK:
                self._on_task(parse_header(envelope), envelope.payload)
            elif envelope.type == MessageType.ACK:
                self._on_ack(parse_header(envelope))
            elif envelope.type == MessageType.ARTIFACT:
                self._on_artifact(parse_header(envelope), envelope.payload)
            else:
                log.warning("ignoring %s message on %s", envelope.type.name, topic)
        except EnvelopeError as exc:
            log.warning("refusing a malformed message on %s: %s", topic, exc)

    # --- tasks -----------------------------------------------------------------------------
    def _on_task(self, header: TaskHeader, payload: bytes) -> None:
        device = self.config.device_id
        if header.device != device:
            log.warning("task for %s arrived on %s's topic; ignored", header.device, device)
            return
        key = task_key(header.round, header.task)
        done = self.state.tasks().get(key)
        if done is not None:  # a redelivered task: answer again, never train twice
            pending = self.state.outbox_entry(key)
            if pending is not None:
                self.mqtt.publish(self.topics.update(device), pending, qos=1)
            log.info("task %s already %s", key, done)
            return
        try:
            plan = SubmodelPlan.from_dict(header.plan)
            client = self._client(header)
        except (ValueError, TypeError, KeyError) as exc:
            self._refuse(header, RefusalCode.BAD_TASK, f"task cannot be run as sent: {exc}")
            return
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
        if client.ledger is not None:
            self.state.save_ledger(client.ledger, client._noise_multiplier)
        if outcome.refused:
            self._refuse(header, RefusalCode.PRIVACY_BUDGET, outcome.refused, outcome.epsilon)
            return
        Checkpoint(client.spec, client.state, plan.spec.name, self.config.data.dataset, device,
                   header.round, header.width_ratio).save(self.state.root / "model.pt")
        envelope = encode_envelope(MessageType.UPDATE, {
            "device": device, "round": header.round, "task": header.task,
            "num_samples": outcome.num_samples, "epsilon": outcome.epsilon,
            "train_seconds": time.perf_counter() - started,
            "local_accuracy": client.evaluate(),
            "payload_sha256": hashlib.sha256(outcome.payload).hexdigest()}, outcome.payload)
        if len(envelope) > self.config.max_payload_bytes:
            self._refuse(header, RefusalCode.BAD_TASK, f"the update is {len(envelope):,} bytes, over "
                         f"the fleet's limit of {self.config.max_payload_bytes:,}; plan a smaller "
                         "upload (fp16, sparser) for this device")
            return
        self.state.put_outbox(key, envelope)  # on disk before it is sent: a crash resends it
        self.state.mark(key, "sent")
        self.mqtt.publish(self.topics.update(device), envelope, qos=1)
        log.info("round %d: sent %d-byte update (epsilon %s)", header.round, len(envelope),
                 f"{outcome.epsilon:.3f}" if outcome.epsilon is not None else "n/a")

    def _client(self, header: TaskHeader) -> LocalClient:
        """The device's trainer, restored from disk on first use; DP settings from the task,
        the budget from the device's own config."""
        train = TrainConfig(**header.train)
        dp = None
        if header.dp is not None:
            dp = DPConfig(**{**header.dp, "epsilon_budget": self.config.epsilon_budget})
        if self.client is None:
            self.client = LocalClient(self.data, train, dp, planned_rounds=header.planned_rounds)
            ledger, noise = self.state.load_ledger()
            if ledger is not None:
                ledger.budget_epsilon = self.config.epsilon_budget
                self.client.ledger, self.client._noise_multiplier = ledger, noise
            model_file = self.state.root / "model.pt"
            if model_file.exists():
                saved = load_checkpoint(model_file)
                self.client.spec, self.client.state = saved.spec, saved.state
        else:
            self.client.train_config, self.client.dp = train, dp
            if dp is not None and self.client.ledger is None:
                self.client.ledger = PrivacyLedger(dp.delta, self.config.epsilon_budget, dp.accountant)
        return self.client

    def _refuse(self, header: TaskHeader, code: RefusalCode, message: str,
                epsilon: float | None = None, record: bool = True) -> None:
        key = task_key(header.round, header.task)
        if record:  # a forged task is not recorded: its id must not block the real one
            self.state.mark(key, "refused")
        log.warning("refusing task %s (%s): %s", key, code.value, message)
        self.mqtt.publish(self.topics.refusal(self.config.device_id), encode_envelope(
            MessageType.REFUSAL, {"device": self.config.device_id, "round": header.round,
                                  "task": header.task, "code": code.value,
                                  "message": message[:4000], "epsilon": epsilon}), qos=1)

    def _refuse_forged(self, envelope, error: EnvelopeError) -> None:
        """A task that is not the coordinator's is never run; say so if it names a task."""
        log.warning("refusing a %s message: %s", envelope.type.name, error)
        if envelope.type == MessageType.TASK:
            try:
                header = parse_header(envelope)
            except EnvelopeError:
                return
            self._refuse(header, RefusalCode.BAD_TASK, f"refused: {error}", record=False)

    def _on_ack(self, header: AckHeader) -> None:
        key = task_key(header.round, header.task)
        self.state.drop_outbox(key)
        self.state.mark(key, "acked" if header.accepted else "rejected")
        if not header.accepted:
            log.warning("coordinator rejected update %s: %s", key, header.reason)

    def _on_artifact(self, header: ArtifactHeader, payload: bytes) -> None:
        entry = next((a for a in header.manifest.get("artifacts", [])
                      if a.get("compressed_path") == header.artifact), None)
        if entry is None:
            log.warning("artifact message names %s, which its manifest does not list", header.artifact)
            return
        manifest = {**header.manifest, "artifacts": [entry]}
        self.state.save_artifact(manifest, header.artifact, payload)
        log.info("round %d: stored exported model %s", header.round, header.artifact)


def _sdk_version() -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version("fedprune")
    except importlib.metadata.PackageNotFoundError:
        return "dev"
