"""Any model, any data, end to end (issue 23's done-means): a user's MobileNetV2, defined in this
file, trained on image folders this file writes, by a coordinator service and `fedprune-edge run`
processes over a real Mosquitto.

How every side gets the model, as a user's project would have it: the coordinator's folder and
each device's folder hold the user's model module, `any_model_e2e_net.py`, beside the config that
names it, `any_model_e2e_net:build` (coordinator.toml's `model`, edge.toml's `models`), which
each process resolves from its config's folder first. Here that module is one line importing
`build` from this file, so the network is the one defined below, and the device processes find
this file through PYTHONPATH (tests/), as they would an installed package. One device's module
imports `build_wider` instead: the same name, another version of the user's code.

The round: three devices on their own images (each its own folder, its own samples) with
catalogue profiles of three sizes (an rpi4-4gb, an rpi4-2gb, an rpi3b), and the device whose
build differs. The planner gives the rpi3b width 0.75 and the rpi4s the full width, from the
model's own memory calibration: six fresh rehearsals, minutes on a shared 2-core machine,
measured once per structure and kept in a cache. This file carries that record (`MEASURED`,
measured by `coordinator.planning.model_memory.measure` on the machine it names; `python
tests/test_any_model_e2e.py` measures it again) and the coordinator finds it in its cache
($FEDPRUNE_MEMORY_CACHE) instead of measuring before it can plan the first device.
"""

from __future__ import annotations

import json
import re
import os
import signal
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from edge_sdk.checkpoint import load_checkpoint
from edge_sdk.models import ModelSpec, allow_reference, model_spec, tensor_shapes
from edge_sdk.models.registry import _REGISTRY
from edge_sdk.protocol import RefusalHeader, TaskHeader, decode_envelope, parse_header
from edge_sdk.runtime import load_manifest
from edge_sdk.slicing import width_spec
from harness.brokers import recording_subscriber
from harness.devices import edge_agent_process
from harness.models import InvertedResidual, conv_bn  # MobileNetV2's blocks
from harness.processes import Process, stop_processes
from harness.waiting import wait_until

TESTS = Path(__file__).resolve().parent
FLEET = "anymodel"
MODULE = "any_model_e2e_net"        # the user's model module, beside each config
REFERENCE = f"{MODULE}:build"
SHAPE = (3, 16, 16)
DIGITS = {0: "zero", 1: "one", 2: "two", 3: "three"}   # digit -> class folder
CLASSES = ("one", "three", "two", "zero")               # an image folder's: sorted folder names
# device -> (catalogue profile, the function its model module builds, digits of each class)
DEVICES = {"any-0": ("rpi4-4gb", "build", slice(0, 10)),
           "any-1": ("rpi3b", "build", slice(10, 20)),
           "any-2": ("rpi4-2gb", "build", slice(20, 30))}
ODD = "any-odd"
ALL_DEVICES = {**DEVICES, ODD: ("rpi4-4gb", "build_wider", slice(30, 40))}
# The planner's, on MEASURED and the shipped calibration (plain SGD, batches of 32): the rpi3b's
# limit is 731 MB, width 0.875 would need 737 MB, width 0.75 706 MB.
WIDTHS = {"any-0": 1.0, "any-1": 0.75, "any-2": 1.0}


# ----------------------------------------------------------------------------- the user's model
# Written as any PyTorch user writes a MobileNetV2 (Sandler et al., 2018), nothing of fedprune's in
# it: inverted residual blocks (1x1 expansion, 3x3 depthwise, 1x1 linear projection), BatchNorm
# after every convolution, in-place ReLU6, residual adds. Every block keeps the 16x16 resolution,
# so its activations (what training memory grows with) are large for its 45k parameters: an
# rpi3b cannot train it at full width on batches of 32, an rpi4 can.


class MobileNetV2(nn.Module):
    # (expansion, output channels, blocks, stride)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 2, 1))

    def __init__(self, in_channels: int, num_classes: int, stem: int = 32, last: int = 128) -> None:
        super().__init__()
        cin = stem
        blocks: list[nn.Module] = [conv_bn(in_channels, cin, 3)]
        for expand, cout, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        blocks.append(conv_bn(cin, last, 1))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """fedprune's model contract: (channels, height, width) and the class count."""
    return MobileNetV2(input_shape[0], num_classes)


