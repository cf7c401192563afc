"""Run configuration: one validated tree, from defaults, a TOML file and `--set key=value`.

Validation is pydantic's; our part is only the layering (file, then overrides) and error text
that names the key and the accepted values.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from edge_sdk.argtypes import data_dir_problem
from edge_sdk.data.sources import CONFIG_DIR, DataSettings
from edge_sdk.settings import (CodecSettings, DeviceState, DPSettings, Settings, TrainSettings,
                               WidthLevels)
from edge_sdk.validation import problems, read_toml
from export.formats import ExportFormatName

from .backends import BackendName
from .byzantine import ByzantineSettings
from .central_dp import CentralDPSettings, conflict
from .robust import AggregatorSettings
from .secure_round import SecureAggregationSettings, simulation_conflict
from .secure_round import conflict as secure_conflict
from .strategies import strategy_sections
from .strategies.registry import check_strategy_name, strategy_entry


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what it accepts."""


StrategyName = Annotated[str, AfterValidator(check_strategy_name)]


class LearningSettings(Settings):
    """What a run learns and how: shared by `fedprune simulate` and the coordinator service, so a
    key means the same in both.

    Each registered strategy's settings section (`[fedp3]`, `[personal]`, ...) is a key of this
    model too, read from the strategy registry when a configuration is validated, so a strategy
    added in one file gets its section without an edit here."""

    # Unknown keys are still refused (in `_strategy_sections`): allowing extras is how the
    # registry's sections enter a model whose fields are fixed when the class is made.
    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False,
                              json_schema_extra=lambda schema, cls: _add_strategy_sections(schema))

    strategy: StrategyName = "fedavg"
    dataset: Literal["fashion-mnist", "fmnist", "mnist", "femnist"] = "fashion-mnist"
    data_dir: str | None = None
    model: str = "fedp3_cnn"
    slicing: Literal["prefix", "rolling", "magnitude"] = "prefix"
    # Without a fleet: device i gets width_levels[i % len] (HeteroFL, FedRolex, FjORD tiers).
    width_levels: WidthLevels | None = None
    seed: int = 0
    train: TrainSettings = TrainSettings()
    aggregator: AggregatorSettings = AggregatorSettings()
    dp: DPSettings = DPSettings()
    # User-level DP at a trusted coordinator (DP-FedAvg, coordinator/central_dp.py): each
    # device's change clipped, the sum noised; off unless a noise multiplier or target is set.
    central_dp: CentralDPSettings = CentralDPSettings()
    # SecAgg+ with distributed discrete Gaussian noise (coordinator/secure_round.py): the
    # coordinator learns only the sum of the devices' clipped, noised changes.
    secure_aggregation: SecureAggregationSettings = SecureAggregationSettings()
    codec: CodecSettings = CodecSettings()
    # The run's data (edge_sdk/data/sources/settings.py lists the keys): an image folder, a CSV,
    # an npz, a user's Dataset function, a benchmark; without it, the benchmark `dataset`. A
    # simulation partitions it; the coordinator service takes its input contract and evaluates
    # on its held-out samples (coordinator/service/config.py).
    data: DataSettings | None = None
    # Why [data]'s clients, partition and device_index are refused (a subclass words its own).
    shard_keys_help: ClassVar[str] = ("clients, partition and device_index pick a device's shard "
                                      "of a benchmark: they belong in a device's edge.toml")

    @field_validator("model")
    @classmethod
    def _model_reference(cls, value: str, info: ValidationInfo) -> str:
        """A `package.module:function` model is imported now, from the config file's folder first
        (a project's model.py resolves as `model:build`); a typo is a configuration error."""
        if ":" in value:
            from edge_sdk.models import allow_reference

            allow_reference(value, (info.context or {}).get(CONFIG_DIR))
        return value

    @field_validator("data_dir")
    @classmethod
    def _existing_data_dir(cls, value: str | None) -> str | None:
        """A typo here would download the dataset into the mistyped folder (as --data-dir's)."""
        problem = value and data_dir_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _one_data_source(self):
        if self.data is None:
            return self
        named = sorted({"dataset", "data_dir"} & self.model_fields_set)
        if named:
            raise ValueError(f"{named[0]}: the data is named in [data]; set data.source and its "
                             f"keys there (a benchmark: data.dataset), not {' and '.join(named)}")
        shard_keys = sorted({"clients", "partition", "device_index"} & self.data.model_fields_set)
        if shard_keys:
            raise ValueError(f"data.{shard_keys[0]}: {self.shard_keys_help}")
        return self

    @model_validator(mode="after")
    def _central_dp_fits(self):
        """Central DP with a rule or an upload its noise cannot be sized for is refused now,
        not found out by a run that reports an epsilon it does not give."""
        problem = conflict(self, strategy_entry(self.strategy).cls.bounded_updates)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _secure_aggregation_fits(self):
        """What secure aggregation cannot run with is refused before any round: sign uploads,
        robust rules (they need each update), central DP, DP-SGD unless asked for."""
        problem = secure_conflict(self, strategy_entry(self.strategy).cls.bounded_updates)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def data_settings(self) -> DataSettings:
        """The run's data: its [data], or the benchmark `dataset`."""
        if self.data is not None:
            return self.data
        return DataSettings(dataset=self.dataset, data_dir=self.data_dir)

    @model_validator(mode="after")
    def _strategy_sections(self):
        """Validate every registered strategy's section (defaults where absent) and refuse any
        other key not declared above."""
        sections = strategy_sections()
        extra = self.__pydantic_extra__
        unknown = sorted(set(extra) - set(sections))
        if unknown:
            known = [*type(self).model_fields, *sections]
            near = [n for key in unknown for n in difflib.get_close_matches(key, known, 1, 0.6)]
            raise ValueError(f"{', '.join(unknown)}: not a setting" + (
                f"; did you mean {' or '.join(near)}?" if near else
                f"; the settings are {', '.join(type(self).model_fields)} and the strategy "
                f"sections {', '.join(sections)}"))
        for name, model in sections.items():
            value = extra.get(name, {})
            if isinstance(value, model):
                continue
            try:
                extra[name] = model.model_validate(value)
            except ValidationError as exc:  # a line a problem, as load_config shows them
                raise ValueError("\n".join(problems(exc, name, model, within=name))) from None
        return self


