"""Header schemas per message type, validated with pydantic on receipt.

Unknown header fields are ignored (a newer peer may add fields within envelope version 1);
missing or mistyped ones are refused with the field named. Device and task ids are checked with
`topics.check_id` here, at parse time, because both sides build topics and file names from them;
every float must be finite (a NaN or Infinity epsilon would poison sums and the database). The
idempotency key of a task and of its update is (device, round, task): a redelivered or replayed
update carries the same key and is counted once.
"""

from __future__ import annotations

import enum
from functools import partial
from typing import Annotated, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StringConstraints,
                      ValidationError, field_validator, model_validator)

from .envelope import Envelope, EnvelopeError, MessageType, encode_envelope
from .signing import sign
from .topics import check_id
from ..settings import DPSettings, TrainSettings
from ..validation import describe

# What a device says about itself is bounded, so nothing the coordinator stores or sums from it
# overflows (sample counts are INTEGER columns; two epsilons of 1e308 summed are Infinity, and an
# error on PostgreSQL). An epsilon this large is no privacy at all, but a device that trained
# with almost no noise reports it honestly; a training run longer than 100 days is not one.
MAX_SAMPLES = 2**31 - 1
MAX_EPSILON = 1e15
MAX_TRAIN_SECONDS = 1e7

MAX_SKIP_REASONS = 32
MAX_SECAGG_DIM = 2 ** 28  # the secagg library's largest global vector

DeviceId = Annotated[str, AfterValidator(partial(check_id, "device id"))]
SkipReason = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,39}$")]
TaskId = Annotated[str, AfterValidator(partial(check_id, "task id"))]


class _Header(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)
    device_id: DeviceId


class _TaskKey(_Header):
    round: int = Field(ge=1)
    task: TaskId


class RegisterHeader(_Header):
    profile: dict[str, Any]
    num_samples: int = Field(ge=1, le=MAX_SAMPLES)  # local training samples the device holds
    formats: list[str] = ["onnx"]              # runtimes it can run exported models in
    sdk_version: str = "unknown"
    epsilon_spent: float | None = Field(None, ge=0, le=MAX_EPSILON)
    epsilon_budget: float | None = Field(None, gt=0, le=MAX_EPSILON)
    model_digest: str | None = None            # spec digest of the model the device holds
    # Samples its data source could not use, by reason (`unreadable_image`, `not_numeric`, ...):
    # counts only, nothing of the data itself. `num_samples` counts only the usable ones.
    skipped: dict[SkipReason, Annotated[int, Field(ge=0, le=MAX_SAMPLES)]] = \
        Field(default_factory=dict, max_length=MAX_SKIP_REASONS)


class TaskHeader(_TaskKey):
    plan: dict[str, Any]                       # SubmodelPlan.to_dict()
    train: TrainSettings
    dp: DPSettings | None = None               # None: no DP; the device adds its own budget
    planned_rounds: int = Field(ge=1)
    # The chance this device is drawn in a round: a dp.target_epsilon is spread over the tasks
    # it is expected to run (rounds left x this), not over every planned round.
    selection_rate: float = Field(1.0, gt=0, le=1)
    deadline: float      # coordinator's unix time; it alone judges lateness (device clocks drift)
    width_ratio: float = Field(1.0, gt=0, le=1)
    leader_epoch: int = Field(0, ge=0)         # the sending leader's fencing epoch (cluster mode)
    # Under secure aggregation: no UPDATE; the device answers the round's SECAGG stages.
    secure_aggregation: SecureTask | None = None

    @field_validator("dp")
    @classmethod
    def _dp_names_its_noise(cls, dp: DPSettings | None) -> DPSettings | None:
        if dp is not None and not dp.enabled:
            raise ValueError("dp names neither noise_multiplier nor target_epsilon; send dp: null "
                             "for a task without DP")
        return dp


class SecureTensor(BaseModel):
    """Where one uploaded tensor sits in the round's global flat vector: its first coordinate and
    its full (global) size. The device's support coordinates in [offset, offset + size) are this
    tensor's entries at its width, in the tensor's own row-major order."""
    model_config = ConfigDict(extra="ignore", frozen=True)
    name: str = Field(min_length=1, max_length=512)
    offset: int = Field(ge=0, le=MAX_SECAGG_DIM)
    size: int = Field(ge=1, le=MAX_SECAGG_DIM)


