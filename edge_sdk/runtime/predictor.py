"""Load a device's bundle and classify raw inputs with the exported model.

The predictor applies the manifest's input contract itself (divide by `input_scale`, then
standardise per channel), so callers hand it raw pixels exactly as a sensor or file gives them.
The artifact's sha256 is checked before it is loaded: a corrupted or swapped file is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import zstandard

from .backends import Backend, open_backend
from .manifest import MANIFEST_NAME, BundleManifest, ManifestError, load_manifest

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


def read_artifact(bundle_dir: Path, path: str, compressed_path: str, sha256: str) -> bytes:
    """The plain file if it is there, else the shipped .zst; either way it must match sha256."""
    plain, packed = bundle_dir / path, bundle_dir / compressed_path
    if plain.exists():
        data = plain.read_bytes()
    elif packed.exists():
        data = zstandard.ZstdDecompressor().decompress(packed.read_bytes(),
                                                       max_output_size=MAX_ARTIFACT_BYTES)
    else:
        raise ManifestError(f"neither {plain} nor {packed} exists; the bundle is incomplete")
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ManifestError(f"{plain.name} has sha256 {digest[:12]}..., the manifest says "
                            f"{sha256[:12]}...; the file is corrupt or replaced, re-export it")
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
        data = read_artifact(bundle_dir, entry.path, entry.compressed_path, entry.sha256)
        return cls(manifest, open_backend(entry.format, data, threads), entry.format, entry.precision)

    def prepare(self, raw: np.ndarray) -> np.ndarray:
        m = self.manifest
        return normalise(raw, m.input_shape, m.input_scale, m.mean, m.std)

    def logits(self, raw: np.ndarray) -> np.ndarray:
        return self.backend.run(self.prepare(raw))

    def classify(self, raw: np.ndarray) -> np.ndarray:
        """Predicted class indices; `manifest.labels[i]` names them."""
        return self.logits(raw).argmax(axis=1)
