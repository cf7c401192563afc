"""coordinator.toml: the service's broker, rounds and storage, on top of the learning settings it
shares with `fedprune simulate` (`LearningSettings`: strategy, [train], [fedp3], [dp], ...)."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from sqlalchemy import make_url

from edge_sdk.protocol.transport import BrokerAddress
from export.formats import ExportFormatName

from edge_sdk.settings import Settings

from ..config import LearningSettings, StrategyName


HTTP_TOKEN_VARIABLE = "FEDPRUNE_HTTP_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1) or the name localhost; any other
    name counts as reachable from the network."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BrokerSettings(Settings):
    url: str = "mqtt://127.0.0.1:1883"
    fleet: str = "default"
    topic_prefix: str = "fedprune"
    # None: this coordinator's own id, made once and kept in state_dir/mqtt-client-id (service.py:
    # `coordinator_client_id`), so a restart resumes its persistent session and two coordinators
    # on one broker never take each other's id.
    client_id: str | None = None
    keepalive: int = Field(30, ge=5)
    # Refuse any message over this many bytes before decoding it; keep it at or under the
    # broker's message_size_limit (deploy/mosquitto/mosquitto.conf sets 64 MiB).
    max_payload_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None       # the fleet CA, for mqtts:// URLs
    # /healthz answers 503 once the broker has been out of reach (or refusing) this long,
    # or at once while another client keeps taking this coordinator's client id: an
    # orchestrator's probe then restarts or flags the coordinator, which alone cannot fix it.
    unhealthy_after_seconds: float = Field(30, gt=0)
    # Messages, and payload bytes, waiting for the engine at most: when either is reached the
    # link stops reading from the broker until the engine takes one (edge_sdk/protocol/transport.py;
    # the broker's in-flight window does not bound it). QoS 0 deliveries, which the protocol never
    # uses, are dropped on arrival and counted.
    inbox_limit: int = Field(1000, ge=10)
    inbox_max_bytes: int = Field(16 * 1024 * 1024, ge=1024)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        BrokerAddress.parse(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _client_id_from_username(cls, data):
        if isinstance(data, dict) and data.get("username") and "client_id" not in data:
            data = {**data, "client_id": data["username"]}
        return data

    @model_validator(mode="after")
    def _client_id_is_username(self):
        """A broker that binds client ids to user names (use_username_as_clientid, so that no
        client can take over another's session) would rename a differing id anyway."""
        if self.username is not None and self.client_id != self.username:
            raise ValueError(f"broker.client_id {self.client_id!r} must equal broker.username "
                             f"{self.username!r} (or be left out): the broker binds the client id "
                             "to the user name")
        return self


class RoundsSettings(Settings):
    total: int = Field(3, ge=1)
    devices_per_round: int = Field(10, ge=1)
    min_devices: int = Field(1, ge=1)          # eligible devices online before a round opens
    min_fraction: float = Field(0.5, gt=0, le=1)  # of the selected, to commit at the deadline
    deadline_seconds: float = Field(300.0, gt=0)
    registration_grace_seconds: float = Field(2.0, ge=0)  # wait for late registrations
    retries: int = Field(3, ge=0)              # aborted attempts allowed per round number


class RetrySettings(Settings):
    """A message whose handling failed for a reason that may pass (the database is down or
    locked, the disk is full) is tried again in-process, waiting first_delay_seconds, then twice
    as long each time up to max_delay_seconds; after `attempts` failures it is kept in
    state_dir/dead-letter/ and acknowledged, so it is neither lost nor redelivered forever."""
    attempts: int = Field(6, ge=1)
    first_delay_seconds: float = Field(0.5, gt=0)
    max_delay_seconds: float = Field(10.0, gt=0)


class ExportSettings(Settings):
    enabled: bool = True
    formats: list[ExportFormatName] = Field(["onnx"], min_length=1)
    verify_samples: int = Field(256, ge=1)


def _node_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ClusterSettings(Settings):
    """Several `fedprune coordinator serve` processes on one fleet and one PostgreSQL database
    (docs/ARCHITECTURE.md, "Several coordinators"). Off: one process, exactly as without it.

    Every process takes in updates and refusals through the broker's shared subscription
    `$share/<group>/<prefix>/<fleet>/update/+` (and `refusal/+`); the one holding PostgreSQL's
    session advisory lock `leader_lock_key` leads: it registers devices, opens rounds, sends
    tasks and commits. Takeover after the leader dies: PostgreSQL frees the lock as soon as it
    sees the leader's connection close (at once when the process dies: its kernel closes the
    socket), and a follower takes it within `takeover_poll_seconds`. If the leader's host
    vanishes without closing it, PostgreSQL's TCP keepalives and user timeout on that connection
    drop it within `dead_leader_seconds`; if the leader hangs, a follower ends its sessions once
    its heartbeat (every `takeover_poll_seconds`) is `dead_leader_seconds` old. Defaults: 1 s
    after the leader process dies, 11 s after its host vanishes or it hangs; then the new leader
    resumes the open round from the database.
    """
    enabled: bool = False
    group: str = Field("fedprune", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    # This process's name: in its MQTT client id (<broker.client_id>-<node>), its lock
    # connection's application_name (fedprune-leader:<node>) and its logs. Default host-pid.
    node: str = Field(default_factory=_node_name, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    # pg_try_advisory_lock's key; every coordinator of one fleet must use the same. Default:
    # the ASCII bytes of "fedprune" as a bigint.
    leader_lock_key: int = Field(int.from_bytes(b"fedprune", "big"), ge=-2**63, lt=2**63)
    takeover_poll_seconds: float = Field(1.0, gt=0, le=60)
    dead_leader_seconds: int = Field(10, ge=3, le=600)

    @model_validator(mode="after")
    def _heartbeat_fits(self) -> ClusterSettings:
        # The leader beats every takeover_poll_seconds; a silence this long must mean it hangs.
        if self.dead_leader_seconds < 3 * self.takeover_poll_seconds:
            raise ValueError(f"dead_leader_seconds ({self.dead_leader_seconds}) must be at least 3 x "
                             f"takeover_poll_seconds ({self.takeover_poll_seconds:g}), the leader's "
                             "heartbeat, or followers depose a healthy leader; raise it")
        return self


class ServiceSettings(LearningSettings):
    """coordinator.toml.

    `[data]` (the keys of `fedprune simulate`'s and a device's, edge_sdk/data/sources/settings.py)
    declares the fleet's data from one place: the model is built for its input shape and classes,
    and TASK specs and exported manifests carry its contract (input shape and layout, input_scale,
    mean, std, class names); devices refuse a task whose model does not fit their own [data].
    - A source with samples (an image folder, CSV, npz, a function, a benchmark) is read when the
      coordinator starts: its held-out part (`test_path`, a function's test split, else the
      `test_share` a simulation of the same [data] holds out; a benchmark's official test set)
      is what the global model is evaluated on after each round and exports are verified on.
    - `source = "contract"` declares the contract alone (`input_shape`, `classes`, `mean`, `std`,
      `input_scale`), for a fleet whose samples never leave the devices: set `evaluate = false`
      (there is nothing to evaluate on), and exports are verified on seeded random inputs of the
      input shape (parity with torch needs inputs of the right shape, not real ones; a manifest
      then records no accuracy).
    Without [data], the benchmark `dataset` (and `data_dir`) as before; both at once are refused.
    [data]'s clients, partition and device_index are a device's and refused here.
    """

    strategy: StrategyName = "fedp3"
    slicing: Literal["prefix", "rolling", "magnitude"] = "magnitude"
    state_dir: str = "coordinator-state"
    database: str | None = None               # SQLAlchemy URL; default sqlite in state_dir
    # The HTTP API (coordinator/service/http_api.py; docs/SECURITY.md). On a loopback address it
    # answers anyone on this machine; on any other address it refuses to start without a token.
    http_host: str = "127.0.0.1"
    http_port: int | None = Field(8080, ge=0, le=65535)  # None: no endpoint; 0: any free port
    # Bearer token every endpoint but /healthz then requires (Authorization: Bearer <token>).
    # Set here, or in the FEDPRUNE_HTTP_TOKEN environment variable (used when this key is absent).
    http_token: SecretStr | None = None
    # Host names (or addresses) the API answers to besides the loopback ones (127.0.0.1,
    # localhost, [::1]) and http_host: a request naming any other Host is refused (400), so a web
    # page cannot read the API through a DNS name it rebinds to this machine. "*.example.com"
    # matches its subdomains; "*" any name (then only the token guards the API).
    http_allowed_hosts: list[str] = []
    evaluate: bool = True                     # global accuracy on the held-out data after each round
    # Refuse an update whose change from the global model has an L2 norm above this (a blown-up
    # or scaled attack); None accepts any finite update. Robust aggregation handles subtler ones.
    max_update_norm: float | None = Field(1000.0, gt=0)
    # A registration claiming more local training samples than this is refused. Sample-weighted
    # strategies (fedavg, fedper, ...) weigh a device by its registered samples, and an update
    # may claim no more than that: this is the largest aggregation weight a device can claim.
    max_device_samples: int = Field(1_000_000, ge=1, le=2**31 - 1)
    # Updates refused for one task (damaged, too large, wrong tensors) before the coordinator
    # stops decoding further updates for it: a device cannot make it decompress bombs forever.
    max_refused_updates: int = Field(3, ge=1)
    exit_when_done: bool = False
    # /metrics labels ε spent per device (fedprune_device_epsilon_spent{device_id}) only while the
    # fleet has at most this many devices; above it, fleet aggregates only (bounded cardinality).
    metrics_device_label_limit: int = Field(100, ge=0)
    signing_key: str | None = None            # Ed25519 private key PEM: tasks and artifacts are signed
    broker: BrokerSettings = BrokerSettings()
    rounds: RoundsSettings = RoundsSettings()
    retry: RetrySettings = RetrySettings()
    export: ExportSettings = ExportSettings()
    cluster: ClusterSettings = ClusterSettings()

    @model_validator(mode="after")
    def _secure_aggregation_in_the_service(self):
        """What the service's secure rounds (service/secure_stages.py) cannot do is refused at
        start: their stage state is one process's memory, and dropouts are real ones."""
        secure = self.secure_aggregation
        if not secure.enabled:
            return self
        if self.cluster.enabled:
            raise ValueError("secure_aggregation: its stage state lives in the leading "
                             "coordinator's memory; run one coordinator (cluster.enabled = false)")
        if secure.drop_before_input or secure.drop_after_input:
            raise ValueError("secure_aggregation.drop_before_input/drop_after_input simulate "
                             "dropouts in `fedprune simulate`; the service's devices drop out for "
                             "real: remove them from coordinator.toml")
        if self.rounds.devices_per_round < max(2, secure.min_holders):
            raise ValueError(f"secure_aggregation: rounds.devices_per_round is "
                             f"{self.rounds.devices_per_round}, min_holders {secure.min_holders}: "
                             "no coordinate could be released; draw more devices a round")
        return self

    @model_validator(mode="before")
    @classmethod
    def _http_token_from_environment(cls, data):
        token = os.environ.get(HTTP_TOKEN_VARIABLE, "").strip()
        if isinstance(data, dict) and data.get("http_token") is None and token:
            data = {**data, "http_token": token}
        return data

    @field_validator("http_allowed_hosts")
    @classmethod
    def _host_patterns(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if not host or "*" in host[1:] or (host.startswith("*") and host != "*"
                                                and not host.startswith("*.")):
                raise ValueError(f"{host!r} is not a host name, '*.domain' or '*'")
        return hosts

    @field_validator("http_token")
    @classmethod
    def _token_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (e.g. `openssl rand -hex 32`)")
        return value

    @model_validator(mode="after")
    def _token_off_loopback(self):
        if self.http_port is not None and not is_loopback(self.http_host) and self.http_token is None:
            raise ValueError(
                f"http_host {self.http_host!r} is not a loopback address: the HTTP API would answer "
                f"the network unauthenticated. Set http_token (at least 16 characters) in "
                f"coordinator.toml or {HTTP_TOKEN_VARIABLE} in the environment, or bind http_host "
                "to 127.0.0.1")
        return self

    @model_validator(mode="after")
    def _any_host_needs_a_token(self):
        if "*" in self.http_allowed_hosts and self.http_token is None:
            raise ValueError("http_allowed_hosts = [\"*\"] answers any Host name, so any web page "
                             "could read the API through a DNS name that points here: set "
                             f"http_token (or {HTTP_TOKEN_VARIABLE}), or list the names instead")
        return self

    @model_validator(mode="after")
    def _something_to_evaluate(self):
        if self.evaluate and self.data is not None and self.data.source == "contract":
            raise ValueError("evaluate: [data] declares only the input contract (source = "
                             "\"contract\"), so the coordinator has no samples to evaluate the "
                             "global model on; set evaluate = false, or name held-out samples in "
                             "[data] (source and path, e.g. an image folder)")
        return self

    @model_validator(mode="after")
    def _cluster_needs_postgresql(self):
        if self.cluster.enabled and make_url(self.database_url).get_backend_name() != "postgresql":
            raise ValueError(
                "cluster.enabled needs PostgreSQL: every coordinator of the cluster shares one "
                "database and the leader holds a PostgreSQL advisory lock. Set database = "
                "\"postgresql+psycopg://USER@HOST:5432/DB\" (SQLite is for one coordinator: "
                "leave cluster.enabled = false)")
        return self

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{Path(self.state_dir).resolve() / 'coordinator.db'}"
