"""Run real local training and report the process's peak resident memory.

The planner's promise ("this submodel fits") is only worth what a measurement confirms. Two
rehearsals, each meant to run in a fresh process (a process's peak is a high-water mark: a second
rehearsal in the same process would measure the first one's leftovers):

- `rehearse(plan)` does on the device exactly what a task would: load the device's data, build
  the width-sliced model and train one epoch with the plan's batch shape (DP-SGD with virtual
  steps when the plan says so). `fedprune plan --verify` runs it as a fresh subprocess and reads
  the child's peak; run it under `/usr/bin/time -v` or inside a memory cgroup to check it
  independently.
- `rehearse_model(...)` trains any registered model on random inputs of its own shape for a few
  steps: the coordinator's per-model memory calibration (`coordinator/planning/model_memory.py`)
  needs no data source that fits the model, so a model on (features,) rows or 3x224x224 images
  is measured the same way. `python -m edge_sdk.rehearsal '{...}'` runs it and prints one JSON line.

Both report `floor_rss_bytes`, the resident memory once the runtime is imported and the data is in
memory but before the model is built: the peak above it is what the model costs, the floor is what
the process and its data source cost whatever the model.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from typing import Any

import torch

from .sizing import DevicePlan
from .data import client_data_for, load_dataset
from .models import ModelSpec, build_model, model_spec
from .slicing import width_spec
from .training import train_locally
from .settings import DPSettings, TrainSettings

# The logical batch a DP rehearsal draws from (the planner's default): a physical batch below it
# is a virtual step of Opacus's BatchMemoryManager, one at it is a whole Poisson batch (which
# overshoots its mean now and then, as on the device).
LOGICAL_BATCH = 48


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's own address space.

    Linux's VmHWM, not getrusage's ru_maxrss: the latter carries over the high-water mark of the
    address space the process had before exec, which for a child started by a large parent (a
    test runner, a coordinator) is the parent's memory, not the rehearsal's.
    """
    peak = _status_kib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """Resident set size now (VmRSS); the peak where the kernel does not say."""
    now = _status_kib("VmRSS")
    return now if now is not None else peak_rss_bytes()


def rehearse(plan: DevicePlan) -> dict[str, Any]:
    source = load_dataset(plan.data.dataset, plan.data.data_dir)
    data = client_data_for(source, plan.data.clients, plan.data.partition, plan.data.seed,
                           plan.data.device_index)
    x, y = data.train_x[:plan.local_samples], data.train_y[:plan.local_samples]
    floor = rss_bytes()
    spec = width_spec(model_spec(plan.model, source.info.input_shape, source.info.num_classes),
                      plan.width_ratio)
    model = build_model(spec, seed=plan.data.seed)
    train = TrainSettings(local_epochs=1, batch_size=plan.batch_size, momentum=plan.momentum,
                          optimizer=plan.optimizer,
                          physical_batch_size=plan.physical_batch_size)
    dp = DPSettings(noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm) \
        if plan.dp else None
    started = time.perf_counter()
    report = train_locally(model, x, y, train, {}, seed=plan.data.seed, dp=dp,
                           noise_multiplier=plan.noise_multiplier if plan.dp else None)
    return {
        "device_id": plan.device_id,
        "width_ratio": plan.width_ratio,
        "parameters": sum(p.numel() for p in model.parameters()),
        "samples": report.samples,
        "physical_steps": report.steps,
        "seconds": time.perf_counter() - started,
        "floor_rss_bytes": floor,
        "peak_rss_bytes": peak_rss_bytes(),
        "torch_threads": torch.get_num_threads(),
    }


def rehearse_model(spec: ModelSpec, width: float, physical_batch: int, dp: bool,
                   steps: int = 2, seed: int = 0, batch_size: int | None = None,
                   samples: int | None = None, momentum: float = 0.0,
                   optimizer: str = "sgd") -> dict[str, Any]:
    """`spec` at `width` trained on random inputs: DP-SGD with ghost clipping in physical
    batches of `physical_batch` (logical batch `batch_size`, by default max(LOGICAL_BATCH,
    physical_batch)), or plain SGD on batches of `batch_size` (default `physical_batch`);
    `samples` inputs (default `steps` logical batches), one epoch.

    Inputs are Gaussian noise and labels uniform: the memory of a training step depends on shapes,
    never on values, and the model needs no data source that fits it.
    """
    logical = batch_size or (max(LOGICAL_BATCH, physical_batch) if dp else physical_batch)
    samples = samples or logical * steps
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, *spec.input_shape, generator=generator)
    y = torch.randint(0, spec.num_classes, (samples,), generator=generator)
    floor = rss_bytes()
    # After the floor: importing the model's own module is part of what the model costs.
    model_spec(spec.name, spec.input_shape, spec.num_classes)  # registers a module:function name
    model = build_model(width_spec(spec, width), seed=seed)
    train = TrainSettings(local_epochs=1, batch_size=logical, physical_batch_size=physical_batch,
                          momentum=momentum, optimizer=optimizer)
    started = time.perf_counter()
    report = train_locally(model, x, y, train, {}, seed=seed,
                           dp=DPSettings(noise_multiplier=1.0) if dp else None,
                           noise_multiplier=1.0 if dp else None)
    return {
        "model": spec.name,
        "width": width,
        "physical_batch": physical_batch,
        "dp": dp,
        "samples": report.samples,
        "parameters": sum(p.numel() for p in model.parameters()),
        "physical_steps": report.steps,
        "finite_loss": math.isfinite(report.mean_loss),
        "seconds": time.perf_counter() - started,
        "floor_rss_bytes": floor,
        "peak_rss_bytes": peak_rss_bytes(),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m edge_sdk.rehearsal '{"spec": {...}, "width": 0.5, "physical_batch": 8, "dp": true}'`
    (optional: steps, seed, batch_size, samples, momentum, optimizer).

    The coordinator's own child process: the spec comes from its configuration, so a
    `package.module:function` model name in it may be imported here.
    """
    args = json.loads((argv if argv is not None else sys.argv[1:])[0])
    optional = {key: args[key] for key in ("steps", "seed", "batch_size", "samples", "momentum",
                                           "optimizer")
                if args.get(key) is not None}
    report = rehearse_model(ModelSpec.from_dict(args["spec"]), float(args["width"]),
                            int(args["physical_batch"]), bool(args["dp"]), **optional)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
