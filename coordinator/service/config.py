"""coordinator.toml: the service's broker, rounds and storage, on top of the learning settings it
shares with `fedprune simulate` (`LearningSettings`: strategy, [train], [fedp3], [dp], ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from edge_sdk.protocol.transport import BrokerAddress

from ..config import LearningSettings, Strategies, _Section


class BrokerSection(_Section):
    url: str = "mqtt://127.0.0.1:1883"
    fleet: str = "default"
    topic_prefix: str = "fedprune"
    client_id: str = "fedprune-coordinator"
    keepalive: int = Field(30, ge=5)
    # Refuse any message over this many bytes before decoding it; keep it at or under the
    # broker's message_size_limit (deploy/mosquitto/mosquitto.conf sets 64 MiB).
    max_payload_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None       # the fleet CA, for mqtts:// URLs

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        BrokerAddress.parse(value)
        return value


class RoundsSection(_Section):
    total: int = Field(3, ge=1)
    devices_per_round: int = Field(10, ge=1)
    min_devices: int = Field(1, ge=1)          # eligible devices online before a round opens
    min_fraction: float = Field(0.5, gt=0, le=1)  # of the selected, to commit at the deadline
    deadline_seconds: float = Field(300.0, gt=0)
    registration_grace_seconds: float = Field(2.0, ge=0)  # wait for late registrations
    retries: int = Field(3, ge=0)              # aborted attempts allowed per round number


class ExportSection(_Section):
    enabled: bool = True
    formats: list[Literal["onnx", "tflite"]] = Field(["onnx"], min_length=1)
    verify_samples: int = Field(256, ge=1)


class ServiceConfig(LearningSettings):
    strategy: Strategies = "fedp3"
    slicing: Literal["prefix", "rolling", "magnitude"] = "magnitude"
    state_dir: str = "coordinator-state"
    database: str | None = None               # SQLAlchemy URL; default sqlite in state_dir
    http_host: str = "127.0.0.1"
    http_port: int | None = Field(8080, ge=0, le=65535)  # None: no endpoint; 0: any free port
    evaluate: bool = True                     # global accuracy on the test set after each round
    # Refuse an update whose change from the global model has an L2 norm above this (a blown-up
    # or scaled attack); None accepts any finite update. Robust aggregation handles subtler ones.
    max_update_norm: float | None = Field(1000.0, gt=0)
    exit_when_done: bool = False
    signing_key: str | None = None            # Ed25519 private key PEM: tasks and artifacts are signed
    broker: BrokerSection = BrokerSection()
    rounds: RoundsSection = RoundsSection()
    export: ExportSection = ExportSection()

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{Path(self.state_dir).resolve() / 'coordinator.db'}"
