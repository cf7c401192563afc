"""`fedprune` command line: the coordinator's commands (simulate, plan, export, demo, and the
coordinator service). What runs on a device is `fedprune-edge` (`edge_sdk/cli.py`).

Handlers import their modules lazily so `fedprune --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge_sdk.argtypes import (data_dir, port_number, positive_float, positive_int,
                               with_defaults_help)
from edge_sdk.logs import LOG_FORMATS, wants_json


def _simulate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .simulation import run_simulation

    config = load_config(args.config, args.set, strategy=args.strategy, dataset=args.dataset,
                         data_dir=args.data_dir, model=args.model, clients=args.clients,
                         partition=args.partition, rounds=args.rounds, seed=args.seed,
                         fraction=args.fraction, fleet=args.fleet, export_dir=args.export_dir,
                         backend=args.backend, ray_address=args.ray_address,
                         **{"train.local_epochs": args.local_epochs})
    result = run_simulation(config, progress=not args.quiet).to_dict()
    _print_summary(result)
    if result.get("exports"):
        print(f"exported {len(result['exports'])} client bundles (checkpoint, artifacts, "
              f"manifest.json) to {args.export_dir or config.export_dir}")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2))
        print(f"results written to {args.json_out}")
    return 0


def _print_summary(result: dict) -> None:
    from .simulation import shown_accuracy

    print(f"{'round':>5} {'personal':>9} {'global':>7} {'bytes up':>12} {'bytes down':>12} "
          f"{'devices':>7} {'sec':>6}")
    for r in result["rounds"]:
        print(f"{r['round']:>5} {shown_accuracy(r['personalized_accuracy']):>9} "
              f"{r['global_accuracy']:>7.4f} "
              f"{r['bytes_up']:>12,} {r['bytes_down']:>12,} {r['participants']:>7} "
              f"{r['seconds']:>6.1f}")
    final = result["final"]
    print(f"final: personalized accuracy {final['personalized_accuracy']:.4f} (each device's own "
          f"model, own test split), global model {final['global_device_accuracy']:.4f} on the "
          f"devices' test splits and {final['global_accuracy']:.4f} on the official test set; "
          f"chance {final['chance_accuracy']:.2f}; {final['bytes_up_total']:,} bytes up, "
          f"{final['bytes_down_total']:,} bytes down")
    if "clients" in result:
        from .planning.fleet import plan_table

        print(plan_table(result["clients"]))
        lost = final["updates_lost"]
        print(f"simulated time {final['simulated_seconds_total']:.0f} s over "
              f"{len(result['rounds'])} rounds; {final['updates_aggregated']} updates aggregated, "
              f"{lost} lost (straggled or out of memory); chance level of the partition "
              f"{final['chance_accuracy']:.2f}")
    if "privacy" in result:
        eps = [p["epsilon"] for p in result["privacy"]]
        delta = result["privacy"][0]["delta"]
        print(f"privacy: per-device epsilon max {max(eps):.3f}, median "
              f"{sorted(eps)[len(eps) // 2]:.3f} at delta={delta} (Opacus "
              f"{result['privacy'][0]['accountant'].upper()} accountant, record-level DP)")
    central = result["rounds"][-1].get("central_dp") if result["rounds"] else None
    if central:
        print(f"central DP: epsilon {central['epsilon']:.3f} at delta={central['delta']} after "
              f"{central['rounds']} rounds, each device's whole contribution (user-level; clip "
              f"{central['clip_norm']:g}, noise multiplier {central['noise_multiplier']:.3g}; "
              "dp-accounting RDP), against all but the coordinator")
    secure = result["rounds"][-1].get("secure_aggregation") if result["rounds"] else None
    if secure and secure.get("epsilon") is not None:
        print(f"secure aggregation: epsilon {secure['epsilon']:.3f} at delta={secure['delta']} "
              f"over the run, each device's whole update (user-level, distributed discrete "
              f"Gaussian, {secure['bits']} bits; dp-accounting RDP), against everyone, the "
              "coordinator included, which saw only sums")


def _plan(args: argparse.Namespace) -> int:
    from device_profiles import catalogue_profile, load_profile
    from edge_sdk.sizing import DataSlice
    from edge_sdk.data import dataset_info
    from edge_sdk.models import model_spec

    from .planning.memory import MemoryCoefficients
    from .planning.planner import PlannerSettings, plan_device
    from .planning.verify import measure_rehearsal

    profile = load_profile(args.profile) if args.profile else catalogue_profile(args.catalogue)
    progress = logging.getLogger("coordinator.planning.model_memory")  # a minute on first use: say so
    progress.setLevel(logging.INFO)
    if not progress.handlers:
        progress.addHandler(logging.StreamHandler(sys.stderr))
        progress.propagate = False  # said once, whatever the root logger does
    if args.input_shape:  # no data source: the model's own input contract
        if args.classes is None:
            raise ValueError("--input-shape needs --classes (the number of output classes)")
        shape, classes = args.input_shape, args.classes
    else:
        info = dataset_info(args.dataset)
        shape, classes = info.input_shape, info.num_classes
    settings = PlannerSettings(deadline_seconds=args.deadline, local_samples=args.local_samples,
                               batch_size=args.batch_size, dp=not args.no_dp,
                               memory_cache=args.memory_cache)
    base = model_spec(args.model, shape, classes)
    plan = plan_device(profile, base, args.model, settings, MemoryCoefficients.load(),
                       DataSlice(dataset=args.dataset, data_dir=args.data_dir))
    if args.verify and plan.fits:
        peak, _ = measure_rehearsal(plan, spec=base if args.input_shape else None)
        update: dict = {"measured_peak_bytes": peak}
        if peak > plan.memory_limit_bytes:
            update.update(fits=False, reasons=[
                f"verify: measured peak {peak / 1e6:.0f} MB is over the memory limit of "
                f"{plan.memory_limit_bytes / 1e6:.0f} MB (predicted {plan.predicted_peak_bytes / 1e6:.0f} MB)"])
        plan = plan.model_copy(update=update)
    if args.out:
        plan.save(args.out)
    if args.json:
        print(plan.model_dump_json(indent=2))
    else:
        verdict = "fits" if plan.fits else "DOES NOT FIT: " + "; ".join(plan.reasons)
        measured = (f", measured {plan.measured_peak_bytes / 1e6:.0f} MB"
                    if plan.measured_peak_bytes else "")
        print(f"{plan.device_id}: width {plan.width_ratio}, physical batch {plan.physical_batch_size}"
              f"/{plan.batch_size}, predicted peak {plan.predicted_peak_bytes / 1e6:.0f} MB of "
              f"{plan.memory_limit_bytes / 1e6:.0f} MB{measured}; download {plan.download_dtype} keep "
              f"{plan.download_keep:g} ({plan.download_bytes:,} B), upload {plan.upload_dtype} keep "
              f"{plan.upload_keep:g} ({plan.upload_bytes:,} B); {plan.local_samples} samples/round "
              f"-> {verdict}")
        for choice, why in plan.decisions.items():
            print(f"  {choice}: {why}")
    return 0 if plan.fits else 1


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not 1 <= len(shape) <= 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not 1 to 4 positive sizes such as 30 or 3,32,32")
    return shape


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _catalogue(args: argparse.Namespace) -> int:
    from edge_sdk.data import dataset_info
    from edge_sdk.models import model_spec

    from .planning.fleet import catalogue_table
    from .planning.planner import PlannerSettings

    info = dataset_info(args.dataset)
    base = model_spec(args.model, info.input_shape, info.num_classes)
    print(catalogue_table(base, args.model, PlannerSettings(dp=not args.no_dp)))
    return 0


def _export(args: argparse.Namespace) -> int:
    from edge_sdk.sizing import DevicePlan
    from edge_sdk.checkpoint import load_checkpoint
    from export.tflite_export import load_toolchain_quietly

    from .exporting import device_plan, export_checkpoint

    load_toolchain_quietly()  # its start-up notices are nothing a user can act on

    checkpoint = load_checkpoint(args.checkpoint)
    plan = None
    if args.plan:
        plan = DevicePlan.load(args.plan)
    elif args.device:
        plan = device_plan(args.device, checkpoint)
    formats = None if args.format == "all" else (args.format,)  # None: every registered format
    precisions = ("fp32", *args.quantize)
    manifest = export_checkpoint(checkpoint, args.out, plan=plan, formats=formats,
                                 precisions=precisions, data_dir=args.data_dir,
                                 device_id=args.device_id, samples=args.verify_samples)
    print(f"{manifest.device_id}: width {manifest.width_ratio:g}, {manifest.parameters:,} parameters "
          f"({manifest.sparsity:.1%} zero), {manifest.flops_per_sample:,} FLOPs per sample")
    print(f"{'artifact':<22}{'bytes':>12}{'zstd':>12}{'max |diff|':>12}{'top-1 agree':>12}"
          f"{'accuracy':>10}{'torch':>8}")
    for a in manifest.artifacts:
        p = a.parity
        print(f"{a.path:<22}{a.bytes:>12,}{a.compressed_bytes:>12,}{p.max_abs_diff:>12.2e}"
              f"{p.top1_agreement:>12.4f}{_share(p.accuracy):>10}{_share(p.torch_accuracy):>8}")
    samples = manifest.artifacts[0].parity.samples
    inputs = (f"{samples} real {manifest.dataset} test samples" if manifest.artifacts[0].parity.accuracy
              is not None else f"{samples} seeded random inputs of the {manifest.dataset} input "
              "contract (its data is not here: parity only, no accuracy)")
    print(f"verified on {inputs}; bundle and manifest.json in {args.out}")
    return 0


def _coordinator_serve(args: argparse.Namespace) -> int:
    from .config import load_config
    from .service import CoordinatorService, ServiceSettings
    from .service.memtrace import from_environment
    from edge_sdk.logs import configure_logging

    config = load_config(args.config, args.set, schema=ServiceSettings)
    configure_logging(args.log_level, json_lines=wants_json(
        "plain" if args.plain_logs else args.log_format))
    trace = from_environment()  # FEDPRUNE_TRACEMALLOC=PATH: a debugging aid (memtrace.py)
    logging.getLogger("fedprune.coordinator").info(
        "%s: broker %s, fleet %s, HTTP API %s, state in %s", f"config {args.config}" if args.config
        else "no --config, so the defaults (and any --set)", config.broker.url,
        config.broker.fleet, "off" if config.http_port is None else
        f"http://{config.http_host}:{config.http_port}", Path(config.state_dir).resolve())
    service = CoordinatorService(config)
    if trace is not None:
        service.engine.on_commit = lambda summary: trace.report(f"round {summary['round']} committed")
    service.install_signal_handlers()
    try:
        service.run()
    finally:
        if trace is not None:
            trace.stop()
    return 0


def _coordinator_provision(args: argparse.Namespace) -> int:
    from .provision import provision

    devices = ([d.strip() for d in args.devices.split(",") if d.strip()] if args.devices
               else [f"{args.prefix}-{i:03d}" for i in range(args.count)])
    if not devices:
        raise ValueError("give --devices ID,ID,... or --count N")
    profiles = [p.strip() for given in args.profile for p in given.split(",") if p.strip()]
    result = provision(args.out, devices, args.broker, args.broker_host or ["localhost", "127.0.0.1"],
                       args.fleet, args.listener_port, args.coordinators,
                       secrets_dir=args.secrets_dir, profiles=profiles or None)
    secret, folders = result["secrets"], result["device_folders"]
    assigned = sorted(set(result["profiles"].values()))
    print(f"provisioned {len(devices)} devices of fleet {args.fleet!r}")
    print(f"  broker:      include {result['broker_conf']} in mosquitto.conf; it reads\n"
          f"               {secret / 'broker'}/ (key, passwords): make them readable by mosquitto")
    print(f"  coordinator: fedprune coordinator serve --config {result['coordinator_configs'][0]}"
          + (f" (and {len(result['coordinator_configs']) - 1} more beside it)"
             if len(result["coordinator_configs"]) > 1 else ""))
    print(f"  devices:     copy {folders[devices[0]].parent}/<id>/ to each device as it is;\n"
          "               there: fedprune-edge run --config edge.toml")
    shown = [f"{d} {p.removeprefix('catalogue:')}" for d, p in list(result["profiles"].items())[:3]]
    print("  profiles:    " + ("each device measures itself on its first start" if assigned == ["measure"]
                              else ", ".join(shown) + (", ..." if len(devices) > 3 else "")))
    print(f"  secrets:     {secret}/ (folders 0700, files 0600); keep\n"
          f"               {secret / 'ca' / 'ca.key'} offline")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(devices=args.devices, rounds=args.rounds, broker=args.broker,
                      json_out=args.json_out, out_dir=args.out, epsilon=args.epsilon,
                      samples=args.samples, data_dir=args.data_dir, export=args.export,
                      http_port=args.http_port, hold=args.hold,
                      secure_aggregation=args.secure_aggregation)
    rounds = result["rounds"]
    if len(rounds) < args.rounds:
        print(f"demo stopped after {len(rounds)} of {args.rounds} rounds; logs in {result['logs']}",
              file=sys.stderr)
        return 1
    print(f"checkpoints: {result['checkpoints']}\ndatabase: {result['database']}\n"
          f"logs: {result['logs']}")
    if args.json_out:
        print(f"results written to {args.json_out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import report_files

    report = report_files(args.results, args.out, labels=args.label, title=args.title)
    for name in report.figures:
        print(f"wrote {Path(args.out) / name}")
    for name, why in report.skipped.items():
        print(f"skipped {name}: {why}")
    print(f"open {report.index}")
    for why in report.unread:  # drawn without them; the exit status says the report is partial
        print(f"fedprune report: error: {why}", file=sys.stderr)
    if report.failed:
        print(f"fedprune report: error: not drawn: {', '.join(report.failed)} (reasons above)",
              file=sys.stderr)
    return 2 if report.unread else 1 if report.failed else 0


def _new(args: argparse.Namespace) -> int:
    import shlex

    from .new_project import new_project

    project = new_project(args.directory, force=args.force)
    print(f"wrote {', '.join(p.name for p in project.written)} in {project.directory}; run it with\n"
          f"  cd {shlex.quote(str(project.directory))} && fedprune simulate --config fedprune.toml")
    return 0


def _api_status(args: argparse.Namespace) -> int:
    from .service.api_client import fetch, status_text

    status = fetch(args.url, "/status", args.token)
    print(status_text(status, fetch(args.url, "/rounds", args.token)["rounds"]))
    return 0


def _api_devices(args: argparse.Namespace) -> int:
    from .service.api_client import devices_text, fetch

    print(devices_text(fetch(args.url, "/devices", args.token)["devices"]))
    return 0


DATA_DIR_HELP = ("an existing folder with the dataset files (default: $FEDPRUNE_DATA, then "
                 "../shared/data, then ~/.cache/fedprune/data; missing files are downloaded there "
                 "and checked)")


def build_parser() -> argparse.ArgumentParser:
    from .backends import backend_names
    from .strategies import strategy_names, strategy_sections
    from edge_sdk.data.partitioners.registry import kinds as partition_kinds

    parser = argparse.ArgumentParser(
        prog="fedprune", description="Federated learning that sizes a pruned submodel to each device.")
    sub = parser.add_subparsers(dest="command", required=True)

    from .config import SimulationSettings

    def default(key: str) -> str:
        """A flag's default is its config key's (the flag only overrides a --config file)."""
        model, *path = [SimulationSettings, *key.split(".")]
        for section in path[:-1]:
            model = model.model_fields[section].annotation
        return f"(default: {model.model_fields[path[-1]].get_default(call_default_factory=True)})"

    sim = sub.add_parser("simulate", help="run N devices in one process on real data",
                         description="Simulate a federation in one process with the real device "
                         "code. Each flag sets the config key of its name over a --config file's; "
                         "--set sets any key, but not one its own flag also gives.")
    sim.add_argument("--config", help="TOML file with any of the keys below and sections [train], "
                     f"[dp], [codec], [aggregator] and the strategies' {', '.join(f'[{s}]' for s in strategy_sections())}")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any key, e.g. fedp3.selection=opu3, dp.target_epsilon=4 (repeatable)")
    sim.add_argument("--strategy", choices=strategy_names(),
                     help=f"registered strategies; each reads its own [section] (see README) {default('strategy')}")
    sim.add_argument("--dataset", choices=["fashion-mnist", "fmnist", "mnist", "femnist"],
                     help=f"a benchmark; a project's own data is its config's [data] {default('dataset')}")
    sim.add_argument("--data-dir", type=data_dir, help=DATA_DIR_HELP)
    sim.add_argument("--model", help="a registered model (fedp3_cnn, lenet, mlp, resnet_small, "
                     "leaf_cnn, resnet18) or package.module:function returning an nn.Module "
                     f"{default('model')}")
    sim.add_argument("--clients", type=positive_int, help=f"devices in the federation {default('clients')}")
    sim.add_argument("--fraction", type=float, help=f"share of devices selected per round {default('fraction')}")
    sim.add_argument("--partition", help=f"a partition kind: {', '.join(partition_kinds())} "
                     "(tier-* kinds follow the devices' tiers: they need --fleet; a bad spec "
                     f"lists each kind's form) {default('partition')}")
    sim.add_argument("--rounds", type=positive_int, help=f"federated rounds {default('rounds')}")
    sim.add_argument("--local-epochs", type=positive_int,
                     help=f"epochs over its data each device trains a round {default('train.local_epochs')}")
    sim.add_argument("--seed", type=int, help=f"seeds the partition, sampling and training {default('seed')}")
    sim.add_argument("--fleet", help="catalogue[:SEED]: give each device a sampled catalogue "
                     "profile and train the submodel the planner sizes for it (default: none, "
                     "every device trains the full model)")
    sim.add_argument("--export-dir", help="export every client's final model here (ONNX and "
                     "TFLite, verified), one folder per client with its manifest.json (default: no export)")
    sim.add_argument("--backend", choices=backend_names(),
                     help="where the devices run: in this process, or in a Ray cluster's "
                          f"pooled workers (same results for the same seed) {default('backend')}")
    sim.add_argument("--ray-address", metavar="ADDRESS",
                     help="the Ray cluster for --backend ray: 'auto' (the one `ray start` runs "
                          "here) or HOST:PORT of its head (default: start a local one)")
    sim.add_argument("--json-out", help="write the results JSON here")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    sim.set_defaults(handler=_simulate)

    plan = sub.add_parser("plan", help="size a device's submodel from its profile",
                          description="Pick the width, batch shape, precision and local samples "
                          "that fit a device's memory, bandwidth and compute.")
    source = plan.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", help="profile JSON written by `fedprune-edge profile` on the device")
    source.add_argument("--catalogue", help="a named catalogue device, e.g. rpi4-2gb")
    plan.add_argument("--model", default="fedp3_cnn", help="a registered model, or a "
                      "package.module:function returning an nn.Module for (input_shape, classes)")
    plan.add_argument("--dataset", default="fashion-mnist")
    plan.add_argument("--input-shape", type=_shape, metavar="N[,N...]",
                      help="plan for this input shape instead of the dataset's (e.g. 30 for rows "
                           "of 30 features, 3,32,32 for images); --verify then trains on random inputs")
    plan.add_argument("--classes", type=positive_int, help="output classes, with --input-shape")
    plan.add_argument("--memory-cache", metavar="DIR", help="where a model's own memory "
                      "rehearsals are kept (default: $FEDPRUNE_MEMORY_CACHE or ~/.cache/fedprune/memory)")
    plan.add_argument("--data-dir", type=data_dir, help=DATA_DIR_HELP)
    plan.add_argument("--deadline", type=positive_float, default=600.0, help="round deadline in seconds")
    plan.add_argument("--local-samples", type=positive_int, default=420)
    plan.add_argument("--batch-size", type=positive_int, default=48)
    plan.add_argument("--no-dp", action="store_true", help="plan for plain SGD instead of DP-SGD")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--out", help="save the plan here")
    plan.add_argument("--verify", action="store_true", help="run `fedprune-edge rehearse` on the "
                      "plan as a fresh process and add its measured peak RSS")
    plan.set_defaults(handler=_plan)

    cat = sub.add_parser("catalogue", help="the catalogue's device classes and what each can train",
                         description="List the catalogue's device classes (the profiles `fedprune "
                         "plan --catalogue`, `simulate --fleet catalogue` and the demo use): memory, "
                         "cores, DP training rate and links, the width the planner gives each for "
                         "--model, and why a class fits nothing (the runtime alone over its memory).")
    cat.add_argument("--model", default="fedp3_cnn", help="a registered model, or a "
                     "package.module:function returning an nn.Module for (input_shape, classes)")
    cat.add_argument("--dataset", default="fashion-mnist",
                     choices=["fashion-mnist", "fmnist", "mnist", "femnist"],
                     help="whose input shape and classes the model is built for")
    cat.add_argument("--no-dp", action="store_true", help="plan for plain SGD instead of DP-SGD")
    cat.set_defaults(handler=_catalogue)

    exp = sub.add_parser("export", help="export a device's submodel to ONNX/TFLite, verified",
                         description="Export a checkpoint as a device's submodel: width from "
                         "--plan or --device (planned on the spot), else the checkpoint as it is. "
                         "Every artifact is run in onnxruntime / ai-edge-litert on real test images "
                         "and published only if it matches torch; manifest.json records the "
                         "input contract, provenance and parity.")
    exp.add_argument("--checkpoint", required=True, help="checkpoint.pt (global or a device's)")
    target = exp.add_mutually_exclusive_group()
    target.add_argument("--device", help="catalogue device name (e.g. rpi4-2gb) or a profile JSON")
    target.add_argument("--plan", help="plan JSON written by `fedprune plan --out`")
    from export.formats import export_formats
    exp.add_argument("--format", choices=[*export_formats(), "all"], default="all")
    exp.add_argument("--quantize", action="append", choices=["fp16", "int8"], default=[],
                     help="also export this variant beside fp32 (repeatable)")
    exp.add_argument("--out", required=True, help="bundle directory")
    exp.add_argument("--device-id", help="device id for the manifest (default: the plan's device)")
    exp.add_argument("--data-dir", type=data_dir, help=f"{DATA_DIR_HELP}; its test images verify "
                     "the artifacts")
    exp.add_argument("--verify-samples", type=positive_int, default=512,
                     help="real test images each artifact is checked on (default: %(default)s)")
    exp.set_defaults(handler=_export)

    demo = sub.add_parser("demo", help="broker + coordinator + N edge processes, end to end",
                          description="Start an embedded MQTT broker on loopback (or use --broker), "
                          "the coordinator, and N edge processes with different catalogue device "
                          "profiles training Fashion-MNIST (S1) with DP; print a per-round table "
                          "and serve the live fleet dashboard (its address is printed).")
    demo.add_argument("--devices", type=positive_int, default=4, help="edge processes, each a catalogue device class in turn")
    demo.add_argument("--rounds", type=positive_int, default=3, help="federated rounds")
    demo.add_argument("--broker", metavar="URL", help="use this broker (mqtt://HOST:PORT) instead "
                      "of the embedded one")
    demo.add_argument("--epsilon", type=positive_float, default=8.0, help="each device's DP budget over the run")
    demo.add_argument("--samples", type=positive_int, default=1500, help="local samples per device")
    demo.add_argument("--export", action="store_true",
                      help="also send each device its model as a verified ONNX artifact every round "
                           "(about a minute a round more on 2 cores; the engine exports in its thread)")
    demo.add_argument("--data-dir", type=data_dir, help=DATA_DIR_HELP)
    demo.add_argument("--out", default="runs/demo", help="state, checkpoints, exports and logs")
    demo.add_argument("--json-out", help="also write the results JSON here (each device's plan, "
                      "the rounds, the final block)")
    demo.add_argument("--http-port", type=port_number, default=0, metavar="PORT",
                      help="the fleet dashboard's port on 127.0.0.1 (default: a free one; the "
                           "address is printed when the coordinator starts)")
    demo.add_argument("--secure-aggregation", action="store_true",
                      help="run the rounds under secure aggregation (SecAgg+) with distributed "
                           "discrete Gaussian noise at --epsilon, user-level, instead of DP-SGD "
                           "on each device: the coordinator learns only each round's noised sum")
    demo.add_argument("--hold", action="store_true",
                      help="keep the dashboard (and the coordinator and devices) up after the last "
                           "round, until Ctrl-C")
    demo.set_defaults(handler=_demo)

    rep = sub.add_parser("report", help="plot runs' results: PNG figures and an HTML page",
                         description="Draw the results of one or more runs (simulate, demo and the "
                         "benchmarks' JSON) with matplotlib: accuracy by round and by cumulative "
                         "bytes (every run on one set of axes), epsilon per device, the fleet's "
                         "widths and keeps, devices in and out of each round; DIR/index.html "
                         "shows them. A figure the results cannot feed is listed as not drawn.")
    rep.add_argument("results", nargs="+", metavar="RESULTS.json")
    rep.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs and index.html")
    rep.add_argument("--label", action="append", help="a run's name in the legends, one per "
                     "results file in order (default: the file's name)")
    rep.add_argument("--title", default="fedprune report")
    rep.set_defaults(handler=_report)

    coord = sub.add_parser("coordinator", help="the coordinator service")
    coord_sub = coord.add_subparsers(dest="coordinator_command", required=True)
    serve = coord_sub.add_parser("serve", help="run rounds over MQTT for a fleet of edge devices",
                                 description="Registry, round engine, persistence and the status "
                                 "endpoint; see docs/PROTOCOL.md for the wire contract.")
    serve.add_argument("--config", help="coordinator.toml (see deploy/coordinator.example.toml; "
                       "without it, the built-in defaults and --set, said at start)")
    serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. rounds.total=5 (repeatable)")
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument("--log-format", choices=LOG_FORMATS, default="auto",
                     help="auto: plain lines on a terminal, JSON lines otherwise (default: %(default)s)")
    serve.add_argument("--plain-logs", action="store_true", help="the same as --log-format plain")
    serve.set_defaults(handler=_coordinator_serve)
    prov = coord_sub.add_parser("provision", help="per-device credentials, broker ACLs, TLS and "
                                "signing keys", description="Create a fleet CA and broker "
                                "certificate, a Mosquitto password file and topic ACLs, the "
                                "coordinator's signing key and config, and one edge.toml per device.")
    prov.add_argument("--devices", help="comma-separated device ids")
    prov.add_argument("--count", type=int, default=0, help="or this many ids: PREFIX-000, ...")
    prov.add_argument("--prefix", default="dev")
    prov.add_argument("--broker", required=True, help="the URL devices use, e.g. mqtts://broker.lan:8883")
    prov.add_argument("--broker-host", action="append", help="names and IPs in the broker "
                      "certificate (repeatable; default localhost and 127.0.0.1)")
    prov.add_argument("--fleet", default="default", help="the fleet's name (default: %(default)s)")
    prov.add_argument("--listener-port", type=int, default=8883)
    prov.add_argument("--out", default="fleet", help="the broker's config, certificates and the "
                      "coordinator's public key: nothing secret (default: %(default)s)")
    prov.add_argument("--secrets-dir", help="keys, password files and the folders of the devices "
                      "and the coordinator, 0700 (default: ~/.config/fedprune/FLEET, or "
                      "$XDG_CONFIG_HOME/fedprune/FLEET)")
    prov.add_argument("--profile", action="append", default=[], metavar="SPEC[,SPEC...]",
                      help="device profiles, given round-robin: a catalogue class (rpi4-4gb, "
                      "catalogue:rpi4-4gb), a profile JSON from `fedprune-edge profile` (copied "
                      "into each device folder), or measure (repeatable; default: measure, each "
                      "device profiles itself on its first start)")
    prov.add_argument("--coordinators", type=int, default=1,
                      help="a cluster's coordinators: each its own broker user, client id, ACL entry "
                           "and coordinator/coordinator-<i>.toml (default 1)")
    prov.set_defaults(handler=_coordinator_provision)

    new = sub.add_parser("new", help="start a project: your model, your data, configs",
                         description="Write a project that `fedprune simulate --config "
                         "fedprune.toml` runs as written: model.py (a PyTorch model factory), "
                         "data.py (the data), fedprune.toml (the simulation), edge.toml (a "
                         "device) and a README; see docs/YOUR-MODEL.md.")
    new.add_argument("directory", metavar="DIR", help="a new or empty folder")
    new.add_argument("--force", action="store_true",
                     help="write into a folder that has files (the project's own are replaced)")
    new.set_defaults(handler=_new)

    for name, handler, what in (("status", _api_status, "the service's status and its rounds"),
                                ("devices", _api_devices, "the registered devices and their plans")):
        api = sub.add_parser(name, help=f"print {what} from a running coordinator's HTTP API",
                             description=f"Print {what} as tables, read from the HTTP API of "
                             "`fedprune coordinator serve` (http_host:http_port).")
        api.add_argument("--url", default="http://127.0.0.1:8080",
                         help="the API's base URL (default: %(default)s)")
        api.add_argument("--token", help="the coordinator's http_token, when it has one (default: "
                         "$FEDPRUNE_HTTP_TOKEN; the environment keeps it out of the process list)")
        api.set_defaults(handler=handler)

    with_defaults_help(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as exc:  # ConfigError, DataError, CodecError, SpecError all derive from it
        print(f"fedprune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
