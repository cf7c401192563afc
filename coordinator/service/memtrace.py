"""Opt-in memory tracing of the coordinator: `FEDPRUNE_TRACEMALLOC=PATH fedprune coordinator serve`.

A debugging aid, off unless the variable is set. It starts `tracemalloc` (25 frames per
allocation) before the service is built and appends one report to PATH at every round commit
and at exit: the process's VmRSS and VmHWM, tracemalloc's current and peak traced bytes (the
peak since the previous report, so each report covers one round), and the top allocation sites
by traceback, alive at that moment and at the moment since the previous report when the most
was traced (a thread checks every half second and takes a snapshot at each new high). Allocations made through `PyMem`/`PyObject` and numpy
arrays (which report themselves to tracemalloc) are traced; torch tensors, SQLite's page cache,
OpenSSL buffers and glibc's unused free memory are not, so RSS minus traced bytes is what the
interpreter cannot see.

`FEDPRUNE_TRACEMALLOC_TOP` (default 15) sets how many sites a report lists. Tracing slows the
coordinator down (about 2x on a round of a thousand devices): never leave it on in production.
"""

from __future__ import annotations

import linecache
import os
import threading
import time
import tracemalloc
from pathlib import Path

VARIABLE = "FEDPRUNE_TRACEMALLOC"
FRAMES = 25


def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM in bytes (Linux); empty elsewhere."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


class MemoryTrace:
    def __init__(self, path: str | os.PathLike, top: int = 15):
        self.path = Path(path)
        self.top = top
        self.started = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.lock = threading.Lock()
        self.high: tuple[int, float, str, tracemalloc.Snapshot] | None = None
        self.stopped = threading.Event()
        tracemalloc.start(FRAMES)
        threading.Thread(target=self._watch, name="memtrace", daemon=True).start()

    def _watch(self) -> None:
        """Snapshot each new high of traced memory (5% and 1 MB over the last one)."""
        while not self.stopped.wait(0.5):
            current = tracemalloc.get_traced_memory()[0]
            with self.lock:
                if self.high is None or current > self.high[0] * 1.05 + 1e6:
                    self.high = (current, time.monotonic() - self.started, _rss_text(),
                                 _snapshot())

    def report(self, label: str) -> None:
        """Append one report: RSS, traced bytes and the top allocation sites alive now, and at
        the highest traced point since the previous report."""
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        snapshot = _snapshot()
        with self.lock:
            high, self.high = self.high, None
        lines = [f"=== {label} at {time.monotonic() - self.started:.1f} s: {_rss_text()}, "
                 f"traced {current / 1e6:.1f} MB (peak since the last report {peak / 1e6:.1f} MB)"]
        lines += self._top(snapshot)
        if high is not None and high[0] > current:
            lines.append(f"--- the highest traced point since the last report, at {high[1]:.1f} s: "
                         f"{high[2]}, traced {high[0] / 1e6:.1f} MB")
            lines += self._top(high[3])
        with self.path.open("a") as handle:
            handle.write("\n".join(lines) + "\n\n")

    def _top(self, snapshot: tracemalloc.Snapshot) -> list[str]:
        lines = []
        for stat in snapshot.statistics("traceback")[:self.top]:
            lines.append(f"{stat.size / 1e6:10.2f} MB in {stat.count:7d} blocks")
            for frame in _own_frames(stat.traceback):
                code = linecache.getline(frame.filename, frame.lineno).strip()
                lines.append(f"    {_short(frame.filename)}:{frame.lineno}  {code}")
        return lines

    def stop(self) -> None:
        self.stopped.set()
        self.report("exit")
        tracemalloc.stop()


def _snapshot() -> tracemalloc.Snapshot:
    return tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])


def _rss_text() -> str:
    status = _proc_status()
    return f"VmRSS {status.get('VmRSS', 0) / 1e6:.0f} MB, VmHWM {status.get('VmHWM', 0) / 1e6:.0f} MB"


def _own_frames(traceback: tracemalloc.Traceback, keep: int = 6) -> list[tracemalloc.Frame]:
    """The innermost frame, then up to `keep` of the project's own frames (innermost first):
    where the memory was allocated, and which line of fedprune asked for it."""
    frames = list(reversed(traceback))  # innermost first
    own = [f for f in frames[1:] if "site-packages" not in f.filename and "/lib/python" not in f.filename]
    return [frames[0], *own[:keep]]


_ROOT = str(Path(__file__).resolve().parents[2]) + os.sep


def _short(filename: str) -> str:
    if filename.startswith(_ROOT):
        return filename[len(_ROOT):]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def from_environment() -> MemoryTrace | None:
    """A started trace when FEDPRUNE_TRACEMALLOC names a file, else None."""
    path = os.environ.get(VARIABLE)
    if not path:
        return None
    return MemoryTrace(path, int(os.environ.get(f"{VARIABLE}_TOP", "15")))