class SecureTask(BaseModel):
    """TASK's `secure_aggregation`: the device keeps what it trained and answers the round's
    SECAGG stages with its clipped, quantized, noised change (edge_sdk/secagg/quantize.py)."""
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)
    clip_norm: float = Field(gt=0, le=1e12)
    scale: float = Field(gt=0, le=2.0 ** 60)
    bits: int = Field(ge=8, le=32)
    noise_sigma: float = Field(ge=0, le=2.0 ** 16)
    tensors: list[SecureTensor] = Field(min_length=1, max_length=4096)

    @field_validator("tensors")
    @classmethod
    def _disjoint(cls, tensors: list[SecureTensor]) -> list[SecureTensor]:
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise ValueError("a tensor is named twice")
        spans = sorted((t.offset, t.offset + t.size) for t in tensors)
        if any(end > start for (_, end), (start, _) in zip(spans, spans[1:])):
            raise ValueError("tensors overlap in the global vector")
        return tensors


class UpdateHeader(_TaskKey):
    num_samples: int = Field(ge=1, le=MAX_SAMPLES)
    epsilon: float | None = Field(None, ge=0, le=MAX_EPSILON)
    train_seconds: float = Field(0.0, ge=0, le=MAX_TRAIN_SECONDS)
    local_accuracy: float | None = Field(None, ge=0, le=1)  # personal model, local test split
    payload_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # checked by the coordinator


class AckHeader(_TaskKey):
    accepted: bool
    duplicate: bool = False
    reason: str | None = None


class RefusalCode(str, enum.Enum):
    PRIVACY_BUDGET = "privacy_budget"          # the task would exceed the device's epsilon budget
    PRIVACY_POLICY = "privacy_policy"          # the task asks for less privacy than the device's
                                               # own config requires (no DP, or a larger delta)
    BAD_TASK = "bad_task"                      # the task could not be decoded or run as sent
    INTERNAL = "internal"                      # the device failed while training
    BAD_ARTIFACT = "bad_artifact"              # the exported model was refused (not stored); the
                                               # task it came with is unaffected
    STALE = "stale"                            # the task or artifact comes from an older leader
                                               # epoch, or an older round, than one the device has
                                               # already seen (a deposed leader or a replay)


class RefusalHeader(_TaskKey):
    code: RefusalCode
    message: str = Field(max_length=4096)
    epsilon: float | None = Field(None, ge=0, le=MAX_EPSILON)


class SecAggStage(str, enum.Enum):
    """A stage message's name; its value in the library's message kind byte (payload offset 5)
    is `SECAGG_KINDS`. The first four go coordinator -> device, the others device -> coordinator."""
    SETUP = "setup"
    KEYS = "keys"
    FORWARD = "forward"
    UNMASK_REQUEST = "unmask_request"
    ADVERTISE = "advertise"
    SHARES = "shares"
    MASKED = "masked"
    UNMASK = "unmask"


SECAGG_KINDS = {SecAggStage.SETUP: 1, SecAggStage.ADVERTISE: 2, SecAggStage.KEYS: 3,
                SecAggStage.SHARES: 4, SecAggStage.FORWARD: 5, SecAggStage.MASKED: 6,
                SecAggStage.UNMASK_REQUEST: 7, SecAggStage.UNMASK: 8}
TO_DEVICE_STAGES = frozenset({SecAggStage.SETUP, SecAggStage.KEYS, SecAggStage.FORWARD,
                              SecAggStage.UNMASK_REQUEST})
SECAGG_MAGIC = b"FPSA"


