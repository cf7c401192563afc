"""Run configuration: one validated tree, from defaults, a TOML file and `--set key=value`.

Validation is pydantic's; our part is only the layering (file, then overrides) and error text
that names the key and the accepted values.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from edge_sdk.validation import describe, read_toml


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what it accepts."""


class _Section(BaseModel):
    # TOML has inf and nan literals (and `--set train.lr=inf` reads one): refuse them, as no
    # setting means anything at a non-finite value and a NaN passes every `gt`/`le` bound check.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TrainSection(_Section):
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(48, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    clip_norm: float | None = Field(10.0, gt=0)


class FedP3Section(_Section):
    selection: str = "opu2"
    global_keep: float = Field(1.0, gt=0, le=1)
    local_keep: float = Field(1.0, gt=0, le=1)
    aggregation: Literal["mean", "weighted"] = "mean"
    train_layers: Literal["all", "selected"] = "all"
    personal_head: bool = True


class DPSection(_Section):
    noise_multiplier: float | None = Field(None, gt=0)
    target_epsilon: float | None = Field(None, gt=0)
    epsilon_budget: float | None = Field(None, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "prv"] = "rdp"

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier is not None or self.target_epsilon is not None

    @model_validator(mode="after")
    def _one_noise_source(self):
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError("set dp.noise_multiplier or dp.target_epsilon, not both")
        return self


class CodecSection(_Section):
    upload_dtype: Literal["fp32", "fp16"] = "fp32"
    download_dtype: Literal["fp32", "fp16"] = "fp32"


class PersonalSection(_Section):
    head_layers: int = Field(1, ge=1)
    head_epochs: int = Field(2, ge=1)
    body_epochs: int = Field(1, ge=1)


class FFGGSection(_Section):
    private: str = "head"
    private_epochs: int = Field(2, ge=1)
    global_epochs: int = Field(1, ge=1)
    server_lr: float = Field(1.0, gt=0)
    max_staleness: int = Field(0, ge=0)


class FedDPSection(_Section):
    variant: Literal["threshold", "gate"] = "threshold"
    threshold: float = Field(1e-3, gt=0)
    gate: float = Field(0.5, gt=0, lt=1)


class HideNseekSection(_Section):
    density: float = Field(0.2, gt=0, le=1)
    synflow_iterations: int = Field(20, ge=1)
    aggregation: Literal["vote", "mean"] = "vote"


class AggregatorSection(_Section):
    rule: Literal["mean", "median", "trimmed_mean", "centered_clip"] = "mean"
    trim: float = Field(0.2, ge=0, lt=0.5)
    clip_radius: float = Field(1.0, gt=0)
    clip_iterations: int = Field(3, ge=1)
    bucket: int = Field(0, ge=0)


class ByzantineSection(_Section):
    fraction: float = Field(0.0, ge=0, lt=1)
    attack: Literal["sign_flip", "scale", "noise"] = "sign_flip"
    scale: float = Field(4.0, gt=0)
    noise: float = Field(1.0, gt=0)


Strategies = Literal["fedavg", "fedp3", "fedper", "fedrep", "ffgg", "heterofl", "fedrolex", "fjord",
                     "feddp", "local", "hidenseek"]


class LearningSettings(_Section):
    """What a run learns and how: shared by `fedprune simulate` and the coordinator service, so a
    key means the same in both."""

    strategy: Strategies = "fedavg"
    dataset: Literal["fashion-mnist", "fmnist", "mnist", "femnist"] = "fashion-mnist"
    data_dir: str | None = None
    model: str = "fedp3_cnn"
    slicing: Literal["prefix", "rolling", "magnitude"] = "prefix"
    # Without a fleet: device i gets width_levels[i % len] (HeteroFL, FedRolex, FjORD tiers).
    width_levels: list[float] | None = None
    seed: int = 0
    train: TrainSection = TrainSection()
    fedp3: FedP3Section = FedP3Section()
    personal: PersonalSection = PersonalSection()
    ffgg: FFGGSection = FFGGSection()
    feddp: FedDPSection = FedDPSection()
    hidenseek: HideNseekSection = HideNseekSection()
    aggregator: AggregatorSection = AggregatorSection()
    dp: DPSection = DPSection()
    codec: CodecSection = CodecSection()

    @field_validator("width_levels")
    @classmethod
    def _levels(cls, value):
        if value is not None and (not value or not all(0 < w <= 1 for w in value)):
            raise ValueError("width_levels must be a non-empty list of widths in (0, 1]")
        return value


class SimulationConfig(LearningSettings):
    clients: int = Field(10, ge=1)
    fraction: float = Field(1.0, gt=0, le=1)
    partition: str = "classes:5"
    max_client_samples: int | None = Field(None, ge=2)
    fleet: str | None = None  # "catalogue[:seed]": sample device profiles and plan each submodel
    # How a fleet's devices are sized (coordinator/planning/fleet.py): per device ("planned"),
    # or a baseline without a planner ("uniform", "full", "full-all").
    sizing: Literal["planned", "uniform", "full", "full-all"] = "planned"
    deadline_seconds: float = Field(600.0, gt=0)  # a round's deadline on the simulated clock
    # Accuracies whose simulated time-to-reach the results report (planned fleets).
    target_accuracies: list[float] = Field([0.5, 0.6, 0.7, 0.8], max_length=20)
    rounds: int = Field(3, ge=1)
    export_dir: str | None = None  # export every client's final model here, one folder each
    export_formats: list[Literal["onnx", "tflite"]] = Field(["onnx", "tflite"], min_length=1)
    export_precisions: list[Literal["fp32", "fp16", "int8"]] = Field(["fp32"], min_length=1)
    byzantine: ByzantineSection = ByzantineSection()


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value`: the value is read as a TOML literal (numbers, booleans, quoted strings), and
    as a bare string when it is not one, so `fedp3.selection=opu3` works unquoted."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set fedp3.global_keep=0.7")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    except (ValueError, RecursionError) as exc:  # >4,300 digits; nesting deeper than the stack
        raise ConfigError(f"--set {item[:80]!r}: the value cannot be parsed "
                          f"({str(exc)[:120] or type(exc).__name__})") from None
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type[BaseModel] = SimulationConfig, **direct: Any) -> Any:
    """Defaults < TOML file < `direct` (explicit CLI flags) < `--set` overrides, as `schema`."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_toml(path, "config file", ConfigError)
    for key, value in direct.items():
        if value is not None:
            _assign(data, key.split("."), value)
    for item in overrides or []:
        keys, value = parse_override(item)
        _assign(data, keys, value)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        problems = describe(exc, "config")
        raise ConfigError(f"invalid configuration: {problems}") from None


def _assign(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys)}: {key} is a value, not a section")
        node = child
    node[keys[-1]] = value
