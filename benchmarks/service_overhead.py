"""Coordinator + broker overhead per round with 10 to 5,000 lightweight devices, with one
coordinator or several sharing the fleet.

Lightweight devices do no training: each answers its task at once with an update built from its
download (the uploaded tensors of its plan, decoded and re-encoded with the real codec), so a
round's wall time is the coordinator's and the broker's work alone: planning and encoding
tasks, delivery, validating, storing and aggregating updates, writing the checkpoint. Devices
run as paho clients, 250 per worker process. The broker is Mosquitto with the shipped config
(plus `sys_interval 1` for its byte counters); the coordinator is `fedprune coordinator serve`
as deployed, export and evaluation off: one process on SQLite, or N processes in cluster mode
([cluster]: update intake through the broker's shared subscription, one leader) on a PostgreSQL
database of the run's own.

    python benchmarks/service_overhead.py --devices 10,100,1000 --rounds 3 --model mlp
    python benchmarks/service_overhead.py --devices 1000,5000 --coordinators 1,2,4 --database postgresql

Reported per run: median round seconds (open to commit) over rounds 2..R; updates stored per
second fleet-wide (first to last update of a round); bytes: codec payloads vs envelopes vs what
Mosquitto counted; where the CPU went (each coordinator, the broker, the devices, the rest of the
machine); per coordinator process: the updates it stored, its CPU seconds and its memory (resident
once started, last, peak, and its inbox's high-water marks).
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
from contextlib import ExitStack
from pathlib import Path

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness.brokers import Mosquitto

PER_WORKER = 250


def worker(port: int, fleet: str, start: int, count: int) -> None:
    """`count` lightweight devices in this process; exits when told (stdin closes)."""
    import hashlib

    from device_profiles import catalogue_profile
    from edge_sdk import codec
    from edge_sdk.plan import SubmodelPlan
    from edge_sdk.protocol import (
        MessageType,
        RegisterHeader,
        StatusHeader,
        Topics,
        UpdateHeader,
        decode_envelope,
        encode_message,
        parse_header,
    )

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


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process (/proc/<pid>/stat), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds every core spent busy since boot (/proc/stat), for what no pid is kept of
    (PostgreSQL's backends, this script)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


class ProcessSampler:
    """A coordinator's VmRSS and CPU seconds every 0.1 s, read from /proc by this process (so the
    sampling costs the coordinator nothing): its resident memory once started, before any device
    is planned, its largest and last while it ran, and the CPU it had used when last seen."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.samples: list[tuple[float, int]] = []
        self.cpu_seconds = 0.0
        self.pid = pid
        self.path = Path(f"/proc/{pid}/status")
        threading.Thread(target=self._run, args=(interval,), daemon=True).start()

    def _run(self, interval: float) -> None:
        while True:
            try:
                text = self.path.read_text()
            except OSError:  # exited
                return
            cpu = cpu_seconds(self.pid)
            if cpu is None:
                return
            self.cpu_seconds = cpu
            for line in text.splitlines():
                if line.startswith("VmRSS:"):
                    self.samples.append((time.time(), int(line.split()[1]) * 1024))
            time.sleep(interval)

    def at(self, when: float) -> int:
        """The last sample taken before `when` (unix time)."""
        before = [rss for t, rss in self.samples if t <= when]
        return before[-1] if before else 0