def build_wider(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The same network with one more stem channel: another version of the user's code."""
    return MobileNetV2(input_shape[0], num_classes, stem=33)


# The model's memory, measured by coordinator.planning.model_memory.measure (see the docstring).
MEASURED = {
    "format": 1, "digest": "c99956c30a97f5cc", "model": REFERENCE, "input_shape": list(SHAPE),
    "num_classes": 4, "machine": "AMD EPYC, 2 cores, x86_64, Linux 6.18.44-fc-v1272",
    "date": "2026-12-04", "threads": 2, "rehearsals": [
        {"width": 1.0, "physical_batch": 48, "dp": True, "floor_bytes": 243040256, "peak_bytes": 908505088},
        {"width": 1.0, "physical_batch": 8, "dp": True, "floor_bytes": 243159040, "peak_bytes": 527495168},
        {"width": 0.25, "physical_batch": 48, "dp": True, "floor_bytes": 243195904, "peak_bytes": 538173440},
        {"width": 0.25, "physical_batch": 8, "dp": True, "floor_bytes": 243097600, "peak_bytes": 447438848},
        {"width": 1.0, "physical_batch": 48, "dp": False, "floor_bytes": 243138560, "peak_bytes": 699326464},
        {"width": 0.25, "physical_batch": 8, "dp": False, "floor_bytes": 242954240, "peak_bytes": 432521216}]}


# ----------------------------------------------------------------------------- the user's files
def digit_folder(root: Path, which: slice) -> Path:
    """The digits `which` of each class (by order of appearance), scaled up to 16x16 RGB PNGs,
    one folder per class: pictures a camera sorted by class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label, name in DIGITS.items():
        (root / name).mkdir(parents=True)
        for i in np.flatnonzero(digits.target == label)[which]:
            grey = Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8), "L")
            grey.resize(SHAPE[:0:-1], Image.Resampling.BILINEAR).convert("RGB").save(
                root / name / f"{i:04d}.png")
    return root


def model_module(folder: Path, function: str) -> None:
    (folder / f"{MODULE}.py").write_text(f"from test_any_model_e2e import {function} as build\n")


def device_folder(root: Path, device: str, broker_url: str) -> Path:
    """The device's own folder: its images, its model module and its edge.toml."""
    profile, function, digits = ALL_DEVICES[device]
    folder = root / device
    digit_folder(folder / "images", digits)
    model_module(folder, function)
    (folder / "edge.toml").write_text(textwrap.dedent(f"""\
        device_id = "{device}"
        broker = "{broker_url}"
        fleet = "{FLEET}"
        state_dir = "{folder / 'state'}"
        profile = "catalogue:{profile}"
        models = ["{REFERENCE}"]

        [data]
        source = "imagefolder"
        path = "images"
        input_shape = {list(SHAPE)}
        """))
    return folder / "edge.toml"


def coordinator_folder(root: Path, broker_url: str) -> Path:
    """The coordinator's folder: its held-out images, the model module and coordinator.toml."""
    folder = root / "coordinator"
    digit_folder(folder / "images", slice(100, 125))
    model_module(folder, "build")
    (folder / "coordinator.toml").write_text(textwrap.dedent(f"""\
        model = "{REFERENCE}"
        strategy = "heterofl"
        state_dir = "{folder / 'state'}"
        http_port = 0
        exit_when_done = true
        [broker]
        url = "{broker_url}"
        fleet = "{FLEET}"
        client_id = "coordinator-{FLEET}"
        [rounds]
        total = 1
        devices_per_round = {len(ALL_DEVICES)}
        min_devices = {len(ALL_DEVICES)}
        registration_grace_seconds = 0
        deadline_seconds = 300
        [train]
        lr = 0.05
        batch_size = 32
        [export]
        formats = ["onnx"]
        verify_samples = 16
        [data]
        source = "imagefolder"
        path = "images"
        input_shape = {list(SHAPE)}
        """))
    return folder / "coordinator.toml"


# ------------------------------------------------------------------------ what crossed the wire
def headers(lines: list[str], kind: str) -> dict:
    """The last header of each device's messages of `kind` the subscriber recorded."""
    seen = {}
    for line in lines:
        topic, _, data = line.partition(" ")
        if topic.split("/")[2] == kind:
            seen[topic.split("/")[3]] = parse_header(decode_envelope(bytes.fromhex(data)))
    return seen


# ----------------------------------------------------------------------------- the round
@dataclass
class Round:
    status: dict
    devices: list  # the service's device views (GET /devices), each with its stored plan
    spec: ModelSpec                     # the coordinator's full model
    reasons: dict[str, str]             # device -> why its task was refused (the coordinator's)
    tasks: dict[str, TaskHeader]        # device -> the TASK it was sent, as the broker carried it
    refusals: dict[str, RefusalHeader]  # device -> its REFUSAL, as the broker carried it
    states: dict[str, Path]      # device -> its state_dir
    still_running: list[str]     # agents running when the round was over
    logs: dict[str, str]


def settled(state: Path, expected: str) -> bool:
    """Read only (the device still runs): every task of the device is `expected`, and a device
    that trained holds an exported model."""
    tasks = state / "tasks.json"
    return tasks.exists() and set(json.loads(tasks.read_text()).values()) == {expected} and \
        (expected == "refused" or (state / "artifact" / "manifest.json").exists())


def run_round(root: Path, broker) -> Round:
    # Imported here, not above: every device process imports this file for its model, and a
    # device has no coordinator installed.
    from coordinator.config import load_config
    from coordinator.service import CoordinatorService, ServiceSettings

    cache = root / "memory-cache"
    cache.mkdir()
    (cache / f"{MEASURED['digest']}.json").write_text(json.dumps(MEASURED))
    configs = {device: device_folder(root, device, broker.url) for device in ALL_DEVICES}
    states = {device: path.parent / "state" for device, path in configs.items()}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FEDPRUNE_MEMORY_CACHE", str(cache))
        env.setenv("PYTHONPATH", str(TESTS), prepend=os.pathsep)
        sub, reader, lines = recording_subscriber(broker.port, FLEET, ["task/+", "refusal/+"], "%t %x")
        # The devices start first (registrations are retained): their start-up overlaps the
        # coordinator's.
        agents: list[Process] = [edge_agent_process(path, path.with_suffix(".log"), device).start()
                                 for device, path in configs.items()]
        service = None
        try:
            service = CoordinatorService(load_config(coordinator_folder(root, broker.url),
                                                     schema=ServiceSettings))
            assert service.engine.spec.structure == MEASURED["digest"], (
                f"the model's structure is now {service.engine.spec.structure}, MEASURED is of "
                f"{MEASURED['digest']}: measure it again with `python tests/test_any_model_e2e.py` "
                "and paste its output")
            service_thread = threading.Thread(target=service.run, daemon=True)
            service_thread.start()
            wait_until(lambda: not service_thread.is_alive(), 240, "the round to be committed",
                       watch=agents)
            wait_until(lambda: all(settled(states[d], "acked" if d in DEVICES else "refused")
                                   for d in ALL_DEVICES), 30,
                       "the ACKs and exported models to reach the devices", watch=agents)
            running = [a.name for a in agents if a.exited() is None]
        finally:  # devices and the subscriber never outlive the test, even when it fails
            if service is not None:
                service.stopping.set()
            stop_processes(agents)
            sub.send_signal(signal.SIGINT)  # a clean exit flushes its output
            sub.wait(timeout=10)
            reader.join(10)
    store = service.engine.store
    from coordinator.service.http_api import device_views

    return Round(status=service.engine.status(), spec=service.engine.spec,
                 devices=device_views(store),
                 reasons={d: store.task(1, d).reason for d in ALL_DEVICES if store.task(1, d)},
                 tasks=headers(lines, "task"), refusals=headers(lines, "refusal"), states=states,
                 still_running=running,
                 logs={d: p.with_suffix(".log").read_text(errors="replace")
                       for d, p in configs.items()})


@pytest.fixture(scope="module")
def fleet_round(broker, tmp_path_factory):
    try:
        yield run_round(tmp_path_factory.mktemp("any-model"), broker)
    finally:  # another test's module of this name must not find the coordinator's
        _REGISTRY.pop(REFERENCE, None)
        sys.modules.pop(MODULE, None)


def test_three_devices_train_the_users_model_at_their_widths_on_their_own_images(fleet_round):
    status = fleet_round.status
    [committed] = [r for r in status["rounds"] if r["state"] == "committed"]
    answers = (committed["accepted"], committed["refused"], committed["missing"])
    assert answers == (3, 1, 0), committed
    assert status["messages"] == {"refused": 0, "failed": 0}
    planned = {d["id"]: d["width_ratio"] for d in status["devices"]}
    assert {d: planned[d] for d in DEVICES} == WIDTHS
    # The service's plan records say what DP-SGD changed in the user's network, as `plan` does.
    for view in fleet_round.devices:
        assert re.search(r"\d+ BatchNorm2d replaced by \d+ GroupNorm", view.plan.decisions["model"])
    for device, width in WIDTHS.items():
        sent = width_spec(fleet_round.spec, width)
        task = fleet_round.tasks[device]     # what the broker carried to the device
        assert task.width_ratio == width and task.plan["spec"] == sent.to_dict()
        state = fleet_round.states[device]
        assert json.loads((state / "tasks.json").read_text()) == {f"r000001-{task.task}": "acked"}
        trained = load_checkpoint(state / "model.pt")    # what the device trained and kept
        assert (trained.model, trained.width_ratio, trained.spec) == (REFERENCE, width, sent)
        assert {n: tuple(t.shape) for n, t in trained.state.items()} == tensor_shapes(sent)
        assert trained.state["features.0.0.weight"].shape[0] == round(32 * width)  # its stem
        assert f"task at width {width:g}" in fleet_round.logs[device]

        manifest = load_manifest(state / "artifact")      # the exported model it was sent
        assert manifest.model == REFERENCE and manifest.width_ratio == width
        assert manifest.input_shape == SHAPE and manifest.labels == CLASSES


def test_a_device_whose_build_differs_refuses_the_task_naming_both_digests(fleet_round):
    theirs = f"{Path(__file__).stem}:build_wider"
    try:
        local = model_spec(allow_reference(theirs), SHAPE, len(CLASSES)).structure
    finally:
        _REGISTRY.pop(theirs, None)
    coordinator = fleet_round.spec.structure
    assert local != coordinator
    refusal = fleet_round.refusals[ODD]   # as the broker carried it
    assert refusal.code.value == "bad_task" and refusal.task == fleet_round.tasks[ODD].task
    assert f"model '{REFERENCE}' builds differently here (structure {local}" in refusal.message
    assert f"than on the coordinator (structure {coordinator})" in refusal.message
    assert fleet_round.reasons[ODD] == f"bad_task: {refusal.message}"
    assert set(fleet_round.refusals) == {ODD}
    state = fleet_round.states[ODD]
    assert json.loads((state / "tasks.json").read_text()) == {f"r000001-{refusal.task}": "refused"}
    assert not (state / "model.pt").exists()           # it trained nothing
    assert ODD in fleet_round.still_running and "Traceback" not in fleet_round.logs[ODD]
    assert sorted(fleet_round.still_running) == sorted(ALL_DEVICES)


def test_the_plan_says_what_opacus_changed_in_the_users_network(tmp_path, capsys, monkeypatch):
    """BatchNorm in the user's code becomes GroupNorm for DP-SGD; `fedprune plan` says so."""
    from coordinator.cli import main

    cache = tmp_path / "memory-cache"
    cache.mkdir()
    (cache / f"{MEASURED['digest']}.json").write_text(json.dumps(MEASURED))
    monkeypatch.setenv("FEDPRUNE_MEMORY_CACHE", str(cache))
    here = f"{Path(__file__).stem}:build"  # this file's own function: the same structure
    allow_reference(here)
    assert main(["plan", "--catalogue", "rpi3b", "--model", here, "--input-shape",
                 ",".join(map(str, SHAPE)), "--classes", str(len(CLASSES))]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  model: ")]
    assert len(said) == 1 and re.search(r"\d+ BatchNorm2d replaced by \d+ GroupNorm", said[0]), said


if __name__ == "__main__":  # measure MEASURED again (minutes): python tests/test_any_model_e2e.py
    from coordinator.planning.model_memory import measure

    spec = model_spec(allow_reference(f"{Path(__file__).stem}:build"), SHAPE, len(CLASSES))
    record = measure(spec, spec.structure).model_dump(mode="json")
    print(json.dumps({**record, "model": REFERENCE}))
