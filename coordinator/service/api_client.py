"""`fedprune status` and `fedprune devices`: read the coordinator's HTTP API (http_api.py) with
httpx and print its answers as tables (tabulate).

Every string the API answers came from somewhere else first (a device's profile name, a refusal
reason, a fleet name), so none reaches the terminal as is: `printable` writes out each control
character (an ESC would start a terminal escape sequence) instead of printing it."""

from __future__ import annotations

import os
import time
from typing import Any

import httpx
from tabulate import tabulate

from .config import HTTP_TOKEN_VARIABLE


def printable(value: Any) -> Any:
    """A string with every character a terminal would act on rather than show (controls, ESC,
    line and paragraph separators, bidi overrides) written as its Python escape (`\\x1b`);
    any other value as it is."""
    if not isinstance(value, str):
        return value
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in value)


def _table(rows: list[list[Any]], headers: list[str]) -> str:
    return tabulate([[printable(cell) for cell in row] for row in rows], headers=headers,
                    missingval="-", floatfmt=".4g")


class ApiError(ValueError):
    """The API could not be reached or refused the request; the message says which and why."""


def fetch(url: str, path: str, token: str | None = None, timeout: float = 10.0) -> Any:
    """GET `path` of the API at `url` as JSON, with the bearer token (`token`, else
    $FEDPRUNE_HTTP_TOKEN) when there is one."""
    token = token or os.environ.get(HTTP_TOKEN_VARIABLE) or None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    target = f"{url.rstrip('/')}{path}"
    try:
        reply = httpx.get(target, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ApiError(f"cannot reach {target}: {exc or type(exc).__name__}") from None
    if reply.status_code == 401:
        raise ApiError(f"{target} answered 401: the coordinator requires its http_token; pass "
                       f"--token or set {HTTP_TOKEN_VARIABLE}")
    if reply.status_code != 200:
        raise ApiError(f"{target} answered {reply.status_code}: {printable(reply.text[:200])}")
    try:
        return reply.json()
    except ValueError:
        raise ApiError(f"{target} did not answer JSON; is {url} the coordinator's API?") from None


def _megabytes(value: float | None) -> str | None:
    return None if value is None else f"{value / 1e6:.1f}"


def status_text(status: dict, rounds: list[dict]) -> str:
    """/status's headline and the round in progress, then /rounds as a table."""
    lines = [f"fleet {status['fleet']}: {status['rounds_committed']} of {status['rounds_total']} "
             f"rounds committed, {status['process']['devices_registered']} devices registered"]
    current = status.get("current")
    if current:
        answered = current["answered"]
        lines.append(f"round {current['round']} {current['state']}: {current['selected']} selected, "
                     f"quorum {current['quorum']}; " + ", ".join(f"{n} {s}" for s, n in answered.items())
                     + f"; deadline in {current['deadline_in']:.0f} s")
    else:
        lines.append("no round in progress")
    notes = [f"messages refused {status['messages']['refused']}, failed {status['messages']['failed']}"]
    if status.get("inbox"):
        inbox = status["inbox"]
        notes.append(f"inbox {inbox['queued']} of {inbox['limit']} queued "
                     f"({inbox['bytes'] / 1e6:.1f} of {inbox['max_bytes'] / 1e6:.0f} MB), "
                     f"{inbox['full_waits']} waits when full, {inbox['over_limit']} over the limit, "
                     f"{inbox['dropped_qos0']} QoS 0 dropped")
    if status.get("handling"):
        handling = status["handling"]
        notes.append(f"{handling['transient_failures']} transient failures retried, "
                     f"{handling['dead_lettered']} dead-lettered")
    lines.append("; ".join(notes))
    rows = [[r["number"], r["state"], r["selected"], r["accepted"], r["straggled"], r["refused"],
             r["rejected"], r["missing"],
             ", ".join(f"{k}:{v}" for k, v in sorted(r["refused_by_reason"].items())) or None,
             _megabytes(r["bytes_up"]), _megabytes(r["bytes_down"]), r["global_accuracy"],
             r["personalized_accuracy"], r["epsilon_max"],
             None if r["duration_seconds"] is None else f"{r['duration_seconds']:.1f}"]
            for r in rounds]
    table = _table(rows, headers=["round", "state", "selected", "accepted", "straggled",
                                  "refused", "rejected", "missing", "refused by reason",
                                  "MB up", "MB down", "global acc", "personal acc", "ε max",
                                  "seconds"])
    return "\n".join(map(printable, lines)) + "\n\n" + (table if rounds else "no rounds yet")


def devices_text(devices: list[dict]) -> str:
    """/devices as a table, one device a row."""
    rows = []
    for d in devices:
        plan = d["plan"]
        rows.append([d["device_id"], d["device_class"], d["state"], f"{plan['width_ratio']:g}",
                     d["rounds_participated"],
                     None if d["epsilon_spent"] is None else f"{d['epsilon_spent']:.3g}",
                     None if d["epsilon_budget"] is None else f"{d['epsilon_budget']:g}",
                     _megabytes(plan["predicted_peak_bytes"]), _megabytes(plan["memory_limit_bytes"]),
                     # What a task and an update weigh as planned: FedP3's upload is its layer
                     # group, which the keep ratios (1 for all) do not say.
                     f"{plan['download_dtype']} {_megabytes(plan['download_bytes'])}",
                     f"{plan['upload_dtype']} {_megabytes(plan['upload_bytes'])}",
                     _megabytes(d["bytes_down"]), _megabytes(d["bytes_up"]),
                     _megabytes(d["download_bytes_per_second"]), _megabytes(d["upload_bytes_per_second"]),
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d["last_seen"]))])
    table = _table(rows, headers=["device", "class", "state", "width", "rounds", "ε spent",
                                  "ε budget", "peak MB", "limit MB", "task MB", "update MB",
                                  "MB down", "MB up",
                                  "down MB/s", "up MB/s", "last seen"])
    return table if devices else "no devices registered"
