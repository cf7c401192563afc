"""A planned fleet in the simulator: every device's sampled profile and its sizing.

`policy` says how devices are sized, so the payoff of per-device sizing can be measured against
what a framework without a planner would do on the same fleet (benchmarks/payoff.py):

- `planned`: each device's own plan (width, physical batch, transfer, local samples);
- `uniform`: one width for everyone, the widest the weakest participating device can hold;
  transfer and local samples as the run configures them;
- `full`: the full model; devices that cannot hold it or would miss the deadline are left out;
- `full-all`: the full model sent to everyone; a device that cannot hold it runs out of memory
  and one past the deadline straggles: both updates are lost.
"""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass
from typing import Literal

from device_profiles import DeviceProfile, catalogue_names, catalogue_profile, parse_fleet_arg, sample_fleet
from edge_sdk.sizing import DevicePlan
from edge_sdk.models import ModelSpec

from .memory import MemoryCoefficients
from .planner import WIDTHS, PlannerSettings, memory_for, plan_device

SizingPolicy = Literal["planned", "uniform", "full", "full-all"]
SIZING_POLICIES: tuple[str, ...] = ("planned", "uniform", "full", "full-all")


@dataclass(frozen=True)
class DeviceAssignment:
    device_index: int
    profile: DeviceProfile
    plan: DevicePlan
    # Whether the device is given tasks at all: its plan fits, or (full-all) it is sent the
    # model regardless.
    selected: bool

    @property
    def out_of_memory(self) -> bool:
        """The model it is sent needs more memory than the device has: its training dies."""
        return _out_of_memory(self.plan)

    def to_dict(self) -> dict:
        return {"client": self.device_index, "device": self.profile.name,
                "memory_available_bytes": self.profile.memory_available_bytes,
                "downlink_bytes_per_s": self.profile.network.downlink_bytes_per_s,
                "uplink_bytes_per_s": self.profile.network.uplink_bytes_per_s,
                "selected": self.selected, "plan": self.plan.model_dump(mode="json")}


def plan_fleet(fleet: str, base: ModelSpec, model_name: str, settings: list[PlannerSettings],
               policy: SizingPolicy = "planned",
               profiles: list[DeviceProfile] | None = None) -> list[DeviceAssignment]:
    """`settings[i]`: device i's planner settings (its samples and transfer layout, from
    `rounds.device_settings`); `profiles`: the devices, instead of sampling them from `fleet`."""
    if profiles is None:
        profiles = sample_fleet(len(settings), parse_fleet_arg(fleet))
    elif len(profiles) != len(settings):
        raise ValueError(f"{len(profiles)} profiles for {len(settings)} devices")
    coefficients = MemoryCoefficients.load()

    def plan_all(overrides: dict) -> list[DevicePlan]:
        return [plan_device(profile, base, model_name, dataclasses.replace(own, **overrides),
                            coefficients)
                for profile, own in zip(profiles, settings)]

    fixed = {"adapt_transfer": False, "adapt_compute": False}
    if policy == "planned":
        plans = plan_all({})
    elif policy == "uniform":
        holdable = [p.width_ratio for p in plan_all({}) if p.fits]
        plans = plan_all({"widths": (min(holdable) if holdable else WIDTHS[-1],), **fixed})
    elif policy in ("full", "full-all"):
        plans = plan_all({"widths": (1.0,), **fixed})
    else:
        raise ValueError(f"unknown sizing policy {policy!r}; use one of {', '.join(SIZING_POLICIES)}")
    selected = {"planned": lambda plan: plan.fits, "uniform": lambda plan: not _out_of_memory(plan),
                "full": lambda plan: plan.fits, "full-all": lambda plan: True}[policy]
    return [DeviceAssignment(i, profile, plan, selected(plan))
            for i, (profile, plan) in enumerate(zip(profiles, plans))]


def _out_of_memory(plan: DevicePlan) -> bool:
    return any(r.startswith("memory:") for r in plan.reasons)


