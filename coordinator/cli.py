"""`fedprune` command line: one entry point, subcommands by runtime role.

Handlers import their modules lazily so `fedprune --help` stays instant and a device that runs
only edge subcommands never loads coordinator code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _simulate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .simulation import run_simulation

    config = load_config(args.config, args.set, strategy=args.strategy, dataset=args.dataset,
                         data_dir=args.data_dir, model=args.model, clients=args.clients,
                         partition=args.partition, rounds=args.rounds, seed=args.seed,
                         fraction=args.fraction, **{"train.local_epochs": args.local_epochs})
    result = run_simulation(config, progress=not args.quiet).to_dict()
    _print_summary(result)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2))
        print(f"results written to {args.json_out}")
    return 0


def _print_summary(result: dict) -> None:
    print(f"{'round':>5} {'personal':>9} {'global':>7} {'bytes up':>12} {'bytes down':>12} "
          f"{'devices':>7} {'sec':>6}")
    for r in result["rounds"]:
        print(f"{r['round']:>5} {r['personalized_accuracy']:>9.4f} {r['global_accuracy']:>7.4f} "
              f"{r['bytes_up']:>12,} {r['bytes_down']:>12,} {r['participants']:>7} "
              f"{r['seconds']:>6.1f}")
    final = result["final"]
    print(f"final: personalized accuracy {final['personalized_accuracy']:.4f}, global accuracy "
          f"{final['global_accuracy']:.4f}, {final['bytes_up_total']:,} bytes up, "
          f"{final['bytes_down_total']:,} bytes down")
    if "privacy" in result:
        eps = [p["epsilon"] for p in result["privacy"]]
        delta = result["privacy"][0]["delta"]
        print(f"privacy: per-device epsilon max {max(eps):.3f}, median "
              f"{sorted(eps)[len(eps) // 2]:.3f} at delta={delta} (Opacus "
              f"{result['privacy'][0]['accountant'].upper()} accountant, record-level DP)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedprune", description="Federated learning that sizes a pruned submodel to each device.")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run N devices in one process on real data",
                         description="Simulate a federation in one process with the real device code.")
    sim.add_argument("--config", help="TOML file with any of the keys below and sections "
                     "[train], [fedp3], [dp], [codec]")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any key, e.g. fedp3.selection=opu3, dp.target_epsilon=4 (repeatable)")
    sim.add_argument("--strategy", choices=["fedavg", "fedp3"])
    sim.add_argument("--dataset", choices=["fashion-mnist", "fmnist", "mnist", "femnist"])
    sim.add_argument("--data-dir", help="folder with the dataset files (default: $FEDPRUNE_DATA, "
                     "then ../shared/data, then download with checksum)")
    sim.add_argument("--model", help="fedp3_cnn (default), lenet, mlp, resnet_small")
    sim.add_argument("--clients", type=int)
    sim.add_argument("--fraction", type=float, help="share of devices selected per round")
    sim.add_argument("--partition", help="iid, classes:K, dirichlet:ALPHA, niid-dirichlet:ALPHA[:MIN], natural")
    sim.add_argument("--rounds", type=int)
    sim.add_argument("--local-epochs", type=int)
    sim.add_argument("--seed", type=int)
    sim.add_argument("--json-out", help="write the results JSON here")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    sim.set_defaults(handler=_simulate)
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
