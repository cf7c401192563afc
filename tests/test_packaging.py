"""The installed package is the checkout: the wheel, installed into a fresh virtual environment
outside the checkout, plans and profiles devices exactly as the checkout does.

The wheel is built from a copy of the project's sources (so nothing is written into the
checkout, and no stale `build/` folder leaks into it), installed with `--no-deps` into a venv
that sees this machine's packages (`--system-site-packages`: torch and the rest come from there,
nothing is downloaded), and run from a folder with no `shared/` beside it and no FEDPRUNE_DATA.
The venv's imports are checked to resolve to the wheel, never to the checkout's editable install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

import pytest

from edge_sdk.data.locate import resolve_data_dir

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("coordinator", "edge_sdk", "export", "device_profiles")
PLAN = ["plan", "--catalogue", "rpi3b", "--model", "leaf_cnn"]
TRACES = "device_profiles/data/device-traces/flash_network_speed_distribution.csv"

# Every catalogue class, and the profile a freshly installed device loads by default (edge.toml's
# `profile = "catalogue:rpi4-4gb"`), as JSON.
PROFILES = """
import json, sys
from device_profiles import CATALOGUE, catalogue_profile
from edge_sdk.agent import EdgeSettings
from edge_sdk.agent.runner import load_profile_dict
from edge_sdk.agent.state import DeviceState

settings = EdgeSettings(device_id="fresh-device")
print(json.dumps({"catalogue": {name: catalogue_profile(name).model_dump(mode="json")
                                for name in CATALOGUE},
                  "device": load_profile_dict(settings, DeviceState(sys.argv[1]))}))
"""
WHERE = "import coordinator, device_profiles, edge_sdk, export; " \
        "print('\\n'.join(m.__file__ for m in (coordinator, device_profiles, edge_sdk, export)))"


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


class Installed(NamedTuple):
    python: Path  # the venv's interpreter
    bin: Path  # its console scripts
    site: Path  # its site-packages, where the wheel went
    work: Path  # the working directory: nothing beside it, no shared/ above it
    env: dict[str, str]  # no FEDPRUNE_DATA, no PYTHONPATH, no downloads
    data: Path  # the datasets (Fashion-MNIST only), for --data-dir
    wheel: Path


def _copy_sources(dest: Path) -> None:
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    """The wheel, built from the checkout's sources and installed in a fresh venv."""
    tmp = tmp_path_factory.mktemp("packaging")
    src, wheels, work = tmp / "src", tmp / "wheels", tmp / "nothing-beside" / "work"
    for folder in (src, wheels, work):
        folder.mkdir(parents=True)
    _copy_sources(src)
    constraints = ["-c", str(ROOT / "constraints.txt")]
    quiet = ["--quiet", "--disable-pip-version-check", "--no-index"]
    _ok(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", *quiet,
              *constraints, "-w", str(wheels), str(src)], tmp, dict(os.environ)))
    (wheel,) = wheels.glob("fedprune-*.whl")
    venv = tmp / "venv"
    # Without pip of its own (ensurepip alone takes seconds): this pip installs into it.
    _ok(_run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
             tmp, dict(os.environ)))
    python = venv / "bin" / "python"
    # --ignore-installed: the machine's editable fedprune must not count as already installed.
    _ok(_run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
              "--ignore-installed", *quiet, *constraints, str(wheel)], tmp, dict(os.environ)))
    # The datasets are found as before (--data-dir); the folder holds Fashion-MNIST only, so the
    # device tables cannot come from it.
    data = tmp / "datasets"
    data.mkdir()
    (data / "fashion-mnist").symlink_to(resolve_data_dir() / "fashion-mnist")
    env = {key: value for key, value in os.environ.items()
           if key not in ("FEDPRUNE_DATA", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(FEDPRUNE_DOWNLOAD="0", OMP_NUM_THREADS="1")
    site = _ok(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    work, env)).strip()
    return Installed(python, venv / "bin", Path(site), work, env, data, wheel)


def test_the_wheel_holds_every_file_of_the_packages(installed):
    """Every non-Python file in the packages (the dashboard, the memory calibration, the device
    tables and their sources) is in the wheel: nothing the code reads stays behind."""
    shipped = set(zipfile.ZipFile(installed.wheel).namelist())
    data_files = {path.relative_to(ROOT).as_posix() for package in PACKAGES
                  for path in (ROOT / package).rglob("*")
                  if path.is_file() and path.suffix not in (".py", ".pyc")
                  and "__pycache__" not in path.parts}
    assert {"coordinator/planning/memory_calibration.json", TRACES,
            "coordinator/service/dashboard/index.html"} <= data_files
    assert data_files - shipped == set()


def test_the_installed_package_plans_and_profiles_as_the_checkout(installed):
    python, bin_dir, site, work, env, data, _ = installed
    assert not any((folder / "shared").exists() for folder in work.parents)
    where = _ok(_run([str(python), "-c", WHERE], work, env)).split()
    assert all(Path(path).is_relative_to(site) for path in where), (where, site)
    checkout = [sys.executable, "-m", "coordinator.cli"]
    checkout_env = {**env, "PYTHONPATH": str(ROOT)}
    where = _ok(_run([sys.executable, "-c", WHERE], work, checkout_env)).split()
    assert all(Path(path).is_relative_to(ROOT) for path in where), (where, ROOT)

    # The README's command as it is, its plan also saved as JSON (--out) to compare every field.
    plan = [*PLAN, "--data-dir", str(data)]
    from_wheel = _ok(_run([str(bin_dir / "fedprune"), *plan, "--out", "wheel.json"], work, env))
    from_checkout = _ok(_run([*checkout, *plan, "--out", "checkout.json"], work, checkout_env))
    # A wheel without the memory calibration planned a Pi 3B's batch at 12 instead of 48.
    assert from_wheel == from_checkout and from_wheel.startswith("rpi3b: ")
    saved = [json.loads((work / name).read_text()) for name in ("wheel.json", "checkout.json")]
    assert saved[0] == saved[1]

    profiles = [_ok(_run([python_, "-c", PROFILES, str(work / f"state-{n}")], work, environment))
                for n, (python_, environment) in enumerate(((str(python), env),
                                                             (sys.executable, checkout_env)))]
    assert json.loads(profiles[0]) == json.loads(profiles[1])
    assert json.loads(profiles[0])["device"]["name"] == "rpi4-4gb"


def test_a_missing_device_table_is_an_error_that_says_what_to_do(installed):
    table = installed.site / TRACES
    kept = table.read_bytes()
    table.unlink()
    try:
        proc = _run([str(installed.bin / "fedprune"), "plan", "--catalogue", "phone-mid", "--model",
                     "leaf_cnn", "--data-dir", str(installed.data)], installed.work, installed.env)
    finally:
        table.write_bytes(kept)
    assert proc.returncode == 2
    assert "flash_network_speed_distribution.csv" in proc.stderr and "reinstall fedprune" in proc.stderr
    assert "Traceback" not in proc.stderr
