"""What a device can give to training, as one validated, versioned JSON document.

The memory planner sizes each device's submodel from this profile, so a profile
that is silently wrong (available memory above the physical total, a negative
bandwidth, a typo'd field) would produce plans that crash or stall on the
device. Validation is therefore strict (no string-to-number coercion, no unknown
fields) and every problem is reported at once, with its field path, so a
hand-edited or truncated profile can be fixed in one pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .files import atomic_write

__all__ = [
    "SUPPORTED_SCHEMA_VERSIONS",
    "BatteryProfile",
    "ComputeProfile",
    "DeviceProfile",
    "NetworkProfile",
    "ProfileError",
    "ProfilingError",
    "load_profile",
    "parse_profile",
]

SUPPORTED_SCHEMA_VERSIONS: tuple[int, ...] = (1,)

_FIX_HINT = (
    "Re-run `fedprune-edge profile` on the device to write a fresh profile, "
    "or fix the field(s) listed above."
)

# Strict: a profile is machine-written, so "4096" for a byte count or "yes" for a
# bool means the file was damaged or hand-edited wrongly; coercing would hide it.
# NaN/inf would pass "> 0" checks (inf) or poison every sum downstream (NaN).
_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

# No control characters (C0, DEL, C1): these strings are printed (`fedprune devices` shows the
# name), and an ESC would start a terminal escape sequence.
_NonEmptyStr = Annotated[str, Field(min_length=1, pattern=r"^[^\x00-\x1f\x7f-\x9f]+$")]


class ProfileError(ValueError):
    """A profile that cannot be used; `problems` holds one `path: message` per defect.

    Subclasses ValueError so callers that treat bad input generically still catch it.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems: list[str] = list(problems or [])


class ProfilingError(ValueError):
    """A profile that cannot be measured as asked (no memory left to train in, an unreachable
    broker, a malformed --bandwidth); `fedprune-edge profile` prints the message, not a traceback."""


class ComputeProfile(BaseModel):
    """Measured training speed of a reference model, which the planner rescales by FLOPs."""

    model_config = _STRICT

    reference_model: _NonEmptyStr
    samples_per_s: float = Field(gt=0)
    dp_samples_per_s: float = Field(gt=0)
    batch_size: int = Field(gt=0)


class NetworkProfile(BaseModel):
    """Link speed to the coordinator; `source` says how much to trust the numbers."""

    model_config = _STRICT

    uplink_bytes_per_s: float = Field(gt=0)
    downlink_bytes_per_s: float = Field(gt=0)
    latency_ms: float | None = Field(default=None, ge=0)
    source: Literal["measured", "given", "catalogue", "trace"]


class BatteryProfile(BaseModel):
    """Battery state at profiling time; absent on mains-powered devices."""

    model_config = _STRICT

    percent: float = Field(ge=0, le=100)
    charging: bool


class DeviceProfile(BaseModel):
    """One device's resources.

    Field order matters: the cross-field memory checks read earlier fields from
    the validation context, which pydantic fills in declaration order.
    """

    model_config = _STRICT

    schema_version: Literal[1]
    name: _NonEmptyStr
    source: _NonEmptyStr
    memory_total_bytes: int = Field(gt=0)
    memory_available_bytes: int = Field(gt=0)
    cgroup_limit_bytes: int | None = Field(default=None, gt=0)
    cpu_cores: int = Field(gt=0)
    arch: _NonEmptyStr
    os: _NonEmptyStr
    compute: ComputeProfile
    disk_free_bytes: int | None = Field(default=None, ge=0)
    network: NetworkProfile
    battery: BatteryProfile | None = None
    libraries: dict[str, str] = Field(default_factory=dict)

    # Field validators rather than a model validator: a model validator only runs
    # when every field is valid, so "available > total" would go unreported
    # whenever another field is also wrong.
    @field_validator("memory_available_bytes")
    @classmethod
    def _available_within_total(cls, value: int, info: ValidationInfo) -> int:
        total = info.data.get("memory_total_bytes")
        if total is not None and value > total:
            raise ValueError(f"{value} exceeds memory_total_bytes ({total})")
        return value

    @field_validator("cgroup_limit_bytes")
    @classmethod
    def _available_within_cgroup(cls, value: int | None, info: ValidationInfo) -> int | None:
        available = info.data.get("memory_available_bytes")
        if value is not None and available is not None and available > value:
            raise ValueError(
                f"memory_available_bytes ({available}) exceeds this cgroup limit ({value}); "
                f"training can never use more than its container allows"
            )
        return value

    def save(self, path: str | Path) -> None:
        """Write JSON (indent 2) atomically, so a crash never leaves half a profile."""
        atomic_write(path, (self.model_dump_json(indent=2) + "\n").encode())


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(part) for part in error["loc"]) or "(profile)"
    kind = error["type"]
    if kind == "missing":
        return f"{path}: missing"
    if kind == "extra_forbidden":
        return f"{path}: unknown field (not part of schema_version 1)"
    if kind == "value_error":
        # Our own cross-field messages already quote the values involved.
        return f"{path}: {error['msg'].removeprefix('Value error, ')}"
    shown = repr(error["input"])
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{path}: {error['msg']} (got {shown})"


def parse_profile(data: Any, origin: str = "profile") -> DeviceProfile:
    """Validate a decoded JSON document, raising ProfileError that lists every defect.

    The schema version is checked first: fields of a newer schema would otherwise
    show up as a confusing list of unknown and missing fields.
    """
    if not isinstance(data, dict):
        raise ProfileError(
            f"{origin}: expected a JSON object, got {type(data).__name__}. {_FIX_HINT}",
            [f"(profile): expected a JSON object, got {type(data).__name__}"],
        )
    version = data.get("schema_version")
    if "schema_version" in data and (type(version) is not int or version not in SUPPORTED_SCHEMA_VERSIONS):
        readable = ", ".join(str(v) for v in SUPPORTED_SCHEMA_VERSIONS)
        problem = f"schema_version: {version!r} is not supported; this build reads schema_version {readable}"
        raise ProfileError(
            f"{origin}: {problem}. Re-run `fedprune-edge profile` with this build of fedprune, "
            f"or upgrade fedprune to one that reads schema_version {version!r}.",
            [problem],
        )
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors(include_url=False)]
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ProfileError(
            f"{origin}: invalid device profile ({len(problems)} problem(s)):\n{listing}\n{_FIX_HINT}",
            problems,
        ) from None


def load_profile(path: str | Path) -> DeviceProfile:
    """Read and validate a profile written by `DeviceProfile.save` or `fedprune-edge profile`."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(
            f"no device profile at {source}: run `fedprune-edge profile` on the device to create it, "
            f"or use a catalogue profile instead."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read device profile {source}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(
            f"{source} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}). "
            f"{_FIX_HINT}"
        ) from None
    except (ValueError, RecursionError) as exc:  # a >4,300-digit integer; nesting past the stack
        raise ProfileError(f"{source} cannot be parsed as JSON ({str(exc)[:120]}). {_FIX_HINT}") from None
    return parse_profile(data, origin=str(source))
