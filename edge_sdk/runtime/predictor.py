"""Load a device's bundle and classify raw inputs with the exported model.

The predictor applies the manifest's input contract itself (divide by `input_scale`, then
standardise per channel), so callers hand it raw pixels exactly as a sensor or file gives them.
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


def normalise(raw: np.ndarray, input_shape, input_scale: float, mean, std) -> np.ndarray:
    """(N, C, H, W), (N, H, W) for one channel, or one sample without N -> float32 (N, C, H, W)."""
    arr = np.asarray(raw, dtype=np.float32)
    channels, height, width = input_shape
    if arr.shape[-2:] != (height, width):
        raise ValueError(f"input has shape {arr.shape}; this model takes {height}x{width} images "
                         f"with {channels} channel(s)")
    if arr.ndim == 2 or (arr.ndim == 3 and channels != 1 and arr.shape[0] == channels):
        arr = arr[None]
    if arr.ndim == 3:
        arr = arr[:, None] if channels == 1 else arr
    if arr.ndim != 4 or arr.shape[1] != channels:
        raise ValueError(f"input has shape {arr.shape}; expected (N, {channels}, {height}, {width})")
    mean = np.asarray(mean, np.float32).reshape(1, channels, 1, 1)
    std = np.asarray(std, np.float32).reshape(1, channels, 1, 1)
    return np.ascontiguousarray((arr / np.float32(input_scale) - mean) / std, dtype=np.float32)


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
        """Predicted class indices; `manifest.labels[i]` names them."""
        return self.logits(raw).argmax(axis=1)
