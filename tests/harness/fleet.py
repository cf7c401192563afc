"""Drive the real coordinator engine and real edge agents without a broker, message by message.

Each agent's publish is injected to capture what it sends; `deliver` hands captured messages to the other
side exactly as a broker would (same topic, same bytes). Tests choose the order, drop, delay or
replay messages, and "crash" the engine by building a new one on the same store.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.service import RoundEngine, ServiceSettings, Store
from edge_sdk.agent import EdgeAgent, EdgeSettings
from edge_sdk.protocol import Topics, decode_envelope, parse_header
from harness.devices import capture


def signing_key_files(folder: Path) -> tuple[Path, Path, Ed25519PrivateKey]:
    """A fresh Ed25519 key as the coordinator keeps it (folder/signing.key, PKCS8 PEM) and as
    devices are given it (folder/signing.pub): (key path, public key path, the key)."""
    key = Ed25519PrivateKey.generate()
    key_path, pub_path = folder / "signing.key", folder / "signing.pub"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    pub_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path, key


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, tmp: Path, db_url: str, devices: int = 3, samples: int = 150,
                 budgets: dict[int, float] | None = None, **service):
        self.tmp = tmp
        self.topics = Topics("test")
        settings = {"strategy": "fedavg", "state_dir": str(tmp / "coordinator"), "database": db_url,
                    "http_port": None, "evaluate": True,
                    "broker": {"fleet": "test"},
                    "rounds": {"total": 2, "devices_per_round": devices, "min_devices": devices,
                               "registration_grace_seconds": 0, "deadline_seconds": 60},
                    "export": {"enabled": False}, "train": {"lr": 0.05}}
        for key, value in service.items():
            if isinstance(value, dict):
                settings.setdefault(key, {}).update(value)
            else:
                settings[key] = value
        self.config = ServiceSettings.model_validate(settings)
        self.clock = Clock()
        self.store = Store(db_url)
        self.to_devices: list[tuple[str, bytes]] = []
        self.engine = self.new_engine()
        self.to_coordinator: list[tuple[str, bytes]] = []
        self.agents = {}
        for i in range(devices):
            device = f"dev-{i}"
            config = EdgeSettings(device_id=device, fleet="test", state_dir=str(tmp / device),
                                profile="catalogue:rpi4-4gb", max_samples=samples,
                                epsilon_budget=(budgets or {}).get(i),
                                data={"clients": devices, "device_index": i})
            agent = EdgeAgent(config, publish=capture(self.to_coordinator))
            self.agents[device] = agent

    def new_engine(self) -> RoundEngine:
        """A coordinator starting (or restarting) on the same store and state directory."""
        self.engine = RoundEngine(self.config, self.store, lambda t, p: self.to_devices.append((t, p)),
                                  clock=self.clock)
        return self.engine

    def on_broker(self, device: str, url: str, state_dir: Path, **settings) -> EdgeSettings:
        """`device`'s settings for a device on a real broker, with its own state directory."""
        return EdgeSettings.model_validate({**self.agents[device].config.model_dump(), "broker": url,
                                            "state_dir": str(state_dir), **settings})

    def register_all(self) -> None:
        for device, agent in self.agents.items():
            self.engine.handle(self.topics.register(device), agent._registration())

    def take(self, queue: list, kind: str, device: str | None = None) -> list[tuple[str, bytes]]:
        """Remove and return queued messages of one kind (and device)."""
        picked = [(t, p) for t, p in queue if self.topics.device_of(t)[0] == kind
                  and (device is None or self.topics.device_of(t)[1] == device)]
        for item in picked:
            queue.remove(item)
        return picked

    def deliver_to_devices(self, kind: str = "task", device: str | None = None) -> None:
        for topic, payload in self.take(self.to_devices, kind, device):
            self.agents[self.topics.device_of(topic)[1]].handle(topic, payload)

    def deliver_to_coordinator(self, kind: str = "update", device: str | None = None) -> list:
        messages = self.take(self.to_coordinator, kind, device)
        for topic, payload in messages:
            self.engine.handle(topic, payload)
        return messages

    def round_with_updates(self) -> dict[str, tuple[str, bytes]]:
        """Round 1 open, every device trained: its update (topic, message), not yet delivered,
        per device."""
        self.register_all()
        self.engine.tick()
        self.deliver_to_devices("task")
        return {self.topics.device_of(t)[1]: (t, p) for t, p in self.take(self.to_coordinator, "update")}

    def deliver_acks(self, device: str) -> list:
        """Deliver the coordinator's ACKs to `device`, and return them parsed."""
        acks = self.take(self.to_devices, "ack", device)
        for topic, payload in acks:
            self.agents[device].handle(topic, payload)
        return [parse_header(decode_envelope(p)) for _, p in acks]
