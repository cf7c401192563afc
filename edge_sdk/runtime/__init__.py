"""On-device inference from an exported bundle, without torch.

A device that only predicts installs the runtime of its artifact format (`backends.py` registers
one per format: onnxruntime, ai-edge-litert or tflite-runtime), numpy, pydantic and zstandard;
nothing here imports torch, so the same code runs on a phone-class gateway that could never hold
the training stack.
"""

from .backends import (Backend, BackendUnavailable, RuntimeFormatName, open_backend,
                       register_runtime, runtime_formats, unregister_runtime)
from .manifest import (MANIFEST_NAME, ArtifactEntry, BundleManifest, ManifestError, Parity,
                       load_manifest)
from .predictor import Predictor, normalise

__all__ = ["MANIFEST_NAME", "ArtifactEntry", "Backend", "BackendUnavailable", "BundleManifest",
           "ManifestError", "Parity", "Predictor", "RuntimeFormatName", "load_manifest", "normalise",
           "open_backend", "register_runtime", "runtime_formats", "unregister_runtime"]
