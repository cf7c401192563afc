#!/usr/bin/env bash
# Set up, then run the main job: an embedded MQTT broker, the coordinator and 4 edge processes
# (different device classes) training FedP3 on Fashion-MNIST (S1) with DP, 3 rounds.
# Extra arguments go to `fedprune demo` (e.g. --devices 8 --rounds 5 --broker mqtt://host:1883).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
fedprune demo --devices 4 --rounds 3 --json-out runs/demo.json "$@"
