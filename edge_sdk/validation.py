"""One wording for refusing what users write and peers send: TOML files that are missing or
malformed, and pydantic validation errors (`field.path: what is wrong`)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError


def read_toml(path: str | Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """The parsed file, or `error` saying that the `what` file is missing or not valid TOML."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {path} is not valid TOML: {exc}") from None


def describe(exc: ValidationError, root: str = "value") -> str:
    return "; ".join(f"{'.'.join(str(p) for p in error['loc']) or root}: {error['msg']}"
                     for error in exc.errors())
