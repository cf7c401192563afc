"""The simulated clock: when each simulated device would finish its task, from its profile.

A device's round is download, then local training, then upload, one after the other:

    seconds = download bytes / downlink + samples x epochs / training rate + upload bytes / uplink

with the training rate the profile's measured DP (or plain) throughput of its reference model,
scaled by the submodel's forward MACs (`planner.training_rate`). Byte counts are the lengths of
the payloads the simulator really encoded, not the planner's estimates, so a plan that
under-estimated its transfer shows up as a straggler.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from device_profiles import DeviceProfile
from edge_sdk.models import ModelSpec

from .planner import training_rate


@dataclass(frozen=True)
class TaskTime:
    download_seconds: float
    train_seconds: float
    upload_seconds: float

    @property
    def total(self) -> float:
        return self.download_seconds + self.train_seconds + self.upload_seconds

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "seconds": self.total}


def task_time(profile: DeviceProfile, spec: ModelSpec, dp: bool,
              download_bytes: int, upload_bytes: int, samples: int, epochs: int) -> TaskTime:
    network = profile.network
    return TaskTime(download_bytes / network.downlink_bytes_per_s,
                    samples * epochs / training_rate(profile, spec, dp),
                    upload_bytes / network.uplink_bytes_per_s)


def time_to_accuracy(seconds: list[float], accuracies: list[float],
                     targets: tuple[float, ...]) -> dict[str, float | None]:
    """Simulated seconds until the accuracy first reaches each target (None: never reached).
    `seconds` are the rounds' simulated durations, in order."""
    reached: dict[str, float | None] = {}
    for target in targets:
        elapsed, found = 0.0, None
        for duration, accuracy in zip(seconds, accuracies):
            elapsed += duration
            if accuracy is not None and accuracy >= target:
                found = elapsed
                break
        reached[f"{target:g}"] = found
    return reached
