"""`manifest.json`: what travels beside every exported model and tells a device how to use it.

It is the input contract a device must honour to get the accuracy measured at export time: the
model's own input shape (any rank its spec has: (C, H, W) images, (F,) features, (C, L)
signals; the batch axis comes first), and, where the training data was normalised, the
normalisation (divide by `input_scale`, then standardise along the first axis of a sample) and
the class labels. It also carries the provenance (device, round, spec digest, checkpoint hash,
exporter versions) an operator needs to trace a prediction back to a training round, and the
parity figures that justified publishing each artifact. Validated with pydantic on load so a
hand-edited or truncated manifest fails with the field that is wrong; it arrives from the
coordinator too (ARTIFACT headers), so it is parsed with the bounded JSON loader, every float
must be finite, and the contract's parts must agree with each other and with the spec.
"""

from __future__ import annotations

from pathlib import Path
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from device_profiles.files import atomic_write

from ..validation import describe, load_json
from .backends import RuntimeFormatName
from .bundle_files import ManifestError, read_bundle_file

MANIFEST_NAME = "manifest.json"
MANIFEST_LIMIT = 1024 * 1024  # bytes; a real manifest is a few kB

Format = RuntimeFormatName  # a format this build has a runtime for (backends.py registers them)
Precision = Literal["fp32", "fp16", "int8"]
# The batch axis, then the sample's axes channels-first, by the rank of the model's input; the
# normalisation's statistics run along the second letter (channels, or features).
LAYOUTS = {1: "NF", 2: "NCL", 3: "NCHW", 4: "NCDHW"}
Layout = Literal["NF", "NCL", "NCHW", "NCDHW"]
MAX_INPUT_ELEMENTS = 2**26  # per sample; as a model spec allows


def artifact_file_name(fmt: Format, precision: Precision) -> str:
    """The one name an artifact file has in a bundle, built from validated fields only: a
    device stores what it receives under this name, never under a name from the message."""
    return f"model-{precision}.{fmt}"


class Parity(BaseModel):
    """Agreement of one artifact with the torch model it came from, on real test inputs."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    runtime: str
    runtime_version: str
    samples: int = Field(ge=1)
    max_abs_diff: float = Field(ge=0)
    top1_agreement: float = Field(ge=0, le=1)
    accuracy: float | None = Field(None, ge=0, le=1)
    torch_accuracy: float | None = Field(None, ge=0, le=1)


class ArtifactEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    format: Format
    precision: Precision
    path: str                         # relative to the manifest
    bytes: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    compressed_path: str              # the same bytes, zstd-compressed: what is shipped
    compressed_bytes: int = Field(ge=1)
    batch: int | None = None          # None: dynamic batch dimension
    opset: int | None = None          # ONNX only
    parity: Parity


class BundleManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    schema_version: Literal[1] = 1
    device_id: str
    round: int | None = None
    model: str
    spec: dict
    spec_digest: str
    width_ratio: float = Field(gt=0, le=1)
    dataset: str | None = None        # None: the model was exported without a dataset's contract
    input_shape: tuple[int, ...] = Field(min_length=1, max_length=4)  # one sample, from the spec
    input_layout: Layout
    input_scale: float | None = Field(None, gt=0)   # raw values are divided by it (None: by 1)
    mean: tuple[float, ...] | None = None     # then (x - mean) / std along the sample's first axis;
    std: tuple[float, ...] | None = None      # None: no standardisation
    labels: tuple[str, ...] = ()              # class names by index; (): the index is the answer
    parameters: int = Field(ge=0)
    nonzero_parameters: int = Field(ge=0)
    sparsity: float = Field(ge=0, le=1)
    macs_per_sample: int = Field(ge=0)
    flops_per_sample: int = Field(ge=0)  # 2 x MACs, dense: runtimes multiply by zeros too
    checkpoint_sha256: str | None = None
    exporters: dict[str, str]
    created_at: str
    artifacts: tuple[ArtifactEntry, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _layout_from_rank(cls, data: Any) -> Any:
        """A manifest names its layout; one that omits it has the layout of its input's rank."""
        if isinstance(data, dict) and "input_layout" not in data \
                and isinstance(data.get("input_shape"), (list, tuple)):
            data = {**data, "input_layout": LAYOUTS.get(len(data["input_shape"]), "?")}
        return data

    @model_validator(mode="after")
    def _contract_agrees(self) -> BundleManifest:
        shape = self.input_shape
        if min(shape) < 1 or math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise ValueError(f"input_shape {shape} must be positive sizes, at most "
                             f"{MAX_INPUT_ELEMENTS:,} elements a sample")
        if self.input_layout != LAYOUTS[len(shape)]:
            raise ValueError(f"input_layout {self.input_layout} does not fit input_shape {shape} "
                             f"(rank {len(shape)} is {LAYOUTS[len(shape)]})")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std come together: give both, or neither")
        if self.mean is not None:
            if len(self.mean) != len(self.std) or len(self.mean) not in (1, shape[0]):
                raise ValueError(f"mean and std need one value, or one per entry of the input's "
                                 f"first axis ({shape[0]}); got {len(self.mean)} and {len(self.std)}")
            if min(self.std) <= 0:
                raise ValueError("every std must be positive")
        declared = self.spec.get("input_shape")
        if declared is not None and (not isinstance(declared, (list, tuple))
                                     or list(declared) != list(shape)):
            raise ValueError(f"input_shape {shape} is not the spec's input_shape {declared}")
        classes = self.spec.get("num_classes")
        if self.labels and isinstance(classes, int) and len(self.labels) != classes:
            raise ValueError(f"{len(self.labels)} labels for a model of {classes} classes")
        return self

    def artifact(self, fmt: str | None = None, precision: str | None = None) -> ArtifactEntry:
        """The first artifact matching both filters, or a clear error listing what there is."""
        for entry in self.artifacts:
            if (fmt is None or entry.format == fmt) and (precision is None or entry.precision == precision):
                return entry
        have = ", ".join(f"{a.format}/{a.precision}" for a in self.artifacts) or "none"
        raise ManifestError(f"bundle for {self.device_id} has no {fmt or 'any'}/"
                            f"{precision or 'any'} artifact (it has: {have}); export it with "
                            "`fedprune export --format ... --quantize ...`")

    def save(self, path: str | Path) -> None:
        atomic_write(path, self.model_dump_json(indent=2).encode())


def load_manifest(path: str | Path) -> BundleManifest:
    """Read a manifest, given its path or the bundle directory that holds it."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.exists():
        raise ManifestError(f"{path} does not exist; point at a bundle written by "
                            "`fedprune export --out DIR`")
    raw = read_bundle_file(path.parent, path.name, limit=MANIFEST_LIMIT)
    try:
        data = load_json(raw, str(path), ManifestError, MANIFEST_LIMIT)
    except ManifestError as exc:
        raise ManifestError(f"{exc}; re-export the bundle") from None
    try:
        return BundleManifest.model_validate(data)
    except ValidationError as exc:
        problems = describe(exc, "manifest")
        raise ManifestError(f"{path} is not a fedprune bundle manifest: {problems}") from None
