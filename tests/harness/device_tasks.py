"""One genuine task, re-sent with changed header fields, to a device that may be restarted: how
the device-side tests drive a real EdgeAgent through tasks of their choosing (other DP settings,
leader epochs, rounds) without a coordinator deciding them."""

from __future__ import annotations

from edge_sdk.agent import EdgeAgent, EdgeSettings
from edge_sdk.protocol import MessageType, decode_envelope, encode_envelope
from harness.devices import DEVICE, capture
from harness.fleet import Harness


def first_task(h: Harness, device: str = DEVICE) -> bytes:
    """The engine's round-1 task for `device`, taken from the queue (not delivered)."""
    h.register_all()
    h.engine.tick()
    [(_, genuine)] = h.take(h.to_devices, "task", device)
    return genuine


def task_variant(genuine: bytes, **header) -> bytes:
    """`genuine` with header fields replaced (unsigned: these agents hold no coordinator key)."""
    envelope = decode_envelope(genuine)
    return encode_envelope(MessageType.TASK, {**envelope.header, **header}, envelope.payload)


def restart_agent(h: Harness, device: str = DEVICE, **settings) -> EdgeAgent:
    """`device` restarted: a new agent on the same state directory, with `settings` changed."""
    config = EdgeSettings.model_validate({**h.agents[device].config.model_dump(), **settings})
    h.agents[device] = EdgeAgent(config, publish=capture(h.to_coordinator))
    return h.agents[device]


def send_task(h: Harness, message: bytes, device: str = DEVICE) -> None:
    h.agents[device].handle(h.topics.task(device), message)
