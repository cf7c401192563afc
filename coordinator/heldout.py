"""The data a run's models are made for, from one place: its input contract, and the held-out
samples the coordinator evaluates the global model on and verifies exports on.

`[data]` names it, or the benchmark `dataset` without one (`LearningSettings.data_settings`). The
contract travels in every checkpoint the coordinator writes (`extra["data_contract"]`), so that
`fedprune export` of a run on a user's data states the run's contract without the data. Where no
real samples are at hand, exports are verified on seeded random inputs of the input shape: parity
with torch needs inputs the model takes, not real ones (the manifest then records no accuracy).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from edge_sdk.checkpoint import Checkpoint, CheckpointError
from edge_sdk.data import DATASET_NAMES, DatasetInfo, dataset_info, load_dataset, to_tensor
from edge_sdk.data.sources import DataSettings, federated_data
from edge_sdk.data.sources.contract import contract_info

CONTRACT_KEY = "data_contract"


@dataclass(frozen=True, eq=False)
class HeldOut:
    """The contract (`info`) and, when there are any, held-out samples as the model takes them
    (scaled and normalised) with their class indices."""

    info: DatasetInfo
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None


def held_out_data(settings: DataSettings, read: bool = True) -> HeldOut:
    """`read` False: a benchmark's contract without reading its files (a coordinator that does
    not evaluate: they are 55 MB in memory). Any other source of samples is read all the same,
    since its contract (the classes, the shape) may come from the samples."""
    if settings.source == "contract":
        return HeldOut(contract_info(settings))
    if settings.source == "benchmark":
        if not read:
            return HeldOut(dataset_info(settings.dataset))
        source = load_dataset(settings.dataset, settings.data_dir)
        return HeldOut(source.info, to_tensor(source.test_x, source.info),
                       torch.tensor(source.test_y))
    # Exactly the test set a simulation of this [data] holds out (one client: nothing is cut).
    data = federated_data(settings, 1, "iid", settings.seed)
    return HeldOut(data.info, data.test_x, data.test_y)


def verification_batch(held: HeldOut, samples: int,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Up to `samples` held-out inputs and labels, or `samples` seeded random inputs of the
    contract's shape (no labels) when there are none."""
    if held.x is not None:
        return held.x[:samples].numpy(), held.y[:samples].numpy()
    shape = (samples, *held.info.input_shape)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32), None


def contract_extra(info: DatasetInfo) -> dict:
    """What a checkpoint's `extra` carries of the run's data: its contract, never its samples."""
    return {CONTRACT_KEY: dataclasses.asdict(info)}


def checkpoint_held_out(checkpoint: Checkpoint, data_dir: str | None) -> HeldOut:
    """What a checkpoint's export is verified on: the benchmark's official test set when it was
    trained on one, else the contract it carries (random inputs of its shape)."""
    if checkpoint.dataset.strip().lower() in DATASET_NAMES:
        return held_out_data(DataSettings(dataset=checkpoint.dataset, data_dir=data_dir))
    raw = checkpoint.extra.get(CONTRACT_KEY)
    if raw is None:
        raise CheckpointError(f"the checkpoint was trained on {checkpoint.dataset!r}, which is not "
                              f"a benchmark ({', '.join(DATASET_NAMES)}), and carries no data "
                              "contract (input shape, classes, normalisation) to export it with; "
                              "export it from a run of this fedprune, which records one")
    try:
        info = DatasetInfo(str(raw["name"]), tuple(int(v) for v in raw["input_shape"]),
                           int(raw["num_classes"]), tuple(str(v) for v in raw["labels"]),
                           float(raw["input_scale"]), tuple(float(v) for v in raw["mean"]),
                           tuple(float(v) for v in raw["std"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint's data contract is damaged ({type(exc).__name__}: "
                              f"{exc})") from None
    if info.input_shape != checkpoint.spec.input_shape:
        raise CheckpointError(f"the checkpoint's data contract has input {info.input_shape}, its "
                              f"model takes {checkpoint.spec.input_shape}: damaged")
    return HeldOut(info)
