"""Topic names under `<prefix>/<fleet>/`; one place so both sides and the docs agree.

Per-device topics end in the device id, so a broker ACL can give each device exactly its own
(`pattern write fedprune/+/update/%c`, `pattern read fedprune/+/task/%c`): the protocol is
shaped for issue 7's isolation without changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .envelope import MessageType

# The one topic kind each message type travels on, by direction; a message on another kind of
# topic is refused by its receiver.
DEVICE_TO_COORDINATOR = {"register": MessageType.REGISTER, "status": MessageType.STATUS,
                         "update": MessageType.UPDATE, "refusal": MessageType.REFUSAL,
                         "secagg_up": MessageType.SECAGG}
COORDINATOR_TO_DEVICE = {"task": MessageType.TASK, "ack": MessageType.ACK,
                         "artifact": MessageType.ARTIFACT, "secagg_down": MessageType.SECAGG}
# Secure aggregation's stages travel both ways, so on two topic kinds: MQTT 3.1.1 would hand the
# coordinator its own publishes on a kind it also subscribes to.

# Device ids, task ids and fleet names become MQTT topic levels and parts of file names on both
# sides, so one character set for all of them: no '/', no leading '.', no control characters.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_id(kind: str, value: object) -> str:
    """`value` if it is a safe id; ValueError naming `kind` otherwise.

    `fullmatch`, not `match` with `$`: `$` also matches before a trailing newline ("dev1\n").
    """
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ValueError(f"{kind} {value!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit (it becomes an MQTT topic level and a "
                         "file name)")
    return value


@dataclass(frozen=True)
class Topics:
    fleet: str = "default"
    prefix: str = "fedprune"

    def __post_init__(self) -> None:
        check_id("fleet", self.fleet)
        for level in self.prefix.split("/"):
            check_id("topic prefix level", level)

    @property
    def root(self) -> str:
        return f"{self.prefix}/{self.fleet}"

    # device -> coordinator
    def register(self, device: str) -> str:
        return f"{self.root}/register/{device}"

    def update(self, device: str) -> str:
        return f"{self.root}/update/{device}"

    def refusal(self, device: str) -> str:
        return f"{self.root}/refusal/{device}"

    def status(self, device: str) -> str:
        return f"{self.root}/status/{device}"

    # coordinator -> device
    def task(self, device: str) -> str:
        return f"{self.root}/task/{device}"

    def ack(self, device: str) -> str:
        return f"{self.root}/ack/{device}"

    def artifact(self, device: str) -> str:
        return f"{self.root}/artifact/{device}"

    # secure aggregation's stage messages, one kind each way
    def secagg_up(self, device: str) -> str:
        return f"{self.root}/secagg_up/{device}"

    def secagg_down(self, device: str) -> str:
        return f"{self.root}/secagg_down/{device}"

    # device -> itself: `fedprune-edge profile`'s link test (plain echo payloads, not envelopes)
    def profile(self, device: str) -> str:
        return f"{self.root}/profile/{device}"

    def coordinator_subscriptions(self) -> list[str]:
        return [f"{self.root}/{kind}/+" for kind in DEVICE_TO_COORDINATOR]

    def device_subscriptions(self, device: str) -> list[str]:
        return [self.task(device), self.ack(device), self.artifact(device), self.secagg_down(device)]

    def device_of(self, topic: str) -> tuple[str, str]:
        """(kind, device) of a per-device topic under this root; ValueError otherwise."""
        parts = topic.split("/")
        root = self.root.split("/")
        if parts[:len(root)] != root or len(parts) != len(root) + 2:
            raise ValueError(f"topic {topic!r} is not under {self.root}/<kind>/<device>")
        return parts[-2], check_id("device id", parts[-1])
