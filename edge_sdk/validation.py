"""One wording for pydantic validation errors, so every file a user writes (configs, plans,
manifests) and every header a peer sends is refused the same way: `field.path: what is wrong`."""

from __future__ import annotations

from pydantic import ValidationError


def describe(exc: ValidationError, root: str = "value") -> str:
    return "; ".join(f"{'.'.join(str(p) for p in error['loc']) or root}: {error['msg']}"
                     for error in exc.errors())