class SecAggHeader(_TaskKey):
    """One secure-aggregation stage of a task; the payload is the library's message for it.
    MASKED also reports what an UPDATE would (none of it is the update)."""
    stage: SecAggStage
    num_samples: int | None = Field(None, ge=1, le=MAX_SAMPLES)
    epsilon: float | None = Field(None, ge=0, le=MAX_EPSILON)
    train_seconds: float | None = Field(None, ge=0, le=MAX_TRAIN_SECONDS)
    local_accuracy: float | None = Field(None, ge=0, le=1)
    leader_epoch: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _reports_only_with_the_masked_input(self):
        reported = (self.num_samples, self.epsilon, self.train_seconds, self.local_accuracy)
        if self.stage == SecAggStage.MASKED and self.num_samples is None:
            raise ValueError("a masked stage message reports num_samples")
        if self.stage != SecAggStage.MASKED and any(v is not None for v in reported):
            raise ValueError(f"a {self.stage.value} stage message reports nothing of training")
        return self


def check_secagg_payload(header: SecAggHeader, payload: bytes, sender_is_device: bool) -> None:
    """The payload is the library's message of the header's stage, in the direction it travels:
    EnvelopeError naming the mismatch otherwise (the library then checks the rest)."""
    if (header.stage in TO_DEVICE_STAGES) == sender_is_device:
        raise EnvelopeError(f"a {header.stage.value} stage message goes "
                            f"{'coordinator -> device' if sender_is_device else 'device -> coordinator'}")
    if len(payload) < 6 or payload[:4] != SECAGG_MAGIC:
        raise EnvelopeError(f"the {header.stage.value} stage's payload is not a secure-aggregation "
                            "message (magic FPSA)")
    if payload[5] != SECAGG_KINDS[header.stage]:
        raise EnvelopeError(f"the header says stage {header.stage.value}, the payload is message "
                            f"kind {payload[5]}")


class StatusHeader(_Header):
    online: bool


class ArtifactHeader(_Header):
    round: int = Field(ge=0)                   # the round of the model (the global model it is)
    task: TaskId                               # the task it starts: a refusal names it
    manifest: dict[str, Any]                   # the bundle's manifest.json
    artifact: str                              # which entry of the manifest the payload is (path)
    leader_epoch: int = Field(0, ge=0)         # the sending leader's fencing epoch (cluster mode)


_SCHEMAS: dict[MessageType, type[_Header]] = {
    MessageType.REGISTER: RegisterHeader, MessageType.TASK: TaskHeader,
    MessageType.UPDATE: UpdateHeader, MessageType.ACK: AckHeader,
    MessageType.REFUSAL: RefusalHeader, MessageType.STATUS: StatusHeader,
    MessageType.ARTIFACT: ArtifactHeader, MessageType.SECAGG: SecAggHeader,
}


_TYPES: dict[type[BaseModel], MessageType] = {schema: kind for kind, schema in _SCHEMAS.items()}


def message_type(header: BaseModel) -> MessageType:
    """The message type a header model travels as (the `_SCHEMAS` table read backwards)."""
    kind = _TYPES.get(type(header))
    if kind is None:
        raise TypeError(f"{type(header).__name__} is not the header of any message type")
    return kind


def encode_message(header: BaseModel, payload: bytes = b"", *,
                   signing_key: Ed25519PrivateKey | None = None) -> bytes:
    """The envelope of a message built from its header model, signed when `signing_key` is given.

    Every message is built here, from its model, never from a dict literal, so a field the
    receiver requires cannot be missing from what a sender sends (`model.model_dump(mode="json")`
    is exactly what the receiver's `parse_header` validates).
    """
    fields = header.model_dump(mode="json")
    if signing_key is not None:
        fields = sign(fields, payload, signing_key)
    return encode_envelope(message_type(header), fields, payload)


def parse_header(envelope: Envelope, expected: MessageType | None = None) -> _Header:
    """The validated header of `envelope`; EnvelopeError naming the fields otherwise."""
    schema = _SCHEMAS.get(envelope.type)
    if schema is None:
        raise EnvelopeError(f"unknown message type {envelope.type!r}")
    if expected is not None and envelope.type != expected:
        raise EnvelopeError(f"expected a {expected.name} message, got {envelope.type.name}")
    try:
        return schema.model_validate(envelope.header)
    except ValidationError as exc:
        problems = describe(exc, "header")
        raise EnvelopeError(f"{envelope.type.name} header is invalid: {problems}") from None
