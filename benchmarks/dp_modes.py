"""Local-training throughput and peak memory: plain SGD vs Opacus DP-SGD per grad-sample mode.

Why ghost clipping is our default for DP: this prints samples/s and the peak RSS growth of one
local epoch of FedP3's CNN on real Fashion-MNIST, each mode in a fresh subprocess so the peaks
do not mask each other.

    python benchmarks/dp_modes.py --samples 2400 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MODES = ["none", "ghost", "hooks", "functorch"]


def one(mode: str, samples: int, threads: int) -> dict:
    import torch
    from torch import nn

    from edge_sdk.data import load_dataset, to_tensor
    from edge_sdk.models import build_model, model_spec
    from edge_sdk.rehearsal import peak_rss_bytes

    torch.set_num_threads(threads)
    source = load_dataset("fashion-mnist")
    x = to_tensor(source.train_x[:samples], source.info)
    y = torch.tensor(source.train_y[:samples])
    model = build_model(model_spec("fedp3_cnn", source.info.input_shape, 10), seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=48)
    if mode != "none":
        from opacus import PrivacyEngine

        engine = PrivacyEngine()
        model, optimizer, *rest = engine.make_private(
            module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode)
        criterion, loader = (rest[0], rest[1]) if mode == "ghost" else (criterion, rest[0])
    base = peak_rss_bytes()
    started = time.perf_counter()
    seen = 0
    for xb, yb in loader:
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seen += len(xb)
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    return {"mode": mode, "samples_per_s": seen / seconds,
            "peak_rss_mb": peak / 2**20, "rss_growth_mb": (peak - base) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(one(args.mode, args.samples, args.threads)))
        return
    rows = []
    for mode in MODES:
        proc = subprocess.run([sys.executable, __file__, "--mode", mode, "--samples",
                               str(args.samples), "--threads", str(args.threads)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    plain = rows[0]["samples_per_s"]
    print(f"FedP3 CNN (1.26 M parameters), batch 48, {args.samples} Fashion-MNIST samples, "
          f"{args.threads} threads, one epoch")
    print("| mode | samples/s | vs plain SGD | peak RSS MB | RSS growth during the epoch MB |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['mode']} | {row['samples_per_s']:.0f} | {row['samples_per_s'] / plain:.2f}x | "
              f"{row['peak_rss_mb']:.0f} | {row['rss_growth_mb']:.0f} |")


if __name__ == "__main__":
    main()