def log_entries(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def intake(entries: list[dict], rounds: int) -> dict[int, list[float]]:
    """Per round, when each update this coordinator stored was accepted (its log's lines)."""
    times: dict[int, list[float]] = {n: [] for n in range(1, rounds + 1)}
    for e in entries:
        message = e["message"]
        if e.get("stored") and " accepted " in message and message.startswith("round "):
            times[int(message.split()[1].rstrip(":"))].append(e["ts"])
    return times


def measured_rounds(rounds: int) -> range:
    """The rounds the medians are taken over: 2..R (round 1 also plans every device), or 1 alone."""
    return range(2, rounds + 1) if rounds > 1 else range(1, 2)


def phases(entries: list[dict], accepted_at: dict[int, list[float]], rounds: int) -> dict[str, float]:
    """Where a round's wall time goes, medians over rounds 2..R from the leader's log: opening it
    to the last task sent (tasks go out between deliveries), the last task sent to the last
    update stored, and that to the commit (aggregation and checkpoint)."""
    marks: dict[int, dict[str, float]] = {n: {} for n in range(1, rounds + 1)}
    for e in entries:
        words = e["message"].split()
        if len(words) < 3 or words[0] != "round" or not words[1].rstrip(":").isdigit():
            continue
        n = int(words[1].rstrip(":"))
        if n not in marks:
            continue
        if " sending tasks to " in e["message"]:
            marks[n]["open"] = e["ts"]
        elif e["message"].endswith("every task sent"):
            marks[n]["sent"] = e["ts"]
        elif words[2] == "committed:":
            marks[n]["committed"] = e["ts"]
    out: dict[str, list[float]] = {"sending": [], "last_updates": [], "commit": []}
    for n in measured_rounds(rounds):
        m, stored = marks[n], accepted_at.get(n)
        if {"open", "sent", "committed"} <= m.keys() and stored:
            last = max(stored)
            out["sending"].append(m["sent"] - m["open"])
            out["last_updates"].append(max(0.0, last - m["sent"]))
            out["commit"].append(m["committed"] - max(last, m["sent"]))
    return {k: statistics.median(v) for k, v in out.items() if v}


def run_fleet(devices: int, rounds: int, model: str, workdir: Path, coordinators: int = 1,
              database: str | None = None, tracemalloc_dir: str | None = None,
              extra: tuple[str, ...] = ()) -> dict:
    """One fleet through `rounds` rounds. `database` None: one coordinator on SQLite, as deployed
    by default. A PostgreSQL URL: `coordinators` processes in cluster mode on it."""
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
    overrides = [f"broker.url=mqtt://127.0.0.1:{broker.port}", f"broker.fleet={fleet}",
                 "http_port=0", "exit_when_done=true",
                 "evaluate=false", "export.enabled=false", f"model={model}", "strategy=fedavg",
                 f"rounds.total={rounds}", f"rounds.devices_per_round={devices}",
                 f"rounds.min_devices={devices}", "rounds.deadline_seconds=600",
                 "codec.download_dtype=fp16", "codec.upload_dtype=fp16"]
    nodes = [f"c{i}" for i in range(coordinators)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes, samplers = {}, {}
    busy_before, started = machine_busy_seconds(), time.perf_counter()
    broker_cpu_before = cpu_seconds(broker.proc.pid) or 0.0
    worker_cpu_before = sum(cpu_seconds(proc.pid) or 0.0 for proc in workers)
    for node in nodes:
        own = [f"state_dir={workdir / node}"]
        if database is not None:
            own += [f"database={database}", "cluster.enabled=true", f"cluster.node={node}"]
        if tracemalloc_dir is not None:  # the coordinator's opt-in tracing (coordinator/service/memtrace.py)
            env["FEDPRUNE_TRACEMALLOC"] = str(Path(tracemalloc_dir).resolve() / f"coordinator-{devices}-{node}.txt")
        with open(workdir / f"{node}.log", "w") as handle:
            processes[node] = subprocess.Popen(
                ["fedprune", "coordinator", "serve",
                 *(arg for o in [*overrides, *own, *extra] for arg in ("--set", o))],
                stderr=handle, env=dict(env))
        samplers[node] = ProcessSampler(processes[node].pid)
    for node, process in processes.items():
        if process.wait() != 0:
            raise RuntimeError(f"coordinator {node} exited with {process.returncode}:\n"
                               + (workdir / f"{node}.log").read_text()[-3000:])
    wall = time.perf_counter() - started
    busy = machine_busy_seconds() - busy_before
    after = counters.read()
    broker_cpu = (cpu_seconds(broker.proc.pid) or 0.0) - broker_cpu_before
    worker_cpu = sum(cpu_seconds(proc.pid) or 0.0 for proc in workers) - worker_cpu_before
    for proc in workers:
        proc.stdin.close()
    for proc in workers:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    broker.stop()
    from coordinator.service.store import Store
    store = Store(database or f"sqlite:///{workdir / nodes[0] / 'coordinator.db'}")
    committed = [r.summary for r in store.rounds() if r.state == "committed"]
    codec_up = sum(u.bytes for n in range(1, rounds + 1) for u in store.updates(n))
    tasks = [t for n in range(1, rounds + 1) for t in store.tasks(n).values()]
    store.close()
    per_node, logs, accepted_at = [], {}, {}
    for node in nodes:
        entries = logs[node] = log_entries(workdir / f"{node}.log")
        accepted_at[node] = intake(entries, rounds)
        final = next(e for e in entries if e["message"].startswith("done: "))
        # RSS once connected, before any device is planned: the runtime, the model, the dataset.
        first = next((e["ts"] for e in entries if e["message"].startswith("connected to ")), None)
        rss = samplers[node]
        per_node.append({
            # The leader of a run: the one that sent tasks (a follower may take the lead only to
            # find every round committed, when the leader exits first).
            "led": any(" sending tasks to " in e["message"] for e in entries),
            "node": node,
            "stored": {n: len(t) for n, t in accepted_at[node].items()},
            "cpu_seconds": rss.cpu_seconds,
            "rss_ready_bytes": rss.at(first) if first else 0,
            "rss_last_bytes": rss.samples[-1][1] if rss.samples else 0,
            "rss_samples": [(round(t, 2), r) for t, r in rss.samples],
            "peak_rss_bytes": final["peak_rss_bytes"],
            # The link's inbox over the run: the most messages and payload bytes it held, and how
            # often a delivery waited or went over the limit.
            "inbox": final.get("inbox", {})})
    # Per round, when each update was stored, by any coordinator; the spans first to last.
    everyone = {n: sorted(t for times in accepted_at.values() for t in times[n]) for n in range(1, rounds + 1)}
    spans = [(len(everyone[n]), everyone[n][-1] - everyone[n][0])
             for n in measured_rounds(rounds) if len(everyone[n]) > 1]
    leader = next((p for p in per_node if p["led"]), per_node[0])
    round_phases = phases(logs[leader["node"]], everyone, rounds)
    coordinators_cpu = sum(p["cpu_seconds"] for p in per_node)
    return {"devices": devices, "coordinators": coordinators,
            "database": "sqlite" if database is None else "postgresql", "rounds": committed,
            "wall_seconds": wall, "nodes": per_node,
            "median_round_seconds": statistics.median(r["seconds"] for r in committed
                                                      if r["round"] in measured_rounds(rounds)),
            # Updates stored per second, fleet-wide, from the first to the last of each round.
            "intake_per_second": statistics.median(count / span for count, span in spans) if spans else 0.0,
            "cpu_seconds": {"coordinators": coordinators_cpu, "leader": leader["cpu_seconds"],
                            "broker": broker_cpu, "devices": worker_cpu,
                            "rest": max(0.0, busy - coordinators_cpu - broker_cpu - worker_cpu)},
            "busy_seconds": busy, "phases": round_phases,
            "rss_ready_bytes": leader["rss_ready_bytes"], "rss_last_bytes": leader["rss_last_bytes"],
            "peak_rss_bytes": leader["peak_rss_bytes"], "inbox": leader["inbox"],
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
    parser.add_argument("--coordinators", default="1",
                        help="comma-separated coordinator process counts; more than 1 needs "
                             "--database postgresql (cluster mode)")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite",
                        help="sqlite: one coordinator as deployed by default; postgresql: every "
                             "count in cluster mode on a database of the run's own, on the server "
                             "of FEDPRUNE_TEST_POSTGRES (default 127.0.0.1:5432, trust auth)")
    parser.add_argument("--tracemalloc", metavar="DIR",
                        help="run the coordinator with FEDPRUNE_TRACEMALLOC=DIR/coordinator-N-node.txt "
                             "(slower: the round seconds are not comparable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a coordinator.toml override, after the benchmark's own")
    args = parser.parse_args()
    counts = [int(c) for c in args.coordinators.split(",")]
    if args.database == "sqlite" and counts != [1]:
        parser.error("--coordinators above 1 share a PostgreSQL database: add --database postgresql")
    results = []
    for devices in (int(d) for d in args.devices.split(",")):
        for count in counts:
            with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
                database = None
                if args.database == "postgresql":
                    from harness.databases import own_database
                    database = stack.enter_context(own_database("bench"))
                results.append(run_fleet(devices, args.rounds, args.model, Path(tmp), count, database,
                                         args.tracemalloc, tuple(args.set)))
            r = results[-1]
            print(f"{devices} devices, {count} coordinator(s): median round "
                  f"{r['median_round_seconds']:.2f} s", flush=True)
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(results, indent=2))
    print_tables(results)


def print_tables(results: list[dict]) -> None:
    print(f"\n{'devices':>7} {'coord':>5} {'db':>10} {'round s':>8} {'per device ms':>13} "
          f"{'intake/s':>8} {'codec up MB':>11} {'tasks down MB':>13} {'broker in MB':>12} "
          f"{'broker out MB':>13}")
    for r in results:
        print(f"{r['devices']:>7} {r['coordinators']:>5} {r['database']:>10} "
              f"{r['median_round_seconds']:>8.2f} "
              f"{1000 * r['median_round_seconds'] / r['devices']:>13.1f} {r['intake_per_second']:>8.0f} "
              f"{r['bytes_up_codec'] / 1e6:>11.1f} {r['bytes_down_envelopes'] / 1e6:>13.1f} "
              f"{r['broker_received'] / 1e6:>12.1f} {r['broker_sent'] / 1e6:>13.1f}")
    print("\nwhere the CPU went over the whole run (seconds; 'rest' is the machine's busy time "
          "less the named processes: PostgreSQL, this script, the kernel)")
    print(f"{'devices':>7} {'coord':>5} {'wall s':>7} {'busy s':>7} {'leader':>7} {'followers':>9} "
          f"{'broker':>7} {'devices':>7} {'rest':>7}")
    for r in results:
        cpu = r["cpu_seconds"]
        print(f"{r['devices']:>7} {r['coordinators']:>5} {r['wall_seconds']:>7.1f} {r['busy_seconds']:>7.1f} "
              f"{cpu['leader']:>7.1f} {cpu['coordinators'] - cpu['leader']:>9.1f} {cpu['broker']:>7.1f} "
              f"{cpu['devices']:>7.1f} {cpu['rest']:>7.1f}")
    print("\nwhere a round's time went (seconds, median of rounds 2..R): opening it to the last task "
          "sent, then to the last update stored, then to the commit")
    print(f"{'devices':>7} {'coord':>5} {'round s':>8} {'sending':>8} {'last updates':>12} {'commit':>7}")
    for r in results:
        ph = r.get("phases", {})
        print(f"{r['devices']:>7} {r['coordinators']:>5} {r['median_round_seconds']:>8.2f} "
              f"{ph.get('sending', float('nan')):>8.2f} {ph.get('last_updates', float('nan')):>12.2f} "
              f"{ph.get('commit', float('nan')):>7.2f}")
    print("\nper coordinator process: updates stored (all rounds), CPU seconds, memory MB")
    print(f"{'devices':>7} {'coord':>5} {'node':>5} {'role':>8} {'stored':>7} {'CPU s':>7} "
          f"{'RSS ready':>9} {'RSS last':>8} {'peak RSS':>8} {'peak - ready':>12} "
          f"{'inbox most':>10} {'inbox MB':>8} {'over limit':>10}")
    for r in results:
        for p in r["nodes"]:
            print(f"{r['devices']:>7} {r['coordinators']:>5} {p['node']:>5} "
                  f"{'leader' if p['led'] else 'follower':>8} {sum(p['stored'].values()):>7} "
                  f"{p['cpu_seconds']:>7.1f} {p['rss_ready_bytes'] / 1e6:>9.0f} "
                  f"{p['rss_last_bytes'] / 1e6:>8.0f} {p['peak_rss_bytes'] / 1e6:>8.0f} "
                  f"{(p['peak_rss_bytes'] - p['rss_ready_bytes']) / 1e6:>12.0f} "
                  f"{p['inbox'].get('most_queued', 0):>10} {p['inbox'].get('most_bytes', 0) / 1e6:>8.1f} "
                  f"{p['inbox'].get('over_limit', 0):>10}")


if __name__ == "__main__":
    main()
