"""Export one device's model as a verified bundle: artifacts, their .zst copies and manifest.json.

Every artifact is made by its format's registered exporter (formats.py) and run in the runtime
the device will use (the edge runtime registered under the same name) on real test inputs before
anything is published; files are written only when every artifact passes,
each atomically and durably (device_profiles.files), with manifest.json written last. A reader
that opens the folder mid-publish finds the old manifest, whose sha256 refuses an artifact
already replaced: it never runs a model its manifest does not describe.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
import zstandard

from device_profiles.files import atomic_write
from edge_sdk.data import DatasetInfo
from edge_sdk.models.cost import footprint
from edge_sdk.runtime import MANIFEST_NAME, ArtifactEntry, BundleManifest, Parity, open_backend
from edge_sdk.runtime.manifest import artifact_file_name

from .formats import PRECISIONS, ExportError, Exporter, export_formats, exporter
from .parity import TOLERANCES, compare, localize, torch_outputs


def exporter_versions() -> dict[str, str]:
    """Versions of fedprune, torch and every registered exporter's toolchain that are installed."""
    packages = ["fedprune", "torch"]
    for fmt in export_formats():
        packages += [p for p in exporter(fmt).packages if p not in packages]
    versions = {}
    for dist in packages:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def export_bundle(model: nn.Module, out_dir: str | Path, *, model_name: str, info: DatasetInfo,
                  device_id: str, verify_x: np.ndarray, verify_y: np.ndarray | None = None,
                  round_number: int | None = None, width_ratio: float = 1.0,
                  checkpoint_sha256: str | None = None, formats: Sequence[str] | None = None,
                  precisions: Sequence[str] = ("fp32",), threads: int | None = None) -> BundleManifest:
    """Export `model` in every format x precision, verify each, publish them with a manifest.

    `formats` are registered export formats (formats.py; None: all of them). `verify_x` are
    normalised real inputs (N, C, H, W); `verify_y` their labels, if known, so the manifest can
    record accuracy of torch and of each artifact on them.
    """
    exporters = [exporter(fmt) for fmt in (export_formats() if formats is None else formats)]
    for precision in precisions:
        if precision not in PRECISIONS:
            raise ExportError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
        for chosen in exporters:
            chosen.check_precision(precision)
    if len(verify_x) == 0:
        raise ExportError("verification needs at least one real input")
    model = model.eval()
    out_dir = Path(out_dir)
    verify_x = np.ascontiguousarray(verify_x, dtype=np.float32)
    want = torch_outputs(model, verify_x)
    header = _header(model, model_name, info, device_id, round_number, width_ratio, checkpoint_sha256)
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in header.items()}

    entries, files = [], {}
    for chosen in exporters:
        fmt = chosen.name
        example = torch.from_numpy(verify_x[:chosen.batch or 1])
        fp32 = chosen.convert(model, example, metadata)  # traced once for every precision
        for precision in precisions:
            data = chosen.artifact(fp32, precision)
            backend = open_backend(fmt, data, threads)
            got = backend.run(verify_x)
            result = compare(got, want, TOLERANCES[precision])
            if not result.ok:
                layer = localize(model.layers, [f"layers.{i}" for i in range(len(model.layers))],
                                 verify_x[:64], lambda m, x: open_backend(
                                     fmt, chosen.artifact(chosen.convert(m, example, None), precision),
                                     threads).run(x),
                                 TOLERANCES[precision])
                where = f"; first layer that departs from torch: {layer}" if layer else ""
                raise ExportError(f"{fmt}/{precision} export of {device_id} disagrees with torch "
                                  f"on {len(verify_x)} real inputs: {result.describe()}{where}. "
                                  "Not published; drop this variant or report the layer")
            entry, packed = _entry(chosen, precision, data, backend, result, got, want, verify_y,
                                   len(verify_x))
            entries.append(entry)
            files.update({entry.path: data, entry.compressed_path: packed})
    manifest = BundleManifest(**header, exporters=exporter_versions(),
                              created_at=datetime.datetime.now(datetime.UTC).isoformat(
                                  timespec="seconds"),
                              artifacts=tuple(entries))
    for name, data in files.items():
        atomic_write(out_dir / name, data)
    manifest.save(out_dir / MANIFEST_NAME)  # last: until it is replaced, readers see the old bundle
    return manifest


def _header(model: nn.Module, model_name: str, info: DatasetInfo, device_id: str,
            round_number: int | None, width_ratio: float, checkpoint_sha256: str | None) -> dict:
    spec = model.spec
    weights = [p.detach() for p in model.parameters()]
    parameters = sum(w.numel() for w in weights)
    nonzero = sum(int(torch.count_nonzero(w)) for w in weights)
    macs = footprint(spec).macs
    return {"device_id": device_id, "round": round_number, "model": model_name,
            "spec": spec.to_dict(), "spec_digest": spec.digest(), "width_ratio": width_ratio,
            "dataset": info.name, "input_shape": tuple(info.input_shape),
            "input_scale": info.input_scale, "mean": tuple(info.mean), "std": tuple(info.std),
            "labels": tuple(info.labels), "parameters": parameters, "nonzero_parameters": nonzero,
            "sparsity": 1.0 - nonzero / max(parameters, 1), "macs_per_sample": macs,
            "flops_per_sample": 2 * macs, "checkpoint_sha256": checkpoint_sha256}


def _entry(chosen: Exporter, precision: str, data: bytes, backend, result, got, want, labels,
           samples: int) -> tuple[ArtifactEntry, bytes]:
    """The manifest entry of one verified artifact, and its zstd-compressed bytes."""
    name = artifact_file_name(chosen.name, precision)
    packed = zstandard.ZstdCompressor(level=19).compress(data)
    accuracy = torch_accuracy = None
    if labels is not None:
        labels = np.asarray(labels)
        accuracy = float((got.argmax(1) == labels).mean())
        torch_accuracy = float((want.argmax(1) == labels).mean())
    entry = ArtifactEntry(
        format=chosen.name, precision=precision, path=name, bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(), compressed_path=f"{name}.zst",
        compressed_bytes=len(packed), batch=chosen.batch, opset=chosen.opset,
        parity=Parity(runtime=backend.runtime, runtime_version=backend.version, samples=samples,
                      max_abs_diff=result.max_abs_diff, top1_agreement=result.top1_agreement,
                      accuracy=accuracy, torch_accuracy=torch_accuracy))
    return entry, packed
