"""The model registry: a model is a name for a function `(input_shape, num_classes) -> nn.Module`.

Three kinds of names resolve, and nothing else does:
- the built-in networks (`zoo.py`, registered with `@register_model`);
- entry points in the group `fedprune.models` of any installed package (a user's model is one
  line in their own `pyproject.toml`: `[project.entry-points."fedprune.models"] mynet =
  "mypkg.models:build"`, and zero files in fedprune);
- a `package.module:function` reference that this process's own configuration names
  (`allow_reference`, called by the coordinator's and the device's config loaders).
A name that arrives in a message is only looked up, never imported: a TASK naming
`os:system` finds nothing unless the device's own config listed it. Both sides must have the
same code installed; the structural digest (`structure.py`) is what proves they do.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from torch import nn

from ..references import REFERENCE, ReferenceImportError, import_reference
from .spec import SpecError

ModelFactory = Callable[[tuple[int, ...], int], nn.Module]
ENTRY_POINT_GROUP = "fedprune.models"

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator for a built-in (or a test's) model factory."""

    def register(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return register


def allow_reference(reference: str, config_dir: str | Path | None = None) -> str:
    """Register `package.module:function` from this process's own configuration.

    Imports it now, so a typo is a configuration error naming the reference, not a failed round;
    with the config file's folder first on the import path (as `[data]` references are), so a
    project's own model.py beside its config resolves as `model:build` without being installed.
    """
    if reference in _REGISTRY:
        return reference
    if not REFERENCE.match(reference):
        raise SpecError(f"model {reference!r} is neither a registered model ({', '.join(model_names())}) "
                        "nor a package.module:function reference")
    try:
        factory = import_reference(reference, config_dir, "model", "that builds the model")
    except ReferenceImportError as exc:
        raise SpecError(str(exc)) from None
    _REGISTRY[reference] = factory
    return reference


def _entry_points() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def model_names() -> tuple[str, ...]:
    """Every name that resolves here: built-ins, installed entry points, allowed references."""
    from . import zoo  # noqa: F401  (registers the built-ins)

    return tuple(dict.fromkeys([*_REGISTRY, *_entry_points()]))


def model_factory(name: str) -> ModelFactory:
    from . import zoo  # noqa: F401  (registers the built-ins)

    if name in _REGISTRY:
        return _REGISTRY[name]
    ep = _entry_points().get(name)
    if ep is not None:
        try:
            factory = ep.load()  # type: ignore[attr-defined]
        except Exception as exc:  # a broken plug-in is a clear error, not a crash
            raise SpecError(f"model {name!r} (entry point {ep.value}) fails to load: "  # type: ignore[attr-defined]
                            f"{type(exc).__name__}: {exc}") from None
        _REGISTRY[name] = factory
        return factory
    raise SpecError(f"unknown model {name!r}; this machine has {', '.join(model_names())} "
                    f"(a user model is an entry point in the {ENTRY_POINT_GROUP!r} group, or a "
                    "package.module:function named in this machine's own config)")
