#!/usr/bin/env bash
# Set up, then run the main job: FedP3 (OPU2) with 10 devices on Fashion-MNIST, S1 partition.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
fedprune simulate --strategy fedp3 --set fedp3.selection=opu2 --dataset fashion-mnist \
  --clients 10 --partition classes:5 --rounds 3 --local-epochs 1 --json-out runs/demo.json "$@"
