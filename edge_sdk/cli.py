"""`fedprune-edge` command line: what runs on the device (`python -m edge_sdk.cli` works too).

`run` joins a fleet, `rehearse` trains one real local epoch of a plan, `profile` measures the
device. Handlers import their modules lazily so `--help` and argument errors stay instant, and
nothing here imports the coordinator: a device installs `fedprune[edge]` only.
"""

from __future__ import annotations

import argparse
import json
import sys

from .argtypes import with_defaults_help
from .logs import LOG_FORMATS, wants_json


def _run(args: argparse.Namespace) -> int:
    import signal

    from .agent import EdgeAgent, load_edge_config
    from .logs import configure_logging

    from .agent.state import open_state_dir

    config = load_edge_config(args.config)
    open_state_dir(config.state_dir, config.device_id, new=args.new_state)
    configure_logging(args.log_level, json_lines=wants_json(
        "plain" if args.plain_logs else args.log_format))
    agent = EdgeAgent(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stopping.set())
    agent.run()
    return 0


def _rehearse(args: argparse.Namespace) -> int:
    from .rehearsal import rehearse
    from .sizing import DevicePlan

    report = rehearse(DevicePlan.load(args.plan))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['device_id']}: trained {report['samples']} samples in "
              f"{report['seconds']:.1f} s, peak RSS {report['peak_rss_bytes'] / 1e6:.1f} MB")
    return 0


def _profile(args: argparse.Namespace) -> int:
    """Measure, write the JSON, print what the planner will see."""
    from device_profiles.network import parse_bandwidth

    from .profiling import measure_profile

    bandwidth = parse_bandwidth(args.bandwidth) if args.bandwidth else None
    profile = measure_profile(name=args.name, broker=args.broker, bandwidth=bandwidth, quick=args.quick)
    profile.save(args.out)
    gib = 1 << 30
    limit = "none" if profile.cgroup_limit_bytes is None else f"{profile.cgroup_limit_bytes / gib:.2f} GiB"
    net = profile.network
    latency = "" if net.latency_ms is None else f", latency {net.latency_ms:.1f} ms"
    print(f"profile of {profile.name} written to {args.out}")
    print(f"  memory:  {profile.memory_available_bytes / gib:.2f} GiB available of "
          f"{profile.memory_total_bytes / gib:.2f} GiB (cgroup limit: {limit}); {profile.cpu_cores} cores")
    print(f"  compute: {profile.compute.samples_per_s:,.0f} samples/s plain, "
          f"{profile.compute.dp_samples_per_s:,.0f} samples/s DP ({profile.compute.reference_model}, "
          f"batch {profile.compute.batch_size})")
    print(f"  network: up {net.uplink_bytes_per_s / 1e6:,.2f} MB/s, down "
          f"{net.downlink_bytes_per_s / 1e6:,.2f} MB/s ({net.source}){latency}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedprune-edge", description="The fedprune device: join a fleet, rehearse a plan, "
        "measure this device's profile.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="join a fleet: register, train tasks with DP, send updates",
                         description="The MQTT edge agent: register with the coordinator, train "
                         "each task with DP, send the update; see docs/PROTOCOL.md.")
    run.add_argument("--config", required=True, help="edge.toml (see deploy/edge.example.toml)")
    run.add_argument("--new-state", action="store_true",
                     help="this device is new: create its state_dir (privacy ledger, model, "
                     "outbox) if it does not exist; without it a missing state_dir is an error, "
                     "so a typo never starts an empty ledger")
    run.add_argument("--log-level", default="INFO")
    run.add_argument("--log-format", choices=LOG_FORMATS, default="auto",
                     help="auto: plain lines on a terminal, JSON lines otherwise (default: %(default)s)")
    run.add_argument("--plain-logs", action="store_true", help="the same as --log-format plain")
    run.set_defaults(handler=_run)

    rehearse = sub.add_parser("rehearse", help="one real local DP epoch of a plan; prints peak RSS")
    rehearse.add_argument("--plan", required=True, help="plan JSON written by `fedprune plan --out`")
    rehearse.add_argument("--json", action="store_true", help="print the report as one JSON line")
    rehearse.set_defaults(handler=_rehearse)

    prof = sub.add_parser("profile", help="measure this device and write its profile",
                          description="Measure this device's memory, cores, disk, battery, training "
                          "throughput (plain and DP) and link to the coordinator, and write the "
                          "DeviceProfile JSON the memory planner reads. The link is measured with "
                          "--broker or given with --bandwidth; one of the two is required.")
    prof.add_argument("--broker", metavar="URL",
                      help="the coordinator's MQTT broker, mqtt://HOST[:PORT]; measures latency "
                      "and bandwidth")
    prof.add_argument("--bandwidth", metavar="UP,DOWN",
                      help="link speed in bytes/s with an optional k/M/G suffix, e.g. 1M,4M; "
                      "overrides the measured bandwidth")
    prof.add_argument("--out", default="profile.json",
                      help="where to write the profile (default: %(default)s)")
    prof.add_argument("--name", help="device name in the profile (default: the host name)")
    prof.add_argument("--quick", action="store_true",
                      help="about 1 s per compute test instead of 3 s (less precise)")
    prof.set_defaults(handler=_profile)
    with_defaults_help(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, ConnectionError) as exc:  # ConfigError, ProfileError...; TransportError
        print(f"fedprune-edge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
