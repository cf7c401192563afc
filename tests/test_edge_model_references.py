"""A device's `models` key (edge.toml): the package.module:function models it may build.

Each one is imported when the config is read, from the config's folder first, so a typo, a missing
module or a name that is not a function stops `fedprune-edge run` with the reference named. A TASK
naming a model the device has neither built in, nor installed as an entry point, nor listed is
refused with the model and the key to set, and the name on the wire is never imported. Over a real
broker, with a user's MobileNet and a device whose build differs: tests/test_any_model_e2e.py.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from edge_sdk.agent import load_edge_config
from edge_sdk.cli import main as edge_main
from edge_sdk.models import build_model, model_names, model_spec
from edge_sdk.models.registry import _REGISTRY
from edge_sdk.protocol import decode_envelope
from harness.device_tasks import first_task, restart_agent, send_task, task_variant
from harness.devices import DEVICE, refusals_in
from harness.fleet import Harness

MODULE = "fp_edge_model"        # names of this file's own: the registry is one per process
UNLISTED = "fp_edge_unlisted"

MODEL = """
from torch import nn

def build(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(4, num_classes))

not_a_function = 3
"""
BROKEN = "import fp_edge_not_installed\n"  # a module that is there, whose own import fails


@pytest.fixture
def forget_models():
    """What a test registered or imported is gone afterwards: another test's reference of the
    same name must not find it."""
    yield
    for name in [n for n in _REGISTRY if n.split(":")[0] in (MODULE, UNLISTED)]:
        _REGISTRY.pop(name)
    for module in (MODULE, f"{MODULE}_broken", UNLISTED):
        sys.modules.pop(module, None)


def device_folder(root: Path, models: list[str]) -> Path:
    """A device's folder: MODULE.py and an edge.toml listing `models`; the edge.toml's path."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{MODULE}.py").write_text(MODEL)
    (root / f"{MODULE}_broken.py").write_text(BROKEN)
    listed = ", ".join(f'"{m}"' for m in models)
    path = root / "edge.toml"
    path.write_text(f'device_id = "dev-0"\nstate_dir = "state"\nmodels = [{listed}]\n')
    return path


def test_a_listed_model_is_imported_from_the_configs_folder(tmp_path, forget_models, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the config's folder: that one is searched all the same
    config = load_edge_config(device_folder(tmp_path / "device", [f"{MODULE}:build"]))
    assert config.models == (f"{MODULE}:build",)
    assert f"{MODULE}:build" in model_names()
    assert sys.modules[MODULE].__file__ == str(tmp_path / "device" / f"{MODULE}.py")
    assert str(tmp_path / "device") not in sys.path  # searched while importing, not left behind
    model = build_model(model_spec(f"{MODULE}:build", (4,), 3))
    assert model(torch.zeros(2, 4)).shape == (2, 3)
    saved = config.save(tmp_path / "device" / "saved.toml")  # as the test harness writes configs
    assert load_edge_config(saved).models == config.models


@pytest.mark.parametrize("reference, says", [
    (f"{MODULE}:biuld", rf"model '{MODULE}:biuld': .*device/{MODULE}\.py has no 'biuld'; name the "
                        "function that builds the model"),
    ("fp_edge_missing:build", r"model 'fp_edge_missing:build' cannot be loaded \(No module named "
                              r"'fp_edge_missing'\); put fp_edge_missing\.py next to the config file"),
    (f"{MODULE}:not_a_function", rf"model '{MODULE}:not_a_function' is not a function"),
    (f"{MODULE}_broken:build", rf"model '{MODULE}_broken:build': importing {MODULE}_broken failed: "
                               r"ModuleNotFoundError: No module named 'fp_edge_not_installed'"),
    ("mlp", r"'mlp' is not a package\.module:function reference; a built-in model or an installed "
            r"fedprune\.models entry point needs no entry in models"),
])
def test_a_model_that_cannot_be_loaded_stops_the_device_naming_it(tmp_path, forget_models, capsys,
                                                                    reference, says):
    path = device_folder(tmp_path / "device", [reference])
    assert edge_main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedprune-edge run: error: {path}: models: "), err
    assert re.search(says, err), err
    assert "Traceback" not in err and not (tmp_path / "device" / "state").exists()


def test_a_child_process_builds_a_reference_from_its_configs_folder(tmp_path, forget_models):
    """A memory rehearsal (`python -m edge_sdk.rehearsal`, what planning a user's model starts)
    imports the model from the config's folder, which is on the parent's path only while the
    parent imports it."""
    from coordinator.planning.model_memory import rehearse

    load_edge_config(device_folder(tmp_path / "device", [f"{MODULE}:build"]))
    assert str(tmp_path / "device") not in sys.path
    measured = rehearse(model_spec(f"{MODULE}:build", (4,), 3), 1.0, 8, dp=False, steps=1)
    assert measured.peak_bytes > measured.floor_bytes > 0


SIDE_EFFECT = """
from pathlib import Path
Path({marker!r}).write_text("imported")

def build(input_shape, num_classes):
    raise AssertionError("never built")
"""


def only_refusal(h: Harness):
    refusals = refusals_in(h.take(h.to_coordinator, "refusal", DEVICE))
    assert len(refusals) == 1, refusals
    return refusals[0]


# (model the task names, the device's models, what the refusal says)
LACKING = [
    (f"{UNLISTED}:build", (),
     [f"this device has no model '{UNLISTED}:build' (edge.toml lists no models): add it to models "
      f'in edge.toml, e.g. models = ["{UNLISTED}:build"]']),
    (f"{UNLISTED}:build", (f"{MODULE}:build",),
     [f"this device has no model '{UNLISTED}:build' (edge.toml's models lists {MODULE}:build)",
      f'models = ["{MODULE}:build", "{UNLISTED}:build"]']),
    ("my-cnn", (),
     ["this device has no model 'my-cnn': it is neither built in nor a fedprune.models entry point "
      "installed here (edge.toml lists no models); install the package that provides it, or list "
      "its package.module:function in edge.toml's models"]),
]


def test_a_task_naming_a_model_the_device_lacks_is_refused_naming_the_model_and_the_key(
        tmp_path, sqlite_url, forget_models, monkeypatch):
    marker = tmp_path / "imported.txt"
    (tmp_path / f"{UNLISTED}.py").write_text(SIDE_EFFECT.format(marker=str(marker)))
    device_folder(tmp_path, [])  # MODULE.py, importable once on the path
    monkeypatch.syspath_prepend(str(tmp_path))
    h = Harness(tmp_path, sqlite_url, devices=1)
    genuine = first_task(h)
    plan = decode_envelope(genuine).header["plan"]
    for n, (name, listed, says) in enumerate(LACKING):
        agent = restart_agent(h, models=listed)
        send_task(h, task_variant(genuine, task=f"other-{n}",
                                  plan={**plan, "spec": {**plan["spec"], "name": name}}))
        refusal = only_refusal(h)
        assert refusal.code.value == "bad_task" and refusal.task == f"other-{n}"
        for text in says:
            assert text in refusal.message, refusal.message
    assert not marker.exists() and UNLISTED not in sys.modules  # a name on the wire: never imported
    assert agent.state.tasks() == {f"r000001-other-{n}": "refused" for n in range(len(LACKING))}
    assert not (agent.state.root / "model.pt").exists()

    send_task(h, genuine)  # the device goes on: the coordinator's own task trains
    assert len(h.take(h.to_coordinator, "update", DEVICE)) == 1
    assert agent.state.tasks()[f"r000001-{decode_envelope(genuine).header['task']}"] == "sent"
