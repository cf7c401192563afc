"""edge.toml: who the device is, where its broker is, what data it trains on, what it may spend."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from device_profiles.files import atomic_write

from ..data.sources import CONFIG_DIR, DataSettings
from ..protocol.topics import check_id
from ..protocol.transport import BrokerAddress
from ..runtime.backends import RuntimeFormatName
from ..validation import describe, read_toml


class EdgeConfigError(ValueError):
    """An edge config that cannot run; the message names the key."""


class EdgeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    device_id: str
    broker: str = "mqtt://127.0.0.1:1883"
    fleet: str = "default"
    topic_prefix: str = "fedprune"
    state_dir: str = "edge-state"
    # "catalogue:<name>" for a catalogue device class, a profile JSON from `fedprune-edge profile`, or
    # "measure" to profile this device on first start (kept in state_dir/profile.json).
    profile: str = "catalogue:rpi4-4gb"
    formats: list[RuntimeFormatName] = ["onnx"]  # formats of the runtimes installed here
    # Privacy is the device's decision, not the coordinator's. With require_dp, or with a
    # budget (which implies it), a task is refused (privacy_policy) when it has no DP, a delta
    # above dp_delta, a noise multiplier below min_noise_multiplier, or an epsilon of its own
    # (this task alone, at dp_delta) above max_task_epsilon; one that would push the device's
    # total past its budget is refused too (privacy_budget). The ledger always accounts at
    # dp_delta, whatever delta a task names.
    epsilon_budget: float | None = Field(None, gt=0)
    dp_delta: float = Field(1e-5, gt=0, lt=1)
    require_dp: bool = False
    # 10: the top of the range the DP literature still calls a reasonable guarantee for one
    # release (Ponomareva et al., "How to DP-fy ML", 2023: epsilon <= 1 strong, <= 10
    # reasonable, above that weak); without a budget a device gives no more than that per task.
    max_task_epsilon: float = Field(10.0, gt=0)
    # 0.5: a single full-batch step at this noise already costs epsilon ~10.7 (RDP, delta 1e-5),
    # the ceiling above; less noise leans entirely on subsampling amplification and on the
    # accountant's numerics at tiny noise, and 1e-6 (an upload at epsilon ~1e12) is no privacy.
    min_noise_multiplier: float = Field(0.5, gt=0)
    threads: int = Field(1, ge=1)
    max_samples: int | None = Field(None, ge=2)  # training samples (ClientData.with_train_limit)
    keepalive: int = Field(30, ge=5)
    max_payload_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # An update not acknowledged after this long is published again (and on every reconnect):
    # an update lost by a coordinator that failed to store it is not lost for good.
    resend_seconds: float = Field(30.0, ge=1)
    # Security (from `fedprune coordinator provision`): broker credentials, the fleet CA for
    # mqtts://, and the coordinator's public key; with it set, unsigned or forged tasks are refused.
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    coordinator_key: str | None = None
    # What the device trains on (edge_sdk/data/sources/settings.py lists the keys); without a
    # source, the old keys (dataset, clients, device_index, partition) name a benchmark shard.
    data: DataSettings = DataSettings()
    # The `package.module:function` models this device may build, besides the built-in ones and
    # the `fedprune.models` entry points installed here: e.g. ["model:build"] for model.py beside
    # this file (the config's folder is searched first), or ["mypkg.nets:build"]. Each is
    # imported when the config is read; a model named only in a task is never imported.
    models: tuple[str, ...] = ()

    @field_validator("device_id", "fleet")
    @classmethod
    def _topic_safe(cls, value: str) -> str:
        return check_id("id", value)

    @field_validator("models")
    @classmethod
    def _allowed_models(cls, references: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        """Imported now, so a typo, a missing module or a name that is not a function is a
        configuration error naming the reference, not a refused task later."""
        from ..models import allow_reference

        folder = (info.context or {}).get(CONFIG_DIR)
        for reference in references:
            if ":" not in reference:
                raise ValueError(f"{reference!r} is not a package.module:function reference; a "
                                 "built-in model or an installed fedprune.models entry point needs "
                                 "no entry in models")
            allow_reference(reference, folder)
        return references

    @property
    def dp_required(self) -> bool:
        """Whether this device trains only with DP (always when it has an epsilon budget)."""
        return self.require_dp or self.epsilon_budget is not None

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        BrokerAddress.parse(value)
        return value

    def to_toml(self) -> str:
        """This config as edge.toml text (JSON literals are valid TOML for these value types)."""
        def lines(values: dict) -> list[str]:
            return [f"{key} = {json.dumps(value)}" for key, value in values.items() if value is not None]
        data = self.model_dump(mode="json")
        data.pop("data")
        section = self.data.model_dump(mode="json", exclude_unset=True)  # only what was chosen
        options = section.pop("options", {})
        text = lines(data) + ["", "[data]"] + lines(section)
        if options:
            text += ["", "[data.options]"] + lines(options)
        return "\n".join(text) + "\n"

    def save(self, path: str | Path) -> Path:
        """Written 0600 from the start: edge.toml may hold the device's broker password."""
        path = Path(path)
        atomic_write(path, self.to_toml().encode(), private=True)
        return path


def load_edge_config(path: str | Path) -> EdgeSettings:
    data = read_toml(path, "edge config", EdgeConfigError)
    try:
        # [data] paths are read from the config file's folder
        return EdgeSettings.model_validate(data, context={CONFIG_DIR: Path(path).resolve().parent})
    except ValidationError as exc:
        problems = describe(exc, "config")
        raise EdgeConfigError(f"{path}: {problems}") from None
