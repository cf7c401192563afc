#!/usr/bin/env bash
# Set up, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Tests start their own Mosquitto brokers on free ports; install the binary when it is missing.
if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
  apt-get update -qq && apt-get install -y -qq mosquitto
fi
# The dashboard's browser test drives Debian's chromium (tests/test_dashboard_browser.py).
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq && apt-get install -y -qq chromium
fi
# Two workers (pytest-xdist), each file's tests on one of them (module-scoped brokers and
# fixtures stay per file): many tests wait on processes, brokers and deadlines, so one worker
# left a core idle (docs/BENCHMARKS.md section 10).
python3 -m pytest -q -n 2 --dist loadfile "$@"
