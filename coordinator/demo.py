"""`fedprune demo`: a broker, the coordinator and N edge processes on this machine, end to end.

The devices are real `fedprune-edge run` processes with catalogue profiles of different device
classes, each training its own Fashion-MNIST shard (S1: five consecutive classes per device) with
DP-SGD, talking to the coordinator only through MQTT. The coordinator runs in this process so
the demo can print each device's plan when it registers, then a row per round; its JSON log goes
to a file. The coordinator's HTTP API serves the fleet dashboard (coordinator/service/dashboard/):
the demo prints its address when the coordinator starts, and it stays up while the demo runs
(`hold`: after the last round too, until Ctrl-C).

The model is LEAF's FEMNIST CNN (6.5 M parameters), not FedP3's 1.3 M one, so that the planner's
work shows: its predicted peak at full width (774 MB, most of it the 6.4 M-weight fc layer at the
DP optimizer step) is over the budget of the memory-tight classes, which get narrower submodels
(rpi3b 0.875, phone-low 0.625), and the 512 MB gateway cannot hold even width 0.125 and is left
out. FedP3's CNN peaks at 535 MB at any width (the interpreter, torch and Opacus dominate), so
every class but the gateway would get the full model; and its 4.5 MB payload crosses any
catalogue link in under 2 s, so transfer would bind only at a deadline of a few seconds, which
real processes sharing this machine cannot meet (the deadline is the service's real one).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from sqlalchemy import select
from tqdm import tqdm

from device_profiles import catalogue_profile
from edge_sdk.agent import EdgeSettings
from edge_sdk.data import client_data_for, load_dataset
from edge_sdk.logs import configure_logging
from edge_sdk.models import model_spec
from edge_sdk.training import chance_accuracy

from .config import ConfigError
from .embedded_broker import EmbeddedBroker
from .planning.fleet import plan_table
from .planning.memory import MemoryCoefficients
from .planning.planner import plan_device
from .rounds import device_settings, planner_settings
from .strategies import build_strategy
from .service import CoordinatorService, ServiceSettings
from .service.config import HTTP_TOKEN_VARIABLE
from .service.store import UpdateRow

MODEL = "leaf_cnn"
DATASET = "fashion-mnist"
PARTITION = "classes:5"
# FedP3's S1 as the benchmarks run it: 100 clients of 600 images (420 to train, 180 to test);
# device i is client i.
S1_CLIENTS = 100
# The first four are the default demo: two memory-tight classes (narrower submodels), one that
# holds the full model, and one that holds nothing (not selected). Beyond four, roomier classes.
DEVICE_CLASSES = ("rpi3b", "phone-low", "rpi4-4gb", "gateway-512mb", "phone-high",
                  "jetson-nano-4gb", "rpi5-8gb", "phone-mid", "rpi4-2gb")


def device_class(index: int) -> str:
    return DEVICE_CLASSES[index % len(DEVICE_CLASSES)]


def _edge_config(out: Path, device: str, index: int, devices: int, broker: str, fleet: str,
                 epsilon: float, samples: int, data_dir: str | None,
                 secure_aggregation: bool = False) -> Path:
    """Under secure aggregation a device runs no DP-SGD (the distributed noise protects what it
    sends), so it has no record-level budget of its own, which would refuse such tasks."""
    config = EdgeSettings(device_id=device, broker=broker, fleet=fleet,
                        state_dir=str((out / "edges" / device).resolve()),
                        profile=f"catalogue:{device_class(index)}",
                        epsilon_budget=None if secure_aggregation else epsilon, max_samples=samples,
                        data={"dataset": DATASET, "partition": PARTITION,
                              "clients": _clients(devices), "device_index": index,
                              "data_dir": data_dir})
    return config.save(out / "edges" / f"{device}.toml")


def _clients(devices: int) -> int:
    return max(S1_CLIENTS, devices)


def _shards(devices: int, samples: int, data_dir: str | None) -> list[tuple[int, float]]:
    """Per device, as its edge process loads it (edge_sdk/agent/runner.py): the training samples
    it registers, and the chance level of its test split (its majority class's share)."""
    source = load_dataset(DATASET, data_dir)
    shards = []
    for index in range(devices):
        data = client_data_for(source, _clients(devices), PARTITION, 0, index).with_train_limit(samples)
        shards.append((len(data.train_y), chance_accuracy(np.asarray(data.test_y))))
    return shards


def _expected_fits(config: ServiceSettings, classes: list[str], held: list[int]) -> list[bool]:
    """Whether each device's plan will fit, as the coordinator plans it at registration (same
    settings; device i registers as index i only if it is first to, which the fit does not
    depend on at the demo's generous deadline).
    Only to size the rounds before the devices register: the printed plans are the coordinator's."""
    info = load_dataset(config.dataset, config.data_dir).info
    strategy = build_strategy(config, model_spec(config.model, info.input_shape, info.num_classes))
    settings = planner_settings(config, strategy, config.rounds.deadline_seconds)
    coefficients = MemoryCoefficients.load()
    return [plan_device(catalogue_profile(name), strategy.spec, config.model,
                        device_settings(settings, strategy, i, n), coefficients).fits
            for i, (name, n) in enumerate(zip(classes, held))]


def _device_row(row, name: str) -> dict:
    """A registered device as the coordinator's store has it, with its plan (DevicePlan dict)."""
    profile = row.profile
    return {"id": row.id, "device_class": name, "memory_available_bytes": profile["memory_available_bytes"],
            "downlink_bytes_per_s": profile["network"]["downlink_bytes_per_s"],
            "uplink_bytes_per_s": profile["network"]["uplink_bytes_per_s"],
            "fits": row.fits, "width_ratio": row.width_ratio, "num_samples": row.num_samples,
            "epsilon": row.epsilon, "epsilon_budget": row.epsilon_budget, "plan": row.plan}


# How long the demo waits for its broker (`--broker`) to answer before it gives up.
BROKER_GIVE_UP_SECONDS = 20


class DemoError(ValueError):
    """The demo cannot go on (no broker, its folder in use); the text says why and what to do."""


LOCK_FILE = ".demo.lock"


def _lock_run_folder(out: Path):
    """Lock `out` for this run (an open file under flock, released when the process ends): a
    second demo in the same folder would delete the first's files and hang it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK_FILE, "a+")
    except OSError as exc:
        raise DemoError(f"cannot use {out} as the run folder ({exc.strerror or exc}); give "
                        "another --out") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise DemoError(f"another demo ({holder}) is running in {out}; wait for it, stop it, or "
                        "give this one another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def run_demo(devices: int = 4, rounds: int = 3, broker: str | None = None,
             json_out: str | None = None, out_dir: str = "runs/demo", epsilon: float = 8.0,
             samples: int = 1500, local_epochs: int = 1, data_dir: str | None = None,
             deadline: float = 120.0, model: str = MODEL, export: bool = False,
             http_port: int = 0, hold: bool = False, secure_aggregation: bool = False) -> dict:
    """`deadline` is the service's one round deadline: the planner sizes each device's transfer
    and local samples for it from the device's profile, and the coordinator closes the round at
    it in real time. The edge processes run at this machine's speed, not the profile's, so it is
    chosen to let them all finish (a round ends as soon as every selected device has answered).

    `export`: send each device the model it starts the round from as a verified ONNX artifact.
    Off by default: exporting LEAF's CNN at three widths costs about a minute a round on 2 cores
    (torch.onnx and zstd level 19 on 10-26 MB), in the engine's thread.

    `http_port`: the dashboard's and HTTP API's port on 127.0.0.1 (0: a free one; the address is
    printed). `hold`: keep the coordinator, its dashboard and the devices up after the last round
    (the results are printed and written first) until Ctrl-C. `secure_aggregation`: the same
    demo under SecAgg+ with distributed discrete Gaussian noise at `epsilon` (user-level, for the
    released models) instead of DP-SGD on each device."""
    started = time.monotonic()
    out = Path(out_dir)
    lock = _lock_run_folder(out)  # held while this function runs (closed when it returns)
    for entry in out.iterdir():  # an earlier run's files, not the lock
        if entry.name != LOCK_FILE:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    (out / "logs").mkdir(parents=True)
    configure_logging("INFO", json_lines=True, path=str(out / "logs" / "coordinator.log"))
    names = [f"dev-{i:02d}" for i in range(devices)]
    classes = [device_class(i) for i in range(devices)]
    embedded = EmbeddedBroker(log_path=str(out / "logs" / "broker.log")).start() if broker is None else None
    url = embedded.url if embedded else broker
    # Fresh topics (nothing retained from an earlier run) and fresh device client ids: another
    # demo on the same broker, even one started in the same second, is another fleet.
    fleet = f"demo-{int(time.time())}-{os.getpid()}"
    # The devices start first (they take longest); their registrations are retained, so the
    # coordinator sees them whenever it connects.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for i, name in enumerate(names):
        path = _edge_config(out, name, i, devices, url, fleet, epsilon, samples, data_dir,
                            secure_aggregation)
        log = open(out / "logs" / f"{name}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "run", "--config",
                                       str(path), "--new-state"], stdout=log, stderr=subprocess.STDOUT,
                                      env=env))
    try:
        with _sigterm_as_interrupt():
            return _run(out, names, classes, procs, url, fleet, rounds, json_out, epsilon, samples,
                        local_epochs, data_dir, deadline, model, export, started, http_port, hold,
                        secure_aggregation)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if embedded:
            embedded.stop()


def say(text: str, indent: str = "") -> None:
    """One paragraph of the demo's report, wrapped to 100 columns (a terminal, a file)."""
    tqdm.write(textwrap.fill(text, 100, initial_indent=indent, subsequent_indent=indent + "  ",
                             break_on_hyphens=False, break_long_words=False)
               + ("\n" if text.endswith("\n") else ""))


def _run(out: Path, names: list[str], classes: list[str], procs: list[subprocess.Popen], url: str,
         fleet: str, rounds: int, json_out: str | None, epsilon: float, samples: int,
         local_epochs: int, data_dir: str | None, deadline: float, model: str, export: bool,
         started: float, http_port: int = 0, hold: bool = False,
         secure_aggregation: bool = False) -> dict:
    devices = len(names)
    shards = _shards(devices, samples, data_dir)
    privacy = {"secure_aggregation": {"enabled": True, "target_epsilon": epsilon}} \
        if secure_aggregation else {"dp": {"target_epsilon": epsilon, "max_grad_norm": 1.0}}
    learning = {"strategy": "fedp3", "model": model, "dataset": DATASET, "data_dir": data_dir,
                "train": {"local_epochs": local_epochs, "lr": 0.05, "momentum": 0.5},
                **privacy, "rounds": {"deadline_seconds": deadline}}
    fits = _expected_fits(ServiceSettings.model_validate(learning), classes, [n for n, _ in shards])
    selected = sum(fits)
    if selected == 0:
        raise ValueError(f"no device class among {', '.join(classes)} can hold {model}: "
                         "use more devices (--devices) or a smaller model")
    # Every device whose plan fits trains every round: a round opens once they have registered.
    config = ServiceSettings.model_validate({
        **learning, "state_dir": str(out / "coordinator"), "http_port": http_port,
        "exit_when_done": not hold,
        "export": {"enabled": export},
        "broker": {"url": url, "fleet": fleet},
        "rounds": {"total": rounds, "devices_per_round": selected, "min_devices": selected,
                   "min_fraction": 0.5, "deadline_seconds": deadline}})
    service = _DemoService(config)
    chance = {n: c for n, (_, c) in zip(names, shards)}
    trained_chance = float(np.mean([c for (_, c), f in zip(shards, fits) if f]))
    say(f"fedprune demo: {_count(devices, 'edge process', 'es')}, FedP3 on {DATASET} S1 "
        f"({PARTITION}: each device holds 5 of the 10 classes), model {model}, "
        + (f"secure aggregation with distributed noise, epsilon <= {epsilon:g} (user-level, "
           "the released models)" if secure_aggregation else
           f"DP-SGD epsilon <= {epsilon:g} per device")
        + f", round deadline {deadline:g} s, {_count(rounds, 'round')}; "
        "waiting for the devices to register...")
    bar = tqdm(total=rounds, unit="round", desc=f"demo: {devices} devices", leave=False,
               disable=None)  # a bar on a terminal only; redirected, the round lines say it
    summaries: list[dict] = []
    registered: dict[str, dict] = {}
    index_of = {n: i for i, n in enumerate(names)}
    printed = threading.Event()
    finished = threading.Event()  # the last round's row is printed (or no further round opens)

    def snapshot() -> None:
        for row in service.engine.store.devices():
            if row.id in index_of:
                registered[row.id] = _device_row(row, classes[index_of[row.id]])

    def print_plans() -> None:
        printed.set()
        rows = [registered[n] for n in names if n in registered]
        tqdm.write("")
        say("Each device's plan, as the coordinator sized it at registration "
            f"({model}, {local_epochs} local epoch(s) of DP-SGD, deadline {deadline:g} s):")
        tqdm.write(plan_table([{**r, "device": f"{r['id']} {r['device_class']}"} for r in rows]))
        for r in rows:
            width = r["plan"]["decisions"].get("width", "")
            if r["fits"] and r["width_ratio"] < 1:
                say(f"{r['id']} {r['device_class']}: {width}", indent="  ")
        left_out = [f"{r['id']} {r['device_class']}" for r in rows if not r["fits"]]
        say(f"{sum(r['fits'] for r in rows)} devices selected each round"
            + (f"; not selected (plan does not fit): {', '.join(left_out)}" if left_out else "")
            + f". Full decisions: the JSON's devices[].plan.decisions, or {out / 'logs'}/"
            "coordinator.log ('registered ...').")
        tqdm.write("")
        say("personal: each device's own model (FedP3: shared layers and its personal output "
            "layer), fine-tuned on the device without noise from what it received: DP-SGD "
            "trains only what a device sends, and the model it keeps is never sent; on its own "
            "test split, mean over the round's accepted devices; chance "
            f"{trained_chance:.2f} (each split's majority class; 5 classes per device)")
        say(f"global: the aggregated global model on the official {DATASET} test set (10 classes, "
            "chance 0.10); under FedP3 the output layer is personal, so this model is no "
            "device's and its accuracy means little")
        say("straggled: selected but past the deadline; refused: refused or rejected updates; "
            "bytes: as they crossed the broker (envelopes included)\n")
        tqdm.write(f"{'round':>5} {'accepted':>8} {'straggled':>9} {'refused':>7} {'eps max':>7} "
                   f"{'personal':>8} {'global':>7} {'bytes up':>12} {'bytes down':>12} {'sec':>6}")

    def by_device(number: int) -> list[str]:
        """A line per selected device: its update and task sizes, its personal model's accuracy
        and the epsilon it has spent in round `number`, from the store (as its update said)."""
        store = service.engine.store
        with store.session() as session:
            rows = session.execute(select(UpdateRow.device, UpdateRow.bytes, UpdateRow.local_accuracy,
                                          UpdateRow.epsilon).where(UpdateRow.round == number)).all()
        up = {row.device: row for row in rows}

        def line(device: str, down: int) -> str:
            row = up.get(device)
            if row is None:
                return f"{device}: no update; {down / 1e6:.2f} MB down"
            return (f"{device}: {row.bytes / 1e6:.2f} MB up, {down / 1e6:.2f} MB down, personal "
                    f"accuracy {_fmt(row.local_accuracy, 2)}, epsilon {_fmt(row.epsilon, 2)}")
        return [line(device, task.bytes_down) for device, task in sorted(store.tasks(number).items())]

    def on_register(row) -> None:
        snapshot()
        if printed.is_set() or not all(n in registered for n in names):
            return
        print_plans()
        eligible = sum(r["fits"] for r in registered.values())
        if eligible < selected:  # the coordinator planned differently than expected: no round opens
            tqdm.write(f"only {eligible} of the {selected} devices expected to fit do; stopping")
            service.stopping.set()

    def on_commit(summary: dict) -> None:
        if not printed.is_set():
            print_plans()
        snapshot()
        summaries.append(summary)
        epsilon_now = (summary.get("secure_aggregation") or {}).get("epsilon", summary["epsilon_max"])
        eps = f"{epsilon_now:.2f}" if epsilon_now is not None else "-"
        personal = summary["personalized_accuracy"]
        tqdm.write(f"{summary['round']:>5} {summary['accepted']:>4}/{summary['selected']:<3} "
                   f"{summary['straggled']:>9} {summary['refused'] + summary['rejected']:>7} "
                   f"{eps:>7} {personal if personal is not None else float('nan'):>8.4f} "
                   f"{summary['global_accuracy']:>7.4f} {summary['bytes_up']:>12,} "
                   f"{summary['bytes_down']:>12,} {summary['seconds']:>6.1f}")
        for line in by_device(summary["round"]):
            say(line, indent="      ")
        bar.update(1)
        if service.engine.done:
            finished.set()

    service.engine.on_register = on_register
    service.engine.on_commit = on_commit

    unreachable: list[str] = []  # why the demo stopped without a broker

    def watchdog() -> None:  # if the broker never answers, or every device process died, stop
        while not service.stopping.wait(1):
            broker = service.link.broker_state()
            if not service.link.counters["connects"] and \
                    time.monotonic() - started > BROKER_GIVE_UP_SECONDS:
                unreachable.append(
                    f"no broker answered at {url} in {BROKER_GIVE_UP_SECONDS} s ({broker['attempts']} "
                    f"attempts; last: {broker['last_error'] or 'no answer'}): start the broker, check "
                    "the address and port, or leave out --broker for the demo's own")
                service.stopping.set()
            elif all(p.poll() is not None for p in procs):
                tqdm.write("every edge process has exited; see the logs in " + str(out / "logs"))
                service.stopping.set()

    threading.Thread(target=watchdog, daemon=True).start()
    # The coordinator runs in its own thread, so that Ctrl-C (here) stops it cleanly and, with
    # `hold`, the results are reported while it keeps serving the dashboard.
    cannot_serve: list[str] = []

    def serve() -> None:
        try:
            service.run()
        except ConfigError as exc:  # its HTTP API cannot listen: the demo's flag says where
            cannot_serve.append(str(exc).replace("; change http_host or http_port",
                                                 "; give another --http-port, or 0 for a free one"))
            service.stopping.set()

    coordinator = threading.Thread(target=serve, name="coordinator")
    coordinator.start()
    engine = service.engine

    def held() -> bool:  # every round committed and reported, or the engine gave up
        return hold and (finished.is_set() or (engine.done and engine.committed_rounds() < rounds))

    try:
        while coordinator.is_alive() and not held():
            coordinator.join(0.5)
    except KeyboardInterrupt:
        tqdm.write("interrupted; stopping the coordinator")
        service.stopping.set()
        coordinator.join()
    finally:
        bar.close()
    if unreachable or cannot_serve:
        raise DemoError((unreachable or cannot_serve)[0])
    last = summaries[-1] if summaries else {}
    epsilons = [d["epsilon"] for d in registered.values() if d["epsilon"] is not None]
    final = {
        "rounds": len(summaries),
        "personalized_accuracy": last.get("personalized_accuracy"),
        "global_accuracy": last.get("global_accuracy"),
        "chance_accuracy": trained_chance,
        "bytes_up_total": sum(r["bytes_up"] for r in summaries),
        "bytes_down_total": sum(r["bytes_down"] for r in summaries),
        "updates_aggregated": sum(r["accepted"] for r in summaries),
        "updates_lost": sum(r["refused"] + r["rejected"] + r["missing"] for r in summaries),
        "straggled": sum(r["straggled"] for r in summaries),
        "epsilon_max": max(epsilons, default=None),
        "wall_seconds": time.monotonic() - started,
    }
    result = {"model": model, "dataset": DATASET, "partition": PARTITION,
              "deadline_seconds": deadline, "local_epochs": local_epochs,
              "accuracy": {"personalized": "each device's own model on its own test split, mean "
                                           "over the round's accepted devices",
                           "global": f"the global model on the official {DATASET} test set; "
                                     "FedP3's output layer is personal, so no device runs it",
                           "chance": "mean over the selected devices of their test split's "
                                     "majority-class share"},
              "devices": [{"id": n, "device_class": classes[i], "chance_accuracy": chance[n],
                           "selected": bool(registered.get(n, {}).get("fits", fits[i])),
                           **{k: v for k, v in registered.get(n, {}).items()
                              if k not in ("id", "device_class")},
                           "artifact": str(out / "edges" / n / "artifact"),
                           "model": str(out / "edges" / n / "model.pt")}
                          for i, n in enumerate(names)],
              "rounds": summaries, "final": final, "broker": url, "fleet": fleet,
              "checkpoints": str(out / "coordinator" / "checkpoints"),
              "exports": str(out / "coordinator" / "exports"),
              "database": config.database_url, "logs": str(out / "logs"),
              "privacy": {"epsilon_budget": epsilon, "delta": config.dp.delta,
                          "accountant": f"Opacus {config.dp.accountant.upper()}",
                          "unit": "record-level, per device, over all rounds"}
              if not secure_aggregation else
              {"target_epsilon": epsilon, "delta": config.secure_aggregation.delta,
               "accountant": "dp-accounting RDP (distributed discrete Gaussian)",
               "unit": "user-level, the released models, over all rounds",
               "epsilon": summaries[-1]["secure_aggregation"]["epsilon"] if summaries else None}}
    if summaries:
        tqdm.write("")
        say(
            f"after {len(summaries)} rounds in {final['wall_seconds']:.0f} s: personalized accuracy "
            f"{_fmt(final['personalized_accuracy'])} (each device's own model, own test split; "
            f"chance {trained_chance:.2f}), global model {_fmt(final['global_accuracy'])} on the "
            f"official test set (chance 0.10); {final['updates_aggregated']} updates aggregated, "
            f"{final['updates_lost']} lost ({final['straggled']} straggled); "
            + (f"secure aggregation: epsilon {_fmt(summaries[-1]['secure_aggregation']['epsilon'], 2)}"
               f" of {epsilon:g} for the released models (user-level, delta "
               f"{config.secure_aggregation.delta})" if secure_aggregation else
               "epsilon per device: " + ", ".join(f"{d['id']} {d['epsilon']:.2f}"
                                                   for d in result["devices"]
                                                   if d.get("epsilon") is not None)
               + f" (budget {epsilon:g}, delta {config.dp.delta})"))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2))
    if coordinator.is_alive():
        tqdm.write(f"\n--hold: the dashboard, the coordinator and the devices stay up until "
                   f"Ctrl-C; dashboard: {service.dashboard_url}")
        try:
            while coordinator.is_alive():
                coordinator.join(0.5)
        except KeyboardInterrupt:
            pass
        service.stopping.set()
        coordinator.join()
    return result


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops the demo as Ctrl-C does (the coordinator stops, the results are reported, the
    edge processes are terminated), when the demo runs in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _DemoService(CoordinatorService):
    """The coordinator, announcing the dashboard's address as soon as its HTTP API listens.

    The address never carries the API token (the terminal, its scrollback and any log of the
    demo's output would hold it): the page asks for it, and the message says where it is."""

    @property
    def dashboard_url(self) -> str | None:
        """Where the dashboard is, and where its token is when the API has one."""
        if self.http_url is None:
            return None
        if self.config.http_token is None:
            return f"{self.http_url}/"
        return (f"{self.http_url}/ (the page asks for the API token, the value of "
                f"${HTTP_TOKEN_VARIABLE}; or append #token= and that value to the address)")

    def start(self) -> None:
        super().start()
        if self.dashboard_url:
            say(f"dashboard: {self.dashboard_url}, live while the demo runs")


def _count(number: int, noun: str, plural: str = "s") -> str:
    return f"{number} {noun}{'' if number == 1 else plural}"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"