def _add_strategy_sections(schema: dict[str, Any]) -> None:
    for name, model in strategy_sections().items():
        schema.setdefault("properties", {})[name] = model.model_json_schema()


class SimulationSettings(LearningSettings):
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
    # Score every device (its own model and the global one, on its test split) every this many
    # rounds and in the last; the global model on the official test set is scored every round.
    # With thousands of devices the devices' scoring is most of a round.
    eval_every: int = Field(1, ge=1)
    export_dir: str | None = None  # export every client's final model here, one folder each
    export_formats: list[ExportFormatName] = Field(["onnx", "tflite"], min_length=1)
    export_precisions: list[Literal["fp32", "fp16", "int8"]] = Field(["fp32"], min_length=1)
    byzantine: ByzantineSettings = ByzantineSettings()
    # Where the devices run their tasks (coordinator/backends/): all in this process, or Ray's
    # pooled workers on the Ray cluster at `ray_address` (None: a local one; "auto": the one
    # `ray start` runs on this machine). The results are the same for the same seed.
    backend: BackendName = "inprocess"
    ray_address: str | None = None
    # Intra-op threads a device computes with (None: the driver's torch threads). A task's bytes
    # depend on it, so both backends use it; the Ray backend's actors need it to equal the run's.
    device_threads: int | None = Field(None, ge=1)
    # What a simulated device keeps between its tasks (edge_sdk.settings.DeviceState); with
    # "private" its own model is the global one with its private tensors. Training, uploads and
    # the global model are the same either way.
    device_state: DeviceState = "model"
    shard_keys_help: ClassVar[str] = ("a simulation's clients and partition are its own `clients` "
                                      "and `partition` keys (device_index is a device's)")

    @model_validator(mode="after")
    def _central_dp_fleet(self):
        """A simulation draws its rounds from its own `clients`."""
        size = self.central_dp.fleet_size
        if size is not None and size != self.clients:
            raise ValueError(f"central_dp.fleet_size: a simulation draws its rounds from its "
                             f"{self.clients} clients; leave fleet_size out (got {size})")
        return self

    @model_validator(mode="after")
    def _private_state_only(self):
        """What needs each device's whole model is refused when devices keep only private tensors."""
        if self.device_state == "private":
            needs = [what for what, on in (("export_dir (exports each device's model)", self.export_dir),
                                           ("secure_aggregation (a device sends its change from "
                                            "the model its task started from)",
                                            self.secure_aggregation.enabled)) if on]
            if needs:
                raise ValueError(f"device_state='private' keeps only each device's private "
                                 f"tensors; {needs[0]} needs its whole model: use "
                                 "device_state='model'")
        return self

    @model_validator(mode="after")
    def _secure_aggregation_in_the_simulator(self):
        problem = simulation_conflict(self)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def central_dp_sample_rate(self) -> float:
        """q: each client's chance of a round, devices per round over clients."""
        return max(1, round(self.fraction * self.clients)) / self.clients


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
                schema: type[BaseModel] = SimulationSettings, **direct: Any) -> Any:
    """Defaults < TOML file < `direct` (explicit CLI flags) < `--set` overrides, as `schema`."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_toml(path, "config file", ConfigError)
    for key, value in direct.items():
        if value is not None:
            _assign(data, key.split("."), value)
    for item in overrides or []:
        keys, value = parse_override(item)
        key = ".".join(keys)
        if direct.get(key) is not None and direct[key] != value:
            raise ConfigError(f"{key} is given twice: {direct[key]!r} by its own flag and {value!r} "
                              f"by --set {item}; give it once")
        _assign(data, keys, value)
    try:
        # [data] paths and a project's data.py are read from the config file's folder
        context = {CONFIG_DIR: Path(path).resolve().parent} if path is not None else None
        return schema.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(invalid_configuration(exc, schema)) from None


def invalid_configuration(exc: ValidationError, schema: type[BaseModel]) -> str:
    """`invalid configuration: key: what is wrong (got X)`, a line a problem when there are
    several, so a file with three typos reads as three lines, not one run-on sentence."""
    found = [line for problem in problems(exc, "config", schema) for line in problem.split("\n")]
    if len(found) == 1:
        return f"invalid configuration: {found[0]}"
    return f"invalid configuration ({len(found)} problems):\n" + "\n".join(f"  {p}" for p in found)


def _assign(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys)}: {key} is a value, not a section")
        node = child
    node[keys[-1]] = value
