"""`fedprune new DIR`: the project it writes runs as written, and it never writes over a user's files.

The run is the README's: `fedprune simulate --config my-project/fedprune.toml` beside it, a fresh
process, with the project's model and data resolved from `model:build` and `data:load` (nothing
installed), and it learns: the final accuracy beats chance by a margin. The same files made a
package with docs/YOUR-MODEL.md's pyproject.toml, really installed, run by their entry points.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from coordinator.cli import main
from coordinator.new_project import FILES, new_project, template_text

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "YOUR-MODEL.md"


def fedprune(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """The `fedprune` a user types, a fresh process whose imports come from the checkout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_new_project_runs_as_written_and_learns(tmp_path):
    made = fedprune("new", "my-project", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    project = tmp_path / "my-project"
    assert sorted(p.name for p in project.iterdir()) == sorted(FILES)
    assert "cd my-project && fedprune simulate --config fedprune.toml" in made.stdout

    config = tomllib.loads((project / "fedprune.toml").read_text())
    # The README's command, from the folder `fedprune new` ran in: the config's own folder
    # resolves `model:build` and `data:load`, wherever the user stands.
    run = fedprune("simulate", "--config", "my-project/fedprune.toml", "--quiet", "--json-out",
                   "my-project/results.json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    result = json.loads((project / "results.json").read_text())
    assert len(result["rounds"]) == config["rounds"]
    final = result["final"]
    # Four shapes: chance is about a quarter; the template's small CNN gets far past it.
    assert final["global_accuracy"] > final["chance_accuracy"] + 0.3, final
    assert final["personalized_accuracy"] > final["chance_accuracy"] + 0.3, final


def guide_pyproject() -> str:
    """The pyproject.toml docs/YOUR-MODEL.md shows (its indented block from [build-system])."""
    lines = GUIDE.read_text().splitlines()
    start = lines.index("    [build-system]")
    block = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).strip() + "\n"


def test_the_guides_entry_points_install_and_run_by_name(tmp_path):
    """docs/YOUR-MODEL.md's package, installed for real (pip, into a venv that sees this
    machine's packages), runs from a config naming only the entry points, in a folder with no
    model.py or data.py beside it."""
    package = tmp_path / "src"
    new_project(package / "my_project")
    (package / "my_project" / "__init__.py").write_text("")
    (package / "pyproject.toml").write_text(guide_pyproject())
    venv = tmp_path / "venv"
    quiet = ["--quiet", "--disable-pip-version-check", "--no-index"]
    for args in ([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                 [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                  "--no-deps", "--no-build-isolation", *quiet, str(package)]):
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "fedprune.toml").write_text(
        'model = "my-cnn"\nstrategy = "fedavg"\nclients = 2\npartition = "iid"\nrounds = 1\n'
        '[train]\nlocal_epochs = 1\n[data]\nsource = "my-shapes"\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "coordinator.cli", "simulate",
                           "--config", "fedprune.toml", "--quiet", "--json-out", "results.json"],
                          cwd=run_dir, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "results.json").read_text())
    assert result["config"]["model"] == "my-cnn" and result["rounds"][0]["participants"] == 2
    assert result["config"]["data"]["source"] == "my-shapes"


@pytest.fixture
def project_modules(monkeypatch):
    """The project's `data` and `model` modules, imported in this process, are forgotten
    afterwards: another test's `data:load` or `model:build` must not find these."""
    from edge_sdk.data.sources import registry
    from edge_sdk.models import registry as models

    monkeypatch.setattr(registry, "_RESOLVED", dict(registry._RESOLVED))
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    yield
    sys.modules.pop("data", None)
    sys.modules.pop("model", None)


def test_the_edge_config_is_a_device_config_that_reads_the_projects_data(tmp_path, project_modules):
    from edge_sdk.agent.config import load_edge_config
    from edge_sdk.data.sources import device_data

    new_project(tmp_path / "p")
    settings = load_edge_config(tmp_path / "p" / "edge.toml")
    assert settings.device_id == "p-device-000" and settings.epsilon_budget == 8.0
    assert settings.models == ("model:build",)  # model.py beside it, imported from there
    assert sys.modules["model"].__file__ == str(tmp_path / "p" / "model.py")
    data = device_data(settings.data)  # what the agent trains on: data.py's train split
    assert data.contract.input_shape == (1, 16, 16)
    assert data.contract.classes == ("horizontal bar", "vertical bar", "cross", "square")
    assert len(data.data.train_y) + len(data.data.test_y) == 2500 and data.skipped == {}


def test_a_folder_with_files_is_refused_without_a_traceback(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["new", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not empty (notes.txt)" in err and "--force" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]

    (tmp_path / "file").write_text("x")
    assert main(["new", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_force_writes_the_project_and_leaves_other_files_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "model.py").write_text("# an old model")
    assert main(["new", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "model.py").read_text() == template_text("model.py")
    assert {p.name for p in tmp_path.iterdir()} == {*FILES, "notes.txt"}


def test_an_empty_folder_is_used_and_the_name_is_filled_in(tmp_path):
    folder = tmp_path / "Cats & Dogs"
    folder.mkdir()
    new_project(folder)
    readme = (folder / "README.md").read_text()
    assert readme.startswith("# Cats-Dogs\n") and "__PROJECT__" not in readme


@pytest.mark.parametrize("name", FILES)
def test_every_template_ships_in_the_package_data(name):
    """pyproject's package-data names the templates; tests/test_packaging.py checks the wheel
    holds every non-Python file of the packages, and the templates are `.tmpl` files for that."""
    path = ROOT / "coordinator" / "project_template" / f"{name}.tmpl"
    assert path.is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "project_template/*.tmpl" in package_data["coordinator"]
