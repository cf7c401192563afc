"""Coordinator + broker overhead per round with 10, 100 and 1,000 lightweight devices.

Lightweight devices do no training: each answers its task at once with an update built from its
download (the uploaded tensors of its plan, decoded and re-encoded with the real codec), so a
round's wall time is the coordinator's and the broker's work alone: planning and encoding
tasks, delivery, validating, storing and aggregating updates, writing the checkpoint. Devices
run as paho clients, 250 per worker process. The broker is Mosquitto with the shipped config
(plus `sys_interval 1` for its byte counters); the coordinator is `fedprune coordinator serve`
as deployed, with SQLite, export and evaluation off.

    python benchmarks/service_overhead.py --devices 10,100,1000 --rounds 3 --model mlp

Reported per fleet size: median round seconds (open to commit) over rounds 2..R, coordinator
peak RSS (VmHWM), and bytes: codec payloads vs envelopes vs what Mosquitto counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness.brokers import Mosquitto  # noqa: E402  (the tests' launcher of the shipped config)

PER_WORKER = 250


def worker(port: int, fleet: str, start: int, count: int) -> None:
    """`count` lightweight devices in this process; exits when told (stdin closes)."""
    from device_profiles import catalogue_profile
    from edge_sdk import codec
    from edge_sdk.plan import SubmodelPlan
    import hashlib

    from edge_sdk.protocol import (MessageType, RegisterHeader, StatusHeader, Topics, UpdateHeader,
                                   decode_envelope, encode_message, parse_header)

    topics = Topics(fleet)
    profile = catalogue_profile("rpi4-4gb").model_dump(mode="json")
    clients = []

    def on_message(client, device, msg):
        envelope = decode_envelope(msg.payload)
        if envelope.type != MessageType.TASK:
            return
        task = parse_header(envelope)
        plan = SubmodelPlan.from_dict(task.plan)
        received = codec.decode(envelope.payload)
        update = {n: received[n] for n in plan.uploaded}
        payload = codec.encode(update, codec.ValueDtype.from_name(plan.upload_dtype))
        client.publish(topics.update(device), encode_message(UpdateHeader(
            device_id=device, round=task.round, task=task.task, num_samples=100,
            payload_sha256=hashlib.sha256(payload).hexdigest()), payload), qos=1)

    for i in range(start, start + count):
        device = f"sim-{i:05d}"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device,
                             protocol=mqtt.MQTTv311, clean_session=False, userdata=device)
        client.on_message = on_message
        client.will_set(topics.status(device), encode_message(
            StatusHeader(device_id=device, online=False)), qos=1, retain=True)
        client.connect("127.0.0.1", port, keepalive=120)
        client.subscribe(topics.task(device), qos=1)
        client.publish(topics.status(device), encode_message(
            StatusHeader(device_id=device, online=True)), qos=1, retain=True)
        client.publish(topics.register(device), encode_message(
            RegisterHeader(device_id=device, profile=profile, num_samples=100)), qos=1, retain=True)
        client.loop_start()
        clients.append(client)
    print("ready", flush=True)
    sys.stdin.read()
    os._exit(0)  # 250 network threads: no orderly goodbye needed, the broker sees the wills


class SysBytes:
    """Mosquitto's $SYS/broker/bytes/{received,sent} counters."""

    def __init__(self, port: int):
        self.values: dict[str, int] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_message = lambda c, u, m: self.values.__setitem__(m.topic.rsplit("/", 1)[1],
                                                                         int(m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("$SYS/broker/bytes/#")
        self.client.loop_start()

    def read(self) -> dict[str, int]:
        time.sleep(2.5)  # sys_interval 1: let the counters catch up
        return dict(self.values)


class RssSampler:
    """The coordinator's VmRSS every 0.1 s, read from /proc by this process (so the sampling
    costs the coordinator nothing): its resident memory once started, before any device is
    planned, and its largest and last resident memory while it ran."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.samples: list[tuple[float, int]] = []
        self.path = Path(f"/proc/{pid}/status")
        threading.Thread(target=self._run, args=(interval,), daemon=True).start()

    def _run(self, interval: float) -> None:
        while True:
            try:
                text = self.path.read_text()
            except OSError:  # exited
                return
            for line in text.splitlines():
                if line.startswith("VmRSS:"):
                    self.samples.append((time.time(), int(line.split()[1]) * 1024))
            time.sleep(interval)

    def at(self, when: float) -> int:
        """The last sample taken before `when` (unix time)."""
        before = [rss for t, rss in self.samples if t <= when]
        return before[-1] if before else 0


def run_fleet(devices: int, rounds: int, model: str, workdir: Path,
              tracemalloc_dir: str | None = None, extra: tuple[str, ...] = ()) -> dict:
    broker = Mosquitto(workdir, extra="sys_interval 1\n").start()
    fleet = f"bench{devices}"
    counters = SysBytes(broker.port)
    workers = []
    for start in range(0, devices, PER_WORKER):
        proc = subprocess.Popen([sys.executable, __file__, "worker", str(broker.port), fleet, str(start),
                                 str(min(PER_WORKER, devices - start))], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        workers.append(proc)
    for proc in workers:
        assert proc.stdout.readline().strip() == "ready"
    before = counters.read()
    log = workdir / "coordinator.log"
    overrides = [f"broker.url=mqtt://127.0.0.1:{broker.port}", f"broker.fleet={fleet}",
                 f"state_dir={workdir / 'state'}", "http_port=0", "exit_when_done=true",
                 "evaluate=false", "export.enabled=false", f"model={model}", "strategy=fedavg",
                 f"rounds.total={rounds}", f"rounds.devices_per_round={devices}",
                 f"rounds.min_devices={devices}", "rounds.deadline_seconds=600",
                 "codec.download_dtype=fp16", "codec.upload_dtype=fp16", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if tracemalloc_dir is not None:  # the coordinator's opt-in tracing (coordinator/service/memtrace.py)
        env["FEDPRUNE_TRACEMALLOC"] = str(Path(tracemalloc_dir).resolve() / f"coordinator-{devices}.txt")
    started = time.perf_counter()
    with open(log, "w") as handle:
        coordinator = subprocess.Popen(
            ["fedprune", "coordinator", "serve", *sum((["--set", o] for o in overrides), [])],
            stderr=handle, env=env)
        rss = RssSampler(coordinator.pid)
        if coordinator.wait() != 0:
            raise subprocess.CalledProcessError(coordinator.returncode, "fedprune coordinator serve")
    wall = time.perf_counter() - started
    after = counters.read()
    for proc in workers:
        proc.stdin.close()
    for proc in workers:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    broker.stop()
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    final = next(e for e in entries if e["message"].startswith("done: "))
    from coordinator.service.store import Store
    store = Store(f"sqlite:///{workdir / 'state' / 'coordinator.db'}")
    committed = [r.summary for r in store.rounds() if r.state == "committed"]
    codec_up = sum(u.bytes for n in range(1, rounds + 1) for u in store.updates(n))
    tasks = [t for n in range(1, rounds + 1) for t in store.tasks(n).values()]
    store.close()
    # RSS before the first registration is planned: the runtime, the model and the dataset.
    first = next((e["ts"] for e in entries if e["message"].startswith("registered ")), None)
    return {"devices": devices, "coordinators": 1, "rounds": committed, "wall_seconds": wall,
            "rss_ready_bytes": rss.at(first) if first else 0,
            "rss_max_sampled_bytes": max((r for _, r in rss.samples), default=0),
            "rss_last_bytes": rss.samples[-1][1] if rss.samples else 0,
            "rss_samples": [(round(t, 2), r) for t, r in rss.samples],
            # The link's inbox over the run (the coordinator's last log line): the most messages
            # and payload bytes it held, and how often a delivery waited or went over the limit.
            "inbox": final.get("inbox", {}),
            "median_round_seconds": statistics.median(r["seconds"] for r in committed[1:] or committed),
            "peak_rss_bytes": final["peak_rss_bytes"],
            "bytes_up_codec": codec_up,
            "bytes_down_envelopes": sum(t.bytes_down for t in tasks),
            "broker_received": after.get("received", 0) - before.get("received", 0),
            "broker_sent": after.get("sent", 0) - before.get("sent", 0)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--json-out", default="runs/service_overhead.json")
    # Coordinator processes sharing the fleet. Only 1 for now: the multi-coordinator runs (1, 2, 4
    # processes under one supervisor, one PostgreSQL) become columns of the memory table below.
    parser.add_argument("--coordinators", default="1",
                        help="comma-separated coordinator process counts (only 1 is supported yet)")
    parser.add_argument("--tracemalloc", metavar="DIR",
                        help="run the coordinator with FEDPRUNE_TRACEMALLOC=DIR/coordinator-N.txt "
                             "(slower: the round seconds are not comparable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a coordinator.toml override, after the benchmark's own")
    args = parser.parse_args()
    counts = [int(c) for c in args.coordinators.split(",")]
    if counts != [1]:
        parser.error("--coordinators: only 1 coordinator process is supported yet")
    results = []
    for devices in (int(d) for d in args.devices.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run_fleet(devices, args.rounds, args.model, Path(tmp), args.tracemalloc,
                                     tuple(args.set)))
        r = results[-1]
        print(f"{devices} devices: median round {r['median_round_seconds']:.2f} s", flush=True)
    print(f"\n{'devices':>7} {'round s':>8} {'per device ms':>13} {'peak RSS MB':>11} "
          f"{'codec up MB':>11} {'tasks down MB':>13} {'broker in MB':>12} {'broker out MB':>13}")
    for r in results:
        print(f"{r['devices']:>7} {r['median_round_seconds']:>8.2f} "
              f"{1000 * r['median_round_seconds'] / r['devices']:>13.1f} {r['peak_rss_bytes'] / 1e6:>11.0f} "
              f"{r['bytes_up_codec'] / 1e6:>11.1f} {r['bytes_down_envelopes'] / 1e6:>13.1f} "
              f"{r['broker_received'] / 1e6:>12.1f} {r['broker_sent'] / 1e6:>13.1f}")
    # Coordinator memory against fleet size, one column group per coordinator count (only 1 yet).
    print(f"\ncoordinator memory, MB ({counts[0]} coordinator process)")
    print(f"{'devices':>7} {'RSS ready':>9} {'RSS last':>8} {'peak RSS':>8} {'peak - ready':>12} "
          f"{'inbox most':>10} {'inbox MB':>8} {'over limit':>10}")
    for r in results:
        print(f"{r['devices']:>7} {r['rss_ready_bytes'] / 1e6:>9.0f} {r['rss_last_bytes'] / 1e6:>8.0f} "
              f"{r['peak_rss_bytes'] / 1e6:>8.0f} "
              f"{(r['peak_rss_bytes'] - r['rss_ready_bytes']) / 1e6:>12.0f} "
              f"{r['inbox'].get('most_queued', 0):>10} {r['inbox'].get('most_bytes', 0) / 1e6:>8.1f} "
              f"{r['inbox'].get('over_limit', 0):>10}")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
