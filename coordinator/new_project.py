"""`fedprune new DIR`: a project that runs as written, for a user to change one file at a time.

The files are templates shipped with the package (`project_template/*.tmpl`), copied as they are
(only the project's name is filled in), so what a user starts from is what the tests run. A
folder with anything in it is refused: a project must never be written over a user's files by
accident; `--force` writes the template's files and leaves every other file alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

TEMPLATE = "project_template"
# The project's files, in the order the README introduces them.
FILES = ("README.md", "model.py", "data.py", "fedprune.toml", "edge.toml")
_NAME = "__PROJECT__"


class ProjectError(ValueError):
    """The project cannot be written (the folder holds files, a template is missing); the
    message says how to go on."""


@dataclass(frozen=True)
class NewProject:
    directory: Path
    written: tuple[Path, ...]


def template_text(name: str) -> str:
    try:
        return (files("coordinator") / TEMPLATE / f"{name}.tmpl").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProjectError(f"the template {TEMPLATE}/{name}.tmpl is missing from this fedprune "
                           "installation; reinstall fedprune") from None


def project_name(directory: Path) -> str:
    """A readable name for the README and the device id: the folder's, in id-safe characters."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", directory.resolve().name).strip("-.")
    return name or "project"


def new_project(directory: str | Path, force: bool = False) -> NewProject:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ProjectError(f"{directory} is a file, not a folder; give a new folder's name")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        present = sorted(p.name for p in directory.iterdir())
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise ProjectError(f"{directory} is not empty ({shown}); give a new folder, or --force "
                            f"to write {', '.join(FILES)} into it (other files are left alone)")
    texts = {file: template_text(file) for file in FILES}  # all or nothing
    directory.mkdir(parents=True, exist_ok=True)
    name = project_name(directory)
    written = []
    for file, text in texts.items():
        path = directory / file
        path.write_text(text.replace(_NAME, name), encoding="utf-8")
        written.append(path)
    return NewProject(directory, tuple(written))
