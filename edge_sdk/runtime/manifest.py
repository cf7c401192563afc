"""`manifest.json`: what travels beside every exported model and tells a device how to use it.

It is the input contract (shape, scale, mean, std, labels) a device must honour to get the
accuracy measured at export time, the provenance (device, round, spec digest, checkpoint hash,
exporter versions) an operator needs to trace a prediction back to a training round, and the
parity figures that justified publishing each artifact. Validated with pydantic on load so a
hand-edited or truncated manifest fails with the field that is wrong; it arrives from the
coordinator too (ARTIFACT headers), so it is parsed with the bounded JSON loader and every float
must be finite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from device_profiles.files import atomic_write

from ..validation import describe, load_json
from .backends import RuntimeFormatName
from .bundle_files import ManifestError, read_bundle_file

MANIFEST_NAME = "manifest.json"
MANIFEST_LIMIT = 1024 * 1024  # bytes; a real manifest is a few kB

Format = RuntimeFormatName  # a format this build has a runtime for (backends.py registers them)
Precision = Literal["fp32", "fp16", "int8"]


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
    dataset: str
    input_shape: tuple[int, int, int]
    input_layout: Literal["NCHW"] = "NCHW"
    input_scale: float = Field(gt=0)  # raw values are divided by it, then standardised
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    parameters: int = Field(ge=0)
    nonzero_parameters: int = Field(ge=0)
    sparsity: float = Field(ge=0, le=1)
    macs_per_sample: int = Field(ge=0)
    flops_per_sample: int = Field(ge=0)  # 2 x MACs, dense: runtimes multiply by zeros too
    checkpoint_sha256: str | None = None
    exporters: dict[str, str]
    created_at: str
    artifacts: tuple[ArtifactEntry, ...] = ()

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
