"""A device's side of a round under secure aggregation with distributed discrete Gaussian noise:
what it trained becomes the masked input of its `SecAggClient`, never an upload in the clear.

The input is the device's change from the state it started the task from, over every coordinate
it uploads (its support: whole uploaded tensors at its width, in the round's global flat
coordinates, which the coordinator knows from the device's plan). It is clipped to L2 norm
`clip`, scaled, rounded at random and given the device's share of discrete Gaussian noise
(`edge_sdk/secagg/quantize.py`, noise and rounding from the OS's randomness), then masked.

Why whole tensors: a support must be known to both sides before anything is sent, so which
entries a device sends cannot depend on what it trained. Entries it did not change (pruned by
its local mask, left out by a feature's upload mask) carry a change of 0; they count among the
coordinate's holders like any other.

Why this device does not run DP-SGD by default: the noise that hides its update is added once,
to the clipped update, and summed with the others' inside secure aggregation (user-level DP of
the released sum). Its personal model is then what it trained (`LocalClient.personal_model`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .client import LocalClient, TaskOutcome
from .secagg import SecAggClient
from .secagg.quantize import QuantizeSettings, quantize


@dataclass(frozen=True)
class SecureLayout:
    """Where a device's uploaded entries sit in the round's global flat vector: per uploaded
    tensor (plan order), the global coordinate of each of its local flat entries."""

    coordinates: tuple[tuple[str, np.ndarray], ...]

    @property
    def support(self) -> np.ndarray:
        """The sorted global coordinates the device holds (what SecAggClient is given)."""
        return np.sort(self._flat())

    def _flat(self) -> np.ndarray:
        if not self.coordinates:
            return np.zeros(0, np.int64)
        return np.concatenate([c.reshape(-1).astype(np.int64) for _, c in self.coordinates])

    def in_support_order(self, change: Mapping[str, np.ndarray]) -> np.ndarray:
        """The change's values, one per coordinate of `support`, in its order."""
        values = np.concatenate([np.asarray(change[name], np.float64).reshape(-1)
                                 for name, _ in self.coordinates]) if self.coordinates else \
            np.zeros(0)
        return values[np.argsort(self._flat(), kind="stable")]


def trained_change(client: LocalClient, names) -> dict[str, np.ndarray]:
    """What the client's last task changed in each of `names`: its trained value minus the value
    it started from."""
    return {name: (client.state[name].numpy().astype(np.float64)
                   - client.started[name].numpy().astype(np.float64)) for name in names}


def secure_input(change: Mapping[str, np.ndarray], layout: SecureLayout,
                 settings: QuantizeSettings) -> np.ndarray:
    """The values a device masks: its change in support order, clipped, scaled, rounded and
    noised (its share), as integers mod 2**bits."""
    return quantize(layout.in_support_order(change), settings)


class SecureDevice:
    """One device for one round: holds its upload to itself and answers the coordinator's
    secure-aggregation messages with bytes (the simulator relays them, as MQTT would)."""

    def __init__(self, device_id: str, client: LocalClient) -> None:
        self.device_id, self.client = device_id, client
        self.quantized: np.ndarray | None = None  # its own input before masking (device-side)
        self._secagg: SecAggClient | None = None
        self._layout: SecureLayout | None = None
        self._settings: QuantizeSettings | None = None
        self._uploaded: tuple[str, ...] = ()

    def keep_upload(self, outcome: TaskOutcome, uploaded) -> None:
        """Takes the task's plain upload out of its outcome before the outcome leaves the device:
        under secure aggregation it is never sent. `uploaded`: the tensors the plan uploads."""
        outcome.payload = None
        self._uploaded = tuple(uploaded)

    def setup(self, message: bytes, layout: SecureLayout, settings: QuantizeSettings) -> bytes:
        """SETUP in, ADVERTISE out."""
        self._layout, self._settings = layout, settings
        self._secagg = SecAggClient(message, self.device_id, layout.support)
        return self._secagg.advertise()

    def share_keys(self, message: bytes) -> bytes:
        return self._secagg.share_keys(message)

    def mask_input(self, message: bytes) -> bytes:
        """FORWARD in, MASKED out: the device's clipped, quantized, noised change, masked."""
        change = trained_change(self.client, self._uploaded)
        self.quantized = secure_input(change, self._layout, self._settings)
        return self._secagg.mask_input(message, self.quantized)

    def unmask(self, message: bytes) -> bytes:
        return self._secagg.unmask(message)
