"""The link test: latency and bandwidth to the coordinator's broker, from messages echoed to us.

The caller owns the connection: it subscribes to a topic of its own on the broker and hands over
two callables, `send(payload)` publishing to that topic (QoS 1) and `receive(timeout)` returning
the next message that came back on it as (payload, `time.perf_counter()` at arrival), or None
after `timeout` seconds. So each message goes device -> broker -> device, and this module needs
no MQTT library: any publish-subscribe transport will do.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable

from .profile import ProfilingError

__all__ = ["measure_link", "parse_bandwidth"]

Send = Callable[[bytes], object]
Receive = Callable[[float], "tuple[bytes, float] | None"]

_BANDWIDTH_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
THROUGHPUT_SIZES = (16 << 10, 64 << 10, 256 << 10, 1 << 20)
SLOW_TRANSFER_S = 2.0
PING_TIMEOUT_S = 5.0
TRANSFER_TIMEOUT_S = 30.0


def parse_bandwidth(text: str) -> tuple[float, float]:
    """"UP,DOWN" in bytes/s with optional decimal suffixes k, M, G (link speeds are decimal)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2:
        raise ProfilingError(f"--bandwidth {text!r}: expected UP,DOWN in bytes/s, e.g. 2M,8M or 500k,1.5M")
    rates = []
    for part in parts:
        match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgG]?)", part)
        value = float(match.group(1)) * _BANDWIDTH_SUFFIXES[match.group(2).lower()] if match else 0.0
        if value <= 0:
            raise ProfilingError(f"--bandwidth {text!r}: {part!r} is not a positive rate in bytes/s "
                                 f"(a number with an optional k, M or G suffix)")
        rates.append(value)
    return rates[0], rates[1]


def measure_link(send: Send, receive: Receive, pings: int = 10,
                 measure_bandwidth: bool = True) -> dict[str, float | None]:
    """{"latency_ms": median round trip of tiny messages, "rate": bytes/s or None}.

    Throughput is timed the same way with growing payloads (stopping once one takes over 2 s, so a
    slow link is not tied up); a round trip through the broker carries the payload up and then
    down, so bytes / (round trip / 2) is one estimate for both directions. Each message starts
    with its sequence number, so a late echo of an earlier one is never taken for it.
    Raises ProfilingError when a message does not come back.
    """
    def round_trip(seq: int, size: int, timeout: float) -> float | None:
        header = f"{seq:08d}".encode()
        started = time.perf_counter()
        send(header + bytes(max(size - len(header), 0)))
        deadline = started + timeout
        while (left := deadline - time.perf_counter()) > 0:
            echoed = receive(left)
            if echoed is None:
                break
            payload, arrived = echoed
            if payload[:len(header)] == header:
                return arrived - started
        return None

    rtts = []
    for seq in range(pings):
        rtt = round_trip(seq, 16, PING_TIMEOUT_S)
        if rtt is None:
            raise ProfilingError(f"our own message did not come back within {PING_TIMEOUT_S:.0f} s "
                                 "(does the broker's ACL allow publishing and subscribing there?)")
        rtts.append(rtt)
    result: dict[str, float | None] = {"latency_ms": statistics.median(rtts) * 1000, "rate": None}
    if measure_bandwidth:
        for seq, size in enumerate(THROUGHPUT_SIZES, start=pings):
            rtt = round_trip(seq, size, TRANSFER_TIMEOUT_S)
            if rtt is None:  # dropped (e.g. a broker size limit) or hopelessly slow
                break
            result["rate"] = size / (rtt / 2)
            if rtt > SLOW_TRANSFER_S:
                break
        if result["rate"] is None:
            raise ProfilingError(f"a {THROUGHPUT_SIZES[0] >> 10} KB message did not come back "
                                 f"within {TRANSFER_TIMEOUT_S:.0f} s")
    return result
