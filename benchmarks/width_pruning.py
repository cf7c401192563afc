"""What width pruning from the dependency graph costs, per model.

Every submodel a device builds goes through Torch-Pruning: the full model made on the `meta`
device, its dependency graph traced, the dropped channels of every group pruned, the rest made
real (`build_model`). The coordinator builds a submodel's index map the same way on a real float64
copy of the full model (`width.index_map`, once per kept-channel choice: per device per round for
rolling and magnitude selection). This measures both for the built-in networks and a
MobileNetV2-style module (tests/harness/models.py), each at half width:

- meta build: the registered factory and Opacus's fixes on the meta device (`meta_model`);
- graph: tracing that model's dependency graph and listing its channel groups;
- slice 0.5: `build_model` of the half-width spec (factory on meta, graph, pruning, allocation and
  initialisation of the pruned tensors), what a device pays per task;
- index_map 0.5: the coordinator's index map of that submodel.

Each time is the median of --repeats runs after one warm-up run, on one intra-op thread.

    python benchmarks/width_pruning.py --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness.models import MOBILENET  # noqa: E402  (registers the MobileNetV2-style module)

from edge_sdk.models import build_model, model_spec  # noqa: E402
from edge_sdk.models.network import meta_model  # noqa: E402
from edge_sdk.models.width import channel_groups, index_map  # noqa: E402
from edge_sdk.slicing import width_spec  # noqa: E402

MODELS = [  # (name, input shape, classes): the shapes the built-ins are used with
    ("fedp3_cnn", (1, 28, 28), 10),
    ("lenet", (3, 32, 32), 10),
    ("mlp", (1, 28, 28), 10),
    ("resnet_small", (1, 28, 28), 10),
    ("resnet18", (1, 28, 28), 10),
    ("leaf_cnn", (1, 28, 28), 62),
    (MOBILENET, (1, 28, 28), 10),
]


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up: first-call imports and caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}; torch {torch.__version__}, 1 thread, median of {args.repeats} "
          f"after one warm-up, width {args.ratio:g}\n")
    print("| model | input | parameters | parameters at width | channel groups | meta build ms "
          "| graph ms | slice ms | index_map ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, shape, classes in MODELS:
        spec = model_spec(name, shape, classes)
        sub = width_spec(spec, args.ratio)
        full = sum(p.numel() for p in meta_model(spec).parameters())
        narrow = sum(p.numel() for p in build_model(sub).parameters())
        groups = len(channel_groups(meta_model(spec), spec))
        build = median_seconds(lambda: meta_model(spec), args.repeats)
        model = meta_model(spec)
        graph = median_seconds(lambda: channel_groups(model, spec), args.repeats)
        slice_ = median_seconds(lambda: build_model(sub, seed=0), args.repeats)
        imap = median_seconds(lambda: index_map(sub), args.repeats)
        print(f"| {name} | {'x'.join(map(str, shape))} | {full:,} | {narrow:,} | {groups} "
              f"| {build * 1e3:.0f} | {graph * 1e3:.0f} | {slice_ * 1e3:.0f} | {imap * 1e3:.0f} |", flush=True)


if __name__ == "__main__":
    main()
