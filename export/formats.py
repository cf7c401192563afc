"""Export formats: each registers its converter here, under the name its edge runtime has.

A format is a module `export/<anything>_export.py` with one converter decorated
`@register_exporter("name", ...)`: `convert(model, example, metadata) -> bytes`, the fp32 artifact
of `model`, given `example`, a batch of real inputs of the size the exporter traces with (`batch`,
1 when dynamic), and `metadata` to embed where the format can carry it (None when the caller does
not want it). Its other precisions ("fp16", "int8") come from `variant(fp32_artifact, precision)`,
given to the decorator: tracing a model is the slow step of every toolchain here, so a bundle of
three precisions traces once, not three times. The registry imports every
such module of this package when it is imported, so adding a format is that one file here
and its runtime in `edge_sdk/runtime/backends.py` (registered under the same name: every artifact
is verified in it before it is published, so a converter without a runtime is refused).

Exporter modules keep their heavy imports (torch, converters) inside their functions: the registry
is read by config validation and the CLI's choices, which must not load torch.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator

from edge_sdk.runtime.backends import runtime_formats

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "fp16", "int8")
MODULE_SUFFIX = "_export"  # export/<name>_export.py modules are exporters, imported below


class ExportError(ValueError):
    """The model could not be exported, or an export disagrees with torch and was not published."""


Converter = Callable[["torch.nn.Module", "torch.Tensor", "dict[str, str] | None"], bytes]
Variant = Callable[[bytes, str], bytes]   # (the fp32 artifact, precision) -> that precision's


@dataclass(frozen=True)
class Exporter:
    name: str
    convert: Converter
    precisions: tuple[str, ...]
    batch: int | None           # the fixed batch the artifact is traced with; None: dynamic
    opset: int | None           # recorded in the manifest entry (ONNX)
    packages: tuple[str, ...]   # distributions whose versions the manifest records
    variant: Variant | None     # the fp32 artifact at another precision; None: fp32 only

    def artifact(self, fp32: bytes, precision: str) -> bytes:
        """The artifact at `precision`, from the fp32 one `convert` made."""
        self.check_precision(precision)
        return fp32 if precision == "fp32" else self.variant(fp32, precision)

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            raise ExportError(f"{self.name} has no {precision} variant; it exports "
                              f"{', '.join(self.precisions)}")


_EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str, *, precisions: tuple[str, ...] = ("fp32",), batch: int | None = None,
                      opset: int | None = None, packages: tuple[str, ...] = (),
                      variant: Variant | None = None) -> Callable[[Converter], Converter]:
    """Register `convert` as the exporter of format `name`, whose runtime must be registered;
    `variant` makes its precisions other than fp32."""
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or "fp32" not in precisions:
        raise ValueError(f"exporter {name!r}: precisions {list(precisions)} must be fp32 and any "
                         f"of {', '.join(PRECISIONS[1:])}")
    if variant is None and len(precisions) > 1:
        raise ValueError(f"exporter {name!r}: precisions other than fp32 need a variant function")
    if batch is not None and batch < 1:
        raise ValueError(f"exporter {name!r}: batch {batch} must be at least 1 (None: dynamic)")

    def decorate(convert: Converter) -> Converter:
        if name not in runtime_formats():
            raise ValueError(f"export format {name!r} has no edge runtime to verify its artifacts "
                             "in; register one first (edge_sdk.runtime.register_runtime)")
        if name in _EXPORTERS and _EXPORTERS[name].convert is not convert:
            raise ValueError(f"export format {name!r} is already registered "
                             f"({_EXPORTERS[name].convert.__module__}); unregister_exporter it first")
        _EXPORTERS[name] = Exporter(name, convert, tuple(precisions), batch, opset, tuple(packages),
                                    variant)
        return convert
    return decorate


def unregister_exporter(name: str) -> None:
    _EXPORTERS.pop(name, None)


def export_formats() -> tuple[str, ...]:
    """Every format that can be exported: this package's in module order, then any registered later."""
    return tuple(_EXPORTERS)


def exporter(name: str) -> Exporter:
    if name not in _EXPORTERS:
        raise ExportError(_unknown(name))
    return _EXPORTERS[name]


def _unknown(name: Any) -> str:
    return f"unknown export format {name!r}; registered formats: {', '.join(_EXPORTERS) or 'none'}"


def check_registered(name: str) -> str:
    """A pydantic validator: `name` if it is a registered export format, else ValueError."""
    if name not in _EXPORTERS:
        raise ValueError(_unknown(name))
    return name


# A config field type: the name of a registered export format.
ExportFormatName = Annotated[str, AfterValidator(check_registered)]


# Last, once everything they import from here is defined: each exporter module registers its format.
for _module in sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                      if m.name.endswith(MODULE_SUFFIX)):
    importlib.import_module(f"{__package__}.{_module}")
