"""Run one real local epoch of a device plan (DevicePlan) and report the process's peak resident memory.

The planner's promise ("this submodel fits") is only worth what a measurement confirms. A
rehearsal does on the device exactly what a task would: build the width-sliced model, load the
device's data, and train one epoch with the plan's batch shape (DP-SGD with virtual steps when
the plan says so). Run it under `/usr/bin/time -v` or inside a memory cgroup to check it
independently; `fedprune plan --verify` runs it as a fresh subprocess and reads the child's peak.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import torch

from .sizing import DevicePlan
from .data import client_data_for, load_dataset
from .models import build_model, model_spec
from .slicing import width_spec
from .training import train_locally
from .settings import DPSettings, TrainSettings


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's own address space.

    Linux's VmHWM, not getrusage's ru_maxrss: the latter carries over the high-water mark of the
    address space the process had before exec, which for a child started by a large parent (a
    test runner, a coordinator) is the parent's memory, not the rehearsal's.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # other kernels


def rehearse(plan: DevicePlan) -> dict[str, Any]:
    source = load_dataset(plan.data.dataset, plan.data.data_dir)
    data = client_data_for(source, plan.data.clients, plan.data.partition, plan.data.seed,
                           plan.data.device_index)
    x, y = data.train_x[:plan.local_samples], data.train_y[:plan.local_samples]
    spec = width_spec(model_spec(plan.model, source.info.input_shape, source.info.num_classes),
                      plan.width_ratio)
    model = build_model(spec, seed=plan.data.seed)
    train = TrainSettings(local_epochs=1, batch_size=plan.batch_size, momentum=plan.momentum,
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
        "peak_rss_bytes": peak_rss_bytes(),
        "torch_threads": torch.get_num_threads(),
    }
