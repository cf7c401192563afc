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
    # Paths (state_dir, tls_ca, coordinator_key, a profile file, data paths) are read from the
    # config file's folder when relative, so a device folder from `provision` works wherever it
    # is copied. `fedprune-edge run` starts on a state_dir that does not exist only with
    # --new-state (agent/state.py: open_state_dir).
    state_dir: str = Field("edge-state", validate_default=True)
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
    # Stop (rc 2, saying which broker and why) when no broker has answered this long after start;
    # a broker lost later is retried for ever. Unset it (or raise it) for a device that boots
    # before its broker; under systemd, Restart= starts it again anyway.
    broker_give_up_seconds: float | None = Field(60.0, gt=0)
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

    @field_validator("state_dir")
    @classmethod
    def _state_dir(cls, value: str, info: ValidationInfo) -> str:
        """Not required to exist here: whether a missing one may be created is the agent's
        decision at start (it may be new on purpose, or a typo hiding the privacy ledger)."""
        folder = (info.context or {}).get(CONFIG_DIR)
        return value if folder is None else str(Path(folder) / Path(value).expanduser())

    @field_validator("tls_ca", "coordinator_key")
    @classmethod
    def _key_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _config_file(value, info)

    @field_validator("profile")
    @classmethod
    def _profile_file(cls, value: str, info: ValidationInfo) -> str:
        """Read from the config's folder, but not required yet: a config may name the profile
        `fedprune-edge profile` is about to write beside it (deploy/edge.example.toml); the
        agent's start says how to make a missing one (device_profiles.load_profile)."""
        folder = (info.context or {}).get(CONFIG_DIR)
        if folder is None or value.startswith("catalogue:") or value == "measure":
            return value
        return str(Path(folder) / Path(value).expanduser())

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


def _config_file(value: str, info: ValidationInfo) -> str:
    """A file named in a config file, read from that file's folder when relative, and checked
    to exist while the config is read: a device folder copied without one of its files stops
    here, naming the key and the file, not later in whatever first opens it. A config built in
    code (no file) keeps its paths as given."""
    folder = (info.context or {}).get(CONFIG_DIR)
    if folder is None:
        return value
    path = Path(folder) / Path(value).expanduser()
    try:
        state = None if path.is_file() else "is not a file" if path.exists() else "does not exist"
    except OSError as exc:  # a name too long, a folder that may not be searched
        state = f"cannot be read ({exc.strerror or exc})"
    if state is not None:
        where = "" if Path(value).expanduser().is_absolute() else \
            f" (relative paths are read from the config file's folder, {folder})"
        raise ValueError(f"{path} {state}{where}; copy the file there or fix {info.field_name}")
    return str(path)


def _data_dir(data: object, folder: Path) -> object:
    """[data] data_dir (the benchmark's download folder) read from the config's folder too:
    `path` and `test_path` already are (DataSettings), and one rule for every key is the one
    an operator can remember."""
    if isinstance(data, dict) and isinstance(data.get("data_dir"), str):
        return {**data, "data_dir": str(folder / Path(data["data_dir"]).expanduser())}
    return data


def load_edge_config(path: str | Path) -> EdgeSettings:
    data = read_toml(path, "edge config", EdgeConfigError)
    folder = Path(path).resolve().parent
    if "data" in data:
        data["data"] = _data_dir(data["data"], folder)
    try:
        # every relative path is read from the config file's folder
        return EdgeSettings.model_validate(data, context={CONFIG_DIR: folder})
    except ValidationError as exc:
        problems = describe(exc, "config", EdgeSettings)
        raise EdgeConfigError(f"{path}: {problems}") from None
