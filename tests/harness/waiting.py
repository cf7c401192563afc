"""Waiting on conditions, never on the clock alone.

A test that must wait polls the condition it needs against a deadline (`wait_until`, which fails
with what it was waiting for), or blocks on an event, a queue or a message. Processes it depends on
can be watched: if one exits while the test waits, the wait fails at once with that process's log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol


class Watched(Protocol):
    """A process a wait watches (`harness.processes.Process`, `harness.brokers.Mosquitto`)."""
    name: str

    def exited(self) -> int | None: ...

    def tail(self) -> str: ...


def poll_until(condition: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    """Poll `condition()` until it holds or `timeout` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def wait_until(condition: Callable[[], object], timeout: float, what: str,
               watch: Iterable[Watched] = (), interval: float = 0.1) -> None:
    """Poll `condition()` until it holds; fail after `timeout` seconds naming `what`, or at once
    if a watched process exits meanwhile (its status and the end of its log in the message)."""
    watch = list(watch)
    deadline = time.monotonic() + timeout
    while True:
        for process in watch:
            status = process.exited()
            if status is not None:
                raise AssertionError(f"{process.name} exited with status {status} while waiting "
                                     f"for {what}; its log ends:\n{process.tail()}")
        if condition():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
