"""`fedprune demo`: a broker, the coordinator and N edge processes on this machine, end to end.

The devices are real `fedprune edge run` processes with catalogue profiles of different device
classes, each training its own Fashion-MNIST shard (S1: five consecutive classes per device) with
DP-SGD, talking to the coordinator only through MQTT. The coordinator runs in this process so
the demo can draw its progress bar and per-round table; its JSON log goes to a file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from edge_sdk.agent import EdgeConfig
from edge_sdk.logs import configure_logging

from .embedded_broker import EmbeddedBroker
from .service import CoordinatorService, ServiceConfig

DEVICE_CLASSES = ("rpi4-2gb", "jetson-nano-4gb", "phone-mid", "rpi5-8gb", "phone-high", "rpi3b",
                  "rpi4-4gb", "phone-low")


def _edge_config(out: Path, device: str, index: int, devices: int, broker: str, fleet: str,
                 epsilon: float, samples: int, data_dir: str | None) -> Path:
    config = EdgeConfig(device_id=device, broker=broker, fleet=fleet,
                        state_dir=str((out / "edges" / device).resolve()),
                        profile=f"catalogue:{DEVICE_CLASSES[index % len(DEVICE_CLASSES)]}",
                        epsilon_budget=epsilon, max_samples=samples,
                        data={"dataset": "fashion-mnist", "partition": "classes:5",
                              "clients": devices, "client_id": index, "data_dir": data_dir})
    return config.save(out / "edges" / f"{device}.toml")


def run_demo(devices: int = 4, rounds: int = 3, broker: str | None = None,
             json_out: str | None = None, out_dir: str = "runs/demo", epsilon: float = 8.0,
             samples: int = 1500, local_epochs: int = 2, data_dir: str | None = None,
             deadline: float = 600.0) -> dict:
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    configure_logging("INFO", json_lines=True, path=str(out / "logs" / "coordinator.log"))
    embedded = EmbeddedBroker(log_path=str(out / "logs" / "broker.log")).start() if broker is None else None
    url = embedded.url if embedded else broker
    fleet = f"demo-{int(time.time())}"  # fresh topics: nothing retained from an earlier run
    config = ServiceConfig.model_validate({
        "strategy": "fedp3", "state_dir": str(out / "coordinator"), "http_port": 0,
        "exit_when_done": True, "data_dir": data_dir,
        "broker": {"url": url, "fleet": fleet},
        "rounds": {"total": rounds, "devices_per_round": devices, "min_devices": devices,
                   "min_fraction": 0.5, "deadline_seconds": deadline},
        "train": {"local_epochs": local_epochs, "lr": 0.05, "momentum": 0.5},
        "dp": {"target_epsilon": epsilon, "max_grad_norm": 1.0}})
    names = [f"dev-{i:02d}" for i in range(devices)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for i, name in enumerate(names):
        path = _edge_config(out, name, i, devices, url, fleet, epsilon, samples, data_dir)
        log = open(out / "logs" / f"{name}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "coordinator.cli", "edge", "run",
                                       "--config", str(path)], stdout=log, stderr=subprocess.STDOUT,
                                      env=env))
    service = CoordinatorService(config)
    bar = tqdm(total=rounds, unit="round", desc=f"demo: {devices} devices")
    tqdm.write(f"{'round':>5} {'personal':>9} {'global':>7} {'bytes up':>12} {'bytes down':>12} "
               f"{'eps max':>8} {'in':>3} {'out':>4} {'sec':>6}")
    summaries: list[dict] = []

    def on_commit(summary: dict) -> None:
        summaries.append(summary)
        out_count = summary["refused"] + summary["rejected"] + summary["missing"]
        eps = f"{summary['epsilon_max']:.2f}" if summary["epsilon_max"] is not None else "-"
        personal = summary["personalized_accuracy"]
        tqdm.write(f"{summary['round']:>5} {personal if personal is not None else float('nan'):>9.4f} "
                   f"{summary['global_accuracy']:>7.4f} {summary['bytes_up']:>12,} "
                   f"{summary['bytes_down']:>12,} {eps:>8} {summary['accepted']:>3} {out_count:>4} "
                   f"{summary['seconds']:>6.1f}")
        bar.update(1)

    service.engine.on_commit = on_commit

    def watchdog() -> None:  # if every device process died, stop waiting for them
        while not service.stopping.is_set():
            if all(p.poll() is not None for p in procs):
                tqdm.write("every edge process has exited; see the logs in " + str(out / "logs"))
                service.stopping.set()
            time.sleep(1)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        service.run()
    finally:
        bar.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if embedded:
            embedded.stop()
    result = {"devices": [{"id": n, "device_class": DEVICE_CLASSES[i % len(DEVICE_CLASSES)],
                           "artifact": str(out / "edges" / n / "artifact"),
                           "model": str(out / "edges" / n / "model.pt")} for i, n in enumerate(names)],
              "rounds": summaries, "broker": url, "fleet": fleet,
              "checkpoints": str(out / "coordinator" / "checkpoints"),
              "exports": str(out / "coordinator" / "exports"),
              "database": config.database_url, "logs": str(out / "logs"),
              "privacy": {"epsilon_budget": epsilon, "delta": config.dp.delta,
                          "accountant": f"Opacus {config.dp.accountant.upper()}",
                          "unit": "record-level, per device, over all rounds"}}
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2))
    return result
