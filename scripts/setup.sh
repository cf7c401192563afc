#!/usr/bin/env bash
# Install fedprune and its test tools on a fresh Python 3.11 machine.
# torch is pinned first: the machine's local CPU wheel; an unpinned torch pulls a CUDA build.
# A second run is a no-op: the install leaves a stamp (this checkout's path and the hashes of the
# files that decide what is installed) in the interpreter's prefix, and a matching stamp with
# fedprune importable from this checkout skips pip.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
stamp="$(python3 -c 'import sys; print(sys.prefix)')/fedprune-setup.stamp"
wanted="$(pwd) $(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && python3 -c '
import pathlib, sys, coordinator
sys.exit(pathlib.Path(coordinator.__file__).resolve().parents[1] != pathlib.Path.cwd().resolve())
' 2>/dev/null && command -v fedprune >/dev/null; then
  exit 0
fi
# pip's own notes that a configured wheel folder does not exist here say nothing a user can act on.
quiet_pip() {
  python3 -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
if ! python3 -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  quiet_pip torch==2.13.0
fi
# constraints.txt keeps the resolver from even considering another torch (litert-torch and
# torchao accept a range, and backtracking through it downloads CUDA wheels), and cuts a
# backtracking search that otherwise takes over 20 minutes (its comments say why).
quiet_pip -e ".[dev]" -c constraints.txt
echo "$wanted" > "$stamp"