def plan_table(rows: list[dict]) -> str:
    """Each device's plan, one line each (the `clients` entries of a results JSON, or the same
    keys from the coordinator's registry): what it was given, and under the table why a device
    does not fit. Within 100 columns, so it reads the same in a terminal and in a file. The
    transfer columns are the bytes planned for the tensors the device is sent and sends back
    (FedP3 uploads only its selected layers), not their keep ratios alone."""
    lines = [f"{'device':<20} {'memory':>6} {'width':>5} {'batch':>5} {'samples':>7} "
             f"{'download':>12} {'upload':>12} {'peak/limit MB':>13}  fits"]
    notes = []
    for row in rows:
        plan = row["plan"]
        lines.append(
            f"{row['device'][:20]:<20} {row['memory_available_bytes'] / 1e6:>4.0f}MB "
            f"{plan['width_ratio']:>5g} {plan['physical_batch_size']:>5} {plan['local_samples']:>7} "
            f"{_transfer(plan['download_dtype'], plan['download_bytes']):>12} "
            f"{_transfer(plan['upload_dtype'], plan['upload_bytes']):>12} "
            f"{plan['predicted_peak_bytes'] / 1e6:>6.0f}/{plan['memory_limit_bytes'] / 1e6:<6.0f}  "
            + ("yes" if plan["fits"] else "no"))
        if not plan["fits"]:
            notes.append(textwrap.fill(f"{row['device']} does not fit: " + "; ".join(plan["reasons"]),
                                       width=100, initial_indent="  ", subsequent_indent="    "))
    return "\n".join(lines + notes)


def catalogue_table(base: ModelSpec, model_name: str, settings: PlannerSettings) -> str:
    """Every catalogue device class, what it has and what the planner gives it of `model_name`,
    and under the table why a class gets nothing. A line above says what the runtime alone takes,
    so a class too small for it (the 512 MB gateway) is seen as such before any plan is asked
    for: no model or flag changes it."""
    coefficients = MemoryCoefficients.load()
    runtime = memory_for(base, settings, coefficients).runtime_bytes(settings.dp)
    lines = [textwrap.fill(
        f"The runtime alone (Python, torch, Opacus) takes about {runtime / 1e6:.0f} MB on every "
        f"device, before any model: a class whose memory limit ({settings.safety_margin:g} of "
        f"what is available) is below it fits no model. Widths below are for {model_name}"
        f"{' under DP-SGD' if settings.dp else ''}.", width=100),
        f"{'class':<16} {'RAM':>7} {'available':>9} {'limit':>6} {'cores':>5} "
        f"{'samples/s':>9} {'up/down MB/s':>12} {'width':>5} {'peak MB':>7}  fits"]
    notes = []
    for name in catalogue_names():
        profile = catalogue_profile(name)
        plan = plan_device(profile, base, model_name, settings, coefficients)
        net = profile.network
        rate = profile.compute.dp_samples_per_s if settings.dp else profile.compute.samples_per_s
        lines.append(
            f"{name[:16]:<16} {profile.memory_total_bytes / 2**20:>4.0f}MiB "
            f"{profile.memory_available_bytes / 1e6:>7.0f}MB {plan.memory_limit_bytes / 1e6:>4.0f}MB "
            f"{profile.cpu_cores:>5} {rate:>9.0f} "
            f"{f'{net.uplink_bytes_per_s / 1e6:.2f}/{net.downlink_bytes_per_s / 1e6:.2f}':>12} "
            + (f"{plan.width_ratio:>5g} {plan.predicted_peak_bytes / 1e6:>7.0f}  yes" if plan.fits
               else f"{'-':>5} {'-':>7}  no"))
        if not plan.fits:
            notes.append(textwrap.fill(f"{name} does not fit: " + "; ".join(plan.reasons),
                                       width=100, initial_indent="  ", subsequent_indent="    "))
    return "\n".join(lines + notes)


def _transfer(dtype: str, size: int) -> str:
    return f"{dtype} {size / 1e6:.2f}MB"
