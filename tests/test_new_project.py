"""`fedprune new DIR`: the project it writes runs as written, and it never writes over a user's files.

The run is the user's: `fedprune simulate --config fedprune.toml` in the new folder, as a fresh
process, with the project's model and data resolved from `model:build` and `data:load` (nothing
installed), and it learns: the final accuracy beats chance by a margin.
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
    run = fedprune("simulate", "--config", "fedprune.toml", "--quiet", "--json-out", "results.json",
                   cwd=project)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    result = json.loads((project / "results.json").read_text())
    assert len(result["rounds"]) == config["rounds"]
    final = result["final"]
    # Four shapes: chance is about a quarter; the template's small CNN gets far past it.
    assert final["global_accuracy"] > final["chance_accuracy"] + 0.3, final
    assert final["personalized_accuracy"] > final["chance_accuracy"] + 0.3, final


def test_the_edge_config_is_a_valid_device_config(tmp_path):
    from edge_sdk.agent.config import load_edge_config

    new_project(tmp_path / "p")
    settings = load_edge_config(tmp_path / "p" / "edge.toml")
    assert settings.device_id == "p-device-000"


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
