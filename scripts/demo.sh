#!/usr/bin/env bash
# Set up, then run the main job: an embedded MQTT broker, the coordinator and 4 edge processes
# (catalogue classes rpi3b, phone-low, rpi4-4gb, gateway-512mb) training FedP3 with LEAF's CNN on
# Fashion-MNIST (S1) with DP, 3 rounds. It prints each device's plan (the two memory-tight classes
# get narrower submodels; the gateway's plan does not fit and it is not selected), then a row per
# round, and writes runs/demo.json.
# Extra arguments go to `fedprune demo` (e.g. --devices 8 --rounds 5 --broker mqtt://host:1883).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
fedprune demo --devices 4 --rounds 3 --json-out runs/demo.json "$@"
