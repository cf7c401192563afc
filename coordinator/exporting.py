"""From checkpoints to per-device bundles: pick the device's width, slice, export, verify.

The exporter itself (`export/`) knows nothing of devices or plans; this is where a device's plan
(or its profile, planned on the spot) decides which submodel of a global checkpoint it gets, and
where the simulator hands every client's final model to the exporter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from edge_sdk.sizing import DevicePlan
from edge_sdk.checkpoint import Checkpoint, CheckpointError
from edge_sdk.runtime import BundleManifest
from export import check_variants, export_bundle  # noqa: F401  (check_variants: the simulator)

from .heldout import checkpoint_held_out, contract_extra, verification_batch
from .slicing import width_slice

VERIFY_SAMPLES = 512


def submodel(checkpoint: Checkpoint, width_ratio: float, method: str = "magnitude",
             round_number: int = 0) -> Checkpoint:
    """The checkpoint's model at `width_ratio` of its full width (itself at its own width): its
    spec and state, with the source's provenance; `sha256` is None, it is no file yet."""
    if width_ratio >= 1.0 or width_ratio == checkpoint.width_ratio:
        return checkpoint
    if checkpoint.width_ratio < 1.0:
        raise CheckpointError(f"the checkpoint is already a width-{checkpoint.width_ratio:g} "
                              f"submodel; slice to width {width_ratio:g} from the global checkpoint")
    cut = width_slice(checkpoint.spec, {k: v.numpy() for k, v in checkpoint.state.items()},
                      width_ratio, method, round_number)
    return dataclasses.replace(checkpoint, spec=cut.spec, width_ratio=width_ratio, sha256=None,
                               state={k: torch.from_numpy(v) for k, v in cut.state.items()})


def device_plan(device: str, checkpoint: Checkpoint) -> DevicePlan:
    """Plan a catalogue device (by name) or a profiled one (profile JSON path) for this model."""
    from device_profiles import catalogue_profile, load_profile

    from .planning.memory import MemoryCoefficients
    from .planning.planner import PlannerSettings, plan_device

    if checkpoint.width_ratio < 1.0:
        raise CheckpointError("planning a device needs the global (full-width) checkpoint")
    profile = load_profile(device) if Path(device).suffix == ".json" else catalogue_profile(device)
    return plan_device(profile, checkpoint.spec, checkpoint.model, PlannerSettings(),
                       MemoryCoefficients.load())


def export_checkpoint(checkpoint: Checkpoint, out_dir: str | Path, *, plan: DevicePlan | None = None,
                      formats: Sequence[str] | None = None, precisions: Sequence[str] = ("fp32",),
                      data_dir: str | None = None, device_id: str | None = None,
                      samples: int = VERIFY_SAMPLES, threads: int | None = None) -> BundleManifest:
    if plan is not None and not plan.fits:
        raise CheckpointError(f"device {plan.device_id} has no submodel that fits: "
                              + "; ".join(plan.reasons))
    width = plan.width_ratio if plan else checkpoint.width_ratio
    cut = submodel(checkpoint, width, plan.slicing if plan else "magnitude", checkpoint.round or 0)
    held = checkpoint_held_out(checkpoint, data_dir)
    x, y = verification_batch(held, samples)
    return export_bundle(cut.build(), out_dir, spec=cut.spec, model_name=checkpoint.model,
                         info=held.info, device_id=device_id or (plan.device_id if plan else None)
                         or checkpoint.device_id or "global",
                         verify_x=x, verify_y=y, round_number=checkpoint.round, width_ratio=width,
                         checkpoint_sha256=checkpoint.sha256, formats=formats,
                         precisions=precisions, threads=threads)


def export_clients(out_dir: str | Path, clients, widths: Sequence[float], global_checkpoint: Checkpoint,
                   info, *, slicing: str, formats: Sequence[str], precisions: Sequence[str],
                   progress: bool = True) -> list[dict]:
    """One folder per client with its checkpoint and verified bundle; the global model beside them.

    A client that trained holds its personalized model (private tensors included); one that was
    never selected gets the global model at its planned width. Each bundle is verified on the
    client's own local test split, the data it will see (already normalised as the model takes
    it), and states `info`, the run's data contract, which every checkpoint written carries too.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    global_checkpoint = dataclasses.replace(
        global_checkpoint, extra={**global_checkpoint.extra, **contract_extra(info)})
    global_checkpoint.save(out_dir / "global" / "checkpoint.pt")
    exported = []
    for client, width in tqdm(list(zip(clients, widths)), desc="export", unit="client",
                              disable=None if progress else True):
        device_id = f"client-{client.device_index:03d}"
        if client.spec is not None:
            checkpoint = Checkpoint(client.spec, dict(client.state), global_checkpoint.model,
                                    global_checkpoint.dataset, device_id, global_checkpoint.round,
                                    width, {"source": "personalized", **contract_extra(info)})
        else:
            cut = submodel(global_checkpoint, width, slicing, global_checkpoint.round or 0)
            checkpoint = dataclasses.replace(cut, device_id=device_id, width_ratio=width, sha256=None,
                                             extra={"source": "global", **contract_extra(info)})
        folder = out_dir / device_id
        checkpoint.save(folder / "checkpoint.pt")
        x = client.data.test_x[:VERIFY_SAMPLES].numpy()
        manifest = export_bundle(checkpoint.build(), folder, spec=checkpoint.spec,
                                 model_name=checkpoint.model, info=info,
                                 device_id=device_id, verify_x=x,
                                 verify_y=np.asarray(client.data.test_y[:VERIFY_SAMPLES]),
                                 round_number=checkpoint.round, width_ratio=width,
                                 checkpoint_sha256=checkpoint.sha256, formats=formats,
                                 precisions=precisions)
        exported.append({"client": client.device_index, "dir": str(folder),
                         "source": checkpoint.extra["source"], "width_ratio": width,
                         "artifacts": [{"format": a.format, "precision": a.precision,
                                        "bytes": a.bytes, "accuracy": a.parity.accuracy,
                                        "torch_accuracy": a.parity.torch_accuracy}
                                       for a in manifest.artifacts]})
    return exported
