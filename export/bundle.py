"""Export one device's model as a verified bundle: artifacts, their .zst copies and manifest.json.

Any registered model exports: the input contract comes from its spec (its input shape, any rank),
the normalisation and labels from the dataset it was trained on, where there is one. Every artifact is made by its format's registered exporter (formats.py) and run in the runtime
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
from edge_sdk.models import ModelSpec
from edge_sdk.models.cost import footprint
from edge_sdk.models.network import structure, tensor_shapes
from edge_sdk.runtime import MANIFEST_NAME, ArtifactEntry, BundleManifest, Parity, open_backend
from edge_sdk.runtime.manifest import LAYOUTS, artifact_file_name

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


def export_bundle(model: nn.Module, out_dir: str | Path, *, spec: ModelSpec, device_id: str,
                  verify_x: np.ndarray, info: DatasetInfo | None = None,
                  verify_y: np.ndarray | None = None, model_name: str | None = None,
                  round_number: int | None = None, width_ratio: float = 1.0,
                  checkpoint_sha256: str | None = None, formats: Sequence[str] | None = None,
                  precisions: Sequence[str] = ("fp32",), threads: int | None = None) -> BundleManifest:
    """Export `model`, the network `spec` describes, in every format x precision, verify each,
    publish them with a manifest.

    `formats` are registered export formats (formats.py; None: all of them). `verify_x` are
    real inputs as the model takes them, (N, *spec.input_shape), normalised as in training;
    `verify_y` their labels, if known, so the manifest can record accuracy of torch and of each
    artifact on them. `info`, the dataset's, gives the manifest its normalisation and labels.
    """
    exporters = check_variants(spec, formats, precisions)
    _check_model(model, spec, info)
    verify_x = np.ascontiguousarray(verify_x, dtype=np.float32)
    if len(verify_x) == 0:
        raise ExportError("verification needs at least one real input")
    if verify_x.shape[1:] != spec.input_shape:
        raise ExportError(f"verification inputs have shape {verify_x.shape}; model {spec.name!r} "
                          f"takes (N, {', '.join(map(str, spec.input_shape))})")
    model = model.eval()
    out_dir = Path(out_dir)
    want = torch_outputs(model, verify_x)
    header = _header(model, spec, model_name or spec.name, info, device_id, round_number,
                     width_ratio, checkpoint_sha256)
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in header.items()}

    entries, files = [], {}
    for chosen in exporters:
        fmt = chosen.name
        example = torch.from_numpy(verify_x[:chosen.batch or 1])
        fp32 = chosen.convert(model, example, metadata)  # traced once for every precision
        for precision in precisions:
            data = chosen.artifact(fp32, precision)
            variant = f"{fmt}/{precision} export of {device_id}"
            backend, got = _run(fmt, data, verify_x, threads, variant)
            result = compare(got, want, TOLERANCES[precision])
            if not result.ok:
                layer = localize(model, structure(spec.base).layer_modules, verify_x[:64],
                                 lambda m, x, precision=precision, variant=variant: _run(
                                     fmt, chosen.artifact(chosen.convert(m, example, None), precision),
                                     x, threads, variant)[1],
                                 TOLERANCES[precision])
                where = f"; first layer that departs from torch: {layer}" if layer else ""
                raise ExportError(f"{variant} disagrees with torch "
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


def check_variants(spec: ModelSpec, formats: Sequence[str] | None,
                   precisions: Sequence[str]) -> list:
    """The exporters of `formats` (None: all), once every variant asked for is one this model can
    have: a run checks this before its rounds, not after them.

    A FedDP-gated network has fp32 variants only. Its gates keep each input's top channels by
    saliency; at fp16 or int8 the saliencies of near-tied channels change order, a different
    channel is computed, and the logits depart by more than the precision's parity bar although
    the top-1 answers agree (MobileNetV2-style at half width on the digits: 0.030 against 0.0053
    allowed in ONNX fp16, 0.121 against 0.093 in TFLite int8; both precisions passed in the other
    runtime on the same inputs, by luck of the ties)."""
    exporters = [exporter(fmt) for fmt in (export_formats() if formats is None else formats)]
    for precision in precisions:
        if precision not in PRECISIONS:
            raise ExportError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
        for chosen in exporters:
            chosen.check_precision(precision)
        if spec.gate < 1.0 and precision != "fp32":
            raise ExportError(f"a FedDP-gated model exports at fp32 only, not {precision}: its "
                              "gates pick channels by saliency, and reduced precision reorders "
                              "near-tied ones; set export_precisions = [\"fp32\"]")
    return exporters


def _run(fmt: str, artifact: bytes, inputs: np.ndarray, threads: int | None,
         where: str) -> tuple[object, np.ndarray]:
    """The artifact opened in its edge runtime, and its outputs on `inputs`."""
    try:
        backend = open_backend(fmt, artifact, threads)
        return backend, backend.run(inputs)
    except Exception as exc:  # the runtime's own types: an operator it lacks, mostly
        raise ExportError(f"{where} does not run in its edge runtime ({type(exc).__name__}: "
                          f"{_first_line(exc)}); the converter made what the runtime cannot run: "
                          "export this model in another format") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _check_model(model: nn.Module, spec: ModelSpec, info: DatasetInfo | None) -> None:
    """`model` is the network `spec` describes, and `info`'s data is what it takes."""
    want = tensor_shapes(spec)
    have = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if have != want:
        differ = sorted(set(have) ^ set(want)) or sorted(n for n in have if have[n] != want[n])
        raise ExportError(f"the model is not the network its spec describes ({spec.name!r}, "
                          f"{len(spec.keep)} pruned channel groups, gate {spec.gate:g}): tensors "
                          f"{', '.join(differ[:5])} differ; export it with the spec it was built from")
    shape = getattr(info, "input_shape", None)
    if shape is not None and tuple(shape) != spec.input_shape:
        raise ExportError(f"dataset {info.name!r} has inputs of shape {tuple(shape)}, model "
                          f"{spec.name!r} takes {spec.input_shape}; export it with its own data")


def _header(model: nn.Module, spec: ModelSpec, model_name: str, info: DatasetInfo | None,
            device_id: str, round_number: int | None, width_ratio: float,
            checkpoint_sha256: str | None) -> dict:
    """The manifest's fields but the artifacts: the contract from the spec, the normalisation and
    labels from the dataset where it gives them."""
    weights = [p.detach() for p in model.parameters()]
    parameters = sum(w.numel() for w in weights)
    nonzero = sum(int(torch.count_nonzero(w)) for w in weights)
    macs = footprint(spec).macs
    scale, mean, std = (getattr(info, key, None) for key in ("input_scale", "mean", "std"))
    if mean is None or std is None or len(mean) == 0:
        mean = std = None
    return {"device_id": device_id, "round": round_number, "model": model_name,
            "spec": spec.to_dict(), "spec_digest": spec.digest(), "width_ratio": width_ratio,
            "dataset": info.name if info is not None else None,
            "input_shape": spec.input_shape, "input_layout": LAYOUTS[len(spec.input_shape)],
            "input_scale": None if scale is None else float(scale),
            "mean": None if mean is None else tuple(float(v) for v in mean),
            "std": None if std is None else tuple(float(v) for v in std),
            "labels": tuple(getattr(info, "labels", None) or ()),
            "parameters": parameters, "nonzero_parameters": nonzero,
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
