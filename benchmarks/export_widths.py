"""Exported submodels per width ratio: file size, FLOPs, batch-1 latency and accuracy.

Each width is its own network (the planner's width_spec), trained from scratch with the same
budget (plain SGD, momentum 0.9, --epochs over the 60,000 Fashion-MNIST training images), then
exported through `export_bundle` (so every artifact passed the parity check) in ONNX and TFLite
at fp32 and int8 dynamic range. Latency is the median of --runs single-image calls on one
thread after --warmup calls, in onnxruntime and ai-edge-litert; accuracy is on all 10,000 test
images. The aim checked in the last columns: latency falls at least in proportion to FLOPs
(latency ratio / FLOPs ratio <= 1.25, both relative to width 1.0).

    python benchmarks/export_widths.py --widths 1,0.75,0.5,0.25,0.125 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edge_sdk.data import load_dataset, to_tensor
from edge_sdk.models import build_model, model_spec
from edge_sdk.runtime import Predictor
from edge_sdk.slicing import width_spec
from export import export_bundle


def train(width: float, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(width_spec(model_spec("fedp3_cnn", (1, 28, 28), 10), width), seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            idx = order[start:start + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def median_latency_ms(predictor: Predictor, image: np.ndarray, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        predictor.backend.run(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        predictor.backend.run(image)
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="1,0.75,0.5,0.25,0.125")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--train-threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default="runs/export_widths.json")
    args = parser.parse_args()
    torch.set_num_threads(args.train_threads)
    source = load_dataset("fashion-mnist")
    train_x, train_y = to_tensor(source.train_x, source.info), torch.tensor(source.train_y)
    test_x, test_y = to_tensor(source.test_x, source.info).numpy(), np.asarray(source.test_y)
    rows = []
    for width in (float(w) for w in args.widths.split(",")):
        model = train(width, train_x, train_y, args.epochs, args.seed)
        with torch.no_grad():
            torch_acc = float((model(torch.from_numpy(test_x)).argmax(1).numpy() == test_y).mean())
        with tempfile.TemporaryDirectory() as tmp:
            manifest = export_bundle(model, tmp, info=source.info,
                                     spec=width_spec(model_spec("fedp3_cnn", (1, 28, 28), 10), width),
                                     device_id=f"w{width:g}", verify_x=test_x[:512],
                                     verify_y=test_y[:512], width_ratio=width,
                                     precisions=("fp32", "int8"), threads=1)
            for entry in manifest.artifacts:
                predictor = Predictor.open(tmp, fmt=entry.format, precision=entry.precision, threads=1)
                accuracy = float((predictor.backend.run(test_x).argmax(1) == test_y).mean())
                rows.append({"width": width, "format": entry.format, "precision": entry.precision,
                             "parameters": manifest.parameters, "flops": manifest.flops_per_sample,
                             "bytes": entry.bytes, "compressed_bytes": entry.compressed_bytes,
                             "latency_ms": median_latency_ms(predictor, test_x[:1], args.warmup, args.runs),
                             "accuracy": accuracy, "torch_accuracy": torch_acc})
        print(f"width {width:g} done", flush=True)
    reference = {(r["format"], r["precision"]): r for r in rows if r["width"] == 1.0}
    print(f"\n{'width':>5} {'format':>6} {'prec':>5} {'params':>10} {'MFLOPs':>7} {'bytes':>10} "
          f"{'ms':>7} {'acc':>7} {'torch':>7} {'FLOPs ratio':>11} {'ms ratio':>8} {'aim<=1.25':>9}")
    for r in rows:
        ref = reference.get((r["format"], r["precision"]))
        flops_ratio = r["flops"] / ref["flops"] if ref else float("nan")
        latency_ratio = r["latency_ms"] / ref["latency_ms"] if ref else float("nan")
        r.update(flops_ratio=flops_ratio, latency_ratio=latency_ratio,
                 aim=latency_ratio / flops_ratio if ref else float("nan"))
        print(f"{r['width']:>5g} {r['format']:>6} {r['precision']:>5} {r['parameters']:>10,} "
              f"{r['flops'] / 1e6:>7.2f} {r['bytes']:>10,} {r['latency_ms']:>7.3f} {r['accuracy']:>7.4f} "
              f"{r['torch_accuracy']:>7.4f} {flops_ratio:>11.3f} {latency_ratio:>8.3f} {r['aim']:>9.2f}")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
