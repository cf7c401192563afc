"""`package.module:function` references from a process's own configuration: a user's model
(`edge_sdk/models/registry.py`) or data source (`edge_sdk/data/sources/registry.py`).

One importer for both, so they resolve the same way and say the same things when they fail: the
config file's folder goes first on the import path while the module is imported (a project's
`model.py` or `data.py` beside its config resolves as `model:build` without being installed),
and every folder a reference came from is remembered. A child process or a Ray worker that
builds the same models or reads the same data needs those folders on its own import path
(`reference_folders`): the folder is on this process's only while a reference is imported.
A reference never comes from the wire; only configuration files name one.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_FOLDERS: list[str] = []


class ReferenceImportError(ValueError):
    """A reference that cannot be imported; each registry re-raises it as its own error."""


def import_reference(reference: str, config_dir: str | Path | None, what: str,
                     does: str = "to call") -> object:
    """The callable `reference` names, imported with `config_dir` first on the import path.
    `what` ("model", "data source") leads each message; `does` says what the function is for."""
    module_name, attribute = reference.split(":")
    folder = str(Path(config_dir).resolve()) if config_dir is not None else None
    added = folder is not None and folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if not f"{module_name}.".startswith(f"{exc.name}."):  # it is there; an import in it failed
            raise ReferenceImportError(f"{what} {reference!r}: importing {module_name} failed: "
                                       f"{type(exc).__name__}: {exc}") from None
        raise ReferenceImportError(
            f"{what} {reference!r} cannot be loaded ({exc}); put {module_name}.py next to the "
            "config file or install the package that defines it") from None
    except Exception as exc:  # the user's module failed while importing
        raise ReferenceImportError(f"{what} {reference!r}: importing {module_name} failed: "
                                   f"{type(exc).__name__}: {exc}") from None
    finally:
        if added:
            sys.path.remove(folder)
    target = getattr(module, attribute, None)
    if target is None:
        where = getattr(module, "__file__", None) or module_name
        raise ReferenceImportError(f"{what} {reference!r}: {where} has no {attribute!r}; name the "
                                   f"function {does}")
    if not callable(target):
        raise ReferenceImportError(f"{what} {reference!r} is not a function")
    if folder is not None and folder not in _FOLDERS:
        _FOLDERS.append(folder)
    return target


def reference_folders() -> tuple[str, ...]:
    """The config folders this process's references were imported from."""
    return tuple(_FOLDERS)
