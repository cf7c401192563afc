"""Load a device's bundle and classify raw inputs with the exported model.

The predictor applies the manifest's input contract itself (the model's input shape, and where
the training data was normalised, divide by `input_scale`, then standardise along a sample's
first axis), so callers hand it raw values exactly as a sensor or file gives them.
The artifact's sha256 is checked before it is loaded: a corrupted or swapped file is refused.
Every file is read through `bundle_files`: confined to the bundle folder, regular, and of the
size the manifest declares.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .backends import Backend, open_backend
from .bundle_files import ManifestError, bundle_path, read_bundle_file, unpack
from .manifest import MANIFEST_NAME, ArtifactEntry, BundleManifest, load_manifest

# A model file is tens of MB at most; refuse a compressed artifact that claims more.
MAX_ARTIFACT_BYTES = 1 << 30


def normalise(raw: np.ndarray, input_shape, input_scale: float | None = None, mean=None,
              std=None) -> np.ndarray:
    """Raw inputs -> the float32 batch (N, *input_shape) the model takes.

    `raw` is a batch (N, *input_shape) or one sample (input_shape); a model whose first input
    axis has one entry (a grey image, a one-channel signal) also takes its samples without that
    axis. Values are divided by `input_scale` and standardised with `mean` and `std` (one value,
    or one per entry of the sample's first axis), each where given.
    """
    shape = tuple(int(v) for v in input_shape)
    arr = np.asarray(raw, dtype=np.float32)
    if arr.shape == shape:
        arr = arr[None]
    elif shape[0] == 1 and len(shape) > 1 and arr.ndim in (len(shape) - 1, len(shape)) \
            and arr.shape[1 - len(shape):] == shape[1:]:
        arr = arr.reshape(-1, *shape)  # samples without their first axis's single entry
    if arr.shape[1:] != shape:
        short = f" or (N, {', '.join(map(str, shape[1:]))})" if shape[0] == 1 and len(shape) > 1 else ""
        raise ValueError(f"input has shape {arr.shape}; this model takes (N, "
                         f"{', '.join(map(str, shape))}){short} or one such sample")
    if input_scale is not None:
        arr = arr / np.float32(input_scale)
    if mean is not None:
        stats = (1, len(mean)) + (1,) * (len(shape) - 1)
        arr = (arr - np.asarray(mean, np.float32).reshape(stats)) / np.asarray(std, np.float32).reshape(stats)
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_artifact(bundle_dir: Path, entry: ArtifactEntry) -> bytes:
    """The plain file if it is there, else the shipped .zst; either way confined to the bundle
    folder, of the sizes the manifest declares, and matching its sha256."""
    if entry.bytes > MAX_ARTIFACT_BYTES:
        raise ManifestError(f"the manifest says {entry.path[:200]!r} is {entry.bytes:,} bytes; the "
                            f"limit is {MAX_ARTIFACT_BYTES:,}")
    plain, packed = (bundle_path(bundle_dir, name) for name in (entry.path, entry.compressed_path))
    if os.path.lexists(plain):
        data = read_bundle_file(bundle_dir, entry.path, size=entry.bytes)
    elif os.path.lexists(packed):
        data = unpack(read_bundle_file(bundle_dir, entry.compressed_path, size=entry.compressed_bytes),
                      entry.bytes, str(packed))
    else:
        raise ManifestError(f"neither {plain} nor {packed} exists; the bundle is incomplete")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise ManifestError(f"{plain.name} has sha256 {digest[:12]}..., the manifest says "
                            f"{entry.sha256[:12]}...; the file is corrupt or replaced, re-export it")
    return data


class Predictor:
    def __init__(self, manifest: BundleManifest, backend: Backend, fmt: str, precision: str):
        self.manifest, self.backend = manifest, backend
        self.format, self.precision = fmt, precision

    @classmethod
    def open(cls, bundle: str | Path, fmt: str | None = None, precision: str | None = "fp32",
             threads: int | None = None) -> Predictor:
        """Open a bundle directory (or its manifest.json) with the artifact asked for."""
        bundle = Path(bundle)
        bundle_dir = bundle if bundle.is_dir() else bundle.parent
        manifest = load_manifest(bundle_dir / MANIFEST_NAME if bundle.is_dir() else bundle)
        entry = manifest.artifact(fmt, precision)
        data = read_artifact(bundle_dir, entry)
        return cls(manifest, open_backend(entry.format, data, threads), entry.format, entry.precision)

    def prepare(self, raw: np.ndarray) -> np.ndarray:
        m = self.manifest
        return normalise(raw, m.input_shape, m.input_scale, m.mean, m.std)

    def logits(self, raw: np.ndarray) -> np.ndarray:
        return self.backend.run(self.prepare(raw))

    def classify(self, raw: np.ndarray) -> np.ndarray:
        """Predicted class indices; `manifest.labels[i]` names them where the bundle has labels."""
        return self.logits(raw).argmax(axis=1)
