#!/usr/bin/env bash
# Install fedprune and its test tools on a fresh Python 3.11 machine.
# torch is pinned first: the machine's local CPU wheel; an unpinned torch pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if ! python3 -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  python3 -m pip install --quiet torch==2.13.0
fi
# constraints.txt keeps the resolver from even considering another torch (litert-torch and
# torchao accept a range, and backtracking through it downloads CUDA wheels), and cuts a
# backtracking search that otherwise takes over 20 minutes (its comments say why).
python3 -m pip install --quiet -e ".[dev]" -c constraints.txt
