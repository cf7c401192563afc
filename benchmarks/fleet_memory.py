"""Memory against fleet size: `fedprune simulate` with 100, 1,000 and 5,000 devices, 10% a round.

Each cell is one `fedprune simulate` process (FedAvg, FedP3's CNN, Fashion-MNIST `classes:5`, one
intra-op thread a device), watched from outside: every 0.25 s the driver's resident set and, on
Ray, the proportional set (PSS: shared pages split between the processes that map them, so the
object store and torch's libraries are counted once) of every process it started (Ray's GCS,
raylet, workers, NodeData actor). Reported: each peak, the wall time, and how many devices trained.

    python benchmarks/fleet_memory.py --sizes 100,1000,5000 --backends inprocess,ray \\
        --states model,private --rounds 2

`--states`: what a device keeps between tasks (`device_state`): its whole model, or only its
private tensors. FedAvg has none, so `private` is the floor: what the run costs with no state.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

GB = 2**30


def watch(process: psutil.Process, peaks: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            driver = process.memory_info().rss
            others = 0
            for child in process.children(recursive=True):
                try:
                    others += child.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        except psutil.NoSuchProcess:
            return
        peaks["driver"] = max(peaks["driver"], driver)
        peaks["others"] = max(peaks["others"], others)
        peaks["total"] = max(peaks["total"], driver + others)
        stop.wait(0.25)


def cell(size: int, backend: str, state: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = ["fedprune", "simulate", "--backend", backend, "--strategy", args.strategy,
                   "--model", "fedp3_cnn", "--clients", str(size), "--fraction", str(args.fraction),
                   "--rounds", str(args.rounds), "--partition", "classes:5",
                   "--set", "device_threads=1", "--set", f"device_state={state}",
                   "--json-out", str(out)]
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
        peaks, stop = {"driver": 0, "others": 0, "total": 0}, threading.Event()
        watcher = threading.Thread(target=watch, args=(psutil.Process(child.pid), peaks, stop))
        watcher.start()
        _, err = child.communicate()
        stop.set()
        watcher.join()
        wall = time.perf_counter() - started
        if child.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{err[-3000:]}")
        result = json.loads(out.read_text())
    trained = {d["client"] for r in result["rounds"] for d in r["devices"]
               if d.get("outcome") == "accepted"}
    return {"devices": size, "backend": backend, "device_state": state, "wall_seconds": wall,
            "driver_peak_gb": peaks["driver"] / GB, "others_peak_gb": peaks["others"] / GB,
            "total_peak_gb": peaks["total"] / GB, "devices_trained": len(trained),
            "global_accuracy": result["final"]["global_accuracy"],
            "personalized_accuracy": result["final"]["personalized_accuracy"],
            "command": " ".join(command[:-2])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,5000")
    parser.add_argument("--backends", default="inprocess,ray")
    parser.add_argument("--states", default="model,private")
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json-out", default="runs/fleet_memory.json")
    args = parser.parse_args()
    rows = []
    print("| devices | backend | device_state | trained | wall s | driver peak GB "
          "| Ray processes peak GB (PSS) | together peak GB | global acc |\n|" + "---|" * 9,
          flush=True)
    for size in (int(v) for v in args.sizes.split(",")):
        for backend in args.backends.split(","):
            for state in args.states.split(","):
                row = cell(size, backend, state, args)
                rows.append(row)
                print(f"| {size:,} | {backend} | {state} | {row['devices_trained']:,} "
                      f"| {row['wall_seconds']:.1f} | {row['driver_peak_gb']:.2f} "
                      f"| {row['others_peak_gb']:.2f} | {row['total_peak_gb']:.2f} "
                      f"| {row['global_accuracy']:.4f} |", flush=True)
                if args.json_out:
                    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.json_out).write_text(json.dumps(
                        {"machine": f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / GB:.0f} GB",
                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
