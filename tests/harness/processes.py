"""Processes the tests start: `python -m ...` with its output in a log, and how they are stopped.

Every process is stopped by its own pid (the Popen handle), never by name: a signal first, then
SIGKILL for one still running after the timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Process:
    """`python [python_flags] -m <args>` with one torch thread (as on a Pi), its output appended
    to `log` across restarts: stdout and stderr, or stderr alone with `stderr_only` (stdout then
    goes nowhere)."""
    name: str
    args: list[str]
    log: Path
    python_flags: Sequence[str] = ()
    stderr_only: bool = False
    cwd: Path | None = None  # where it runs (default: the test's own working folder)
    popen: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> Process:
        with open(self.log, "a") as out:  # the child keeps its own descriptor
            self.popen = subprocess.Popen(
                [sys.executable, *self.python_flags, "-m", *self.args], cwd=self.cwd,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                stdout=subprocess.DEVNULL if self.stderr_only else out,
                stderr=out if self.stderr_only else subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> int | None:
        """Its exit status, or None while it runs."""
        return self.popen.poll()

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> int:
        """Send `sig` (unless it already exited) and wait for its exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        return self.popen.wait(timeout)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-1500:] if self.log.exists() else "(no log)"


def stop_processes(processes: Iterable[Process | subprocess.Popen],
                   sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> None:
    """Send `sig` to each process still running, then wait for each; one still running after
    `timeout` seconds is SIGKILLed by its pid, and the stop fails naming it (as an unanswered
    signal is a fault) once every process is gone."""
    handles = [(getattr(p, "name", None), getattr(p, "popen", p)) for p in processes]
    handles = [(name or f"pid {popen.pid}", popen) for name, popen in handles if popen is not None]
    for _, popen in handles:
        if popen.poll() is None:
            popen.send_signal(sig)
    stuck = []
    for name, popen in handles:
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
            stuck.append(name)
    if stuck:
        raise AssertionError(f"{', '.join(stuck)} still ran {timeout:g} s after "
                             f"{signal.Signals(sig).name}: killed")
