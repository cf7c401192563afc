"""One wording for refusing what users write and peers send: TOML files that are missing or
malformed, JSON that is malformed or built to exhaust the parser, and pydantic validation errors
(`field.path: what is wrong (got X)`, without pydantic's URL)."""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from itertools import accumulate
from pathlib import Path
from typing import Any

from pydantic import ValidationError


TOML_LIMIT = 1024 * 1024  # bytes; a config file is a few kB


def read_toml(path: str | Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """The parsed file, or `error` saying that the `what` file is missing or not valid TOML.

    Only `error`, whatever the file holds: tomllib recurses per nesting level (RecursionError)
    and int() refuses over 4,300 digits (ValueError), so those are caught too.
    """
    try:
        with Path(path).open("rb") as file:
            raw = file.read(TOML_LIMIT + 1)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    if len(raw) > TOML_LIMIT:
        raise error(f"{what} {path} is over {TOML_LIMIT:,} bytes; is it the right file?")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {path} is not valid TOML: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise error(f"{what} {path} cannot be parsed: {str(exc)[:200] or type(exc).__name__}") from None


def describe(exc: ValidationError, root: str = "value", schema: type | None = None) -> str:
    """`path.to.field: what is wrong (got X)`, per error, on one line (for logs and messages
    that carry one); `problems` gives them apart."""
    return "; ".join(problems(exc, root, schema))


def problems(exc: ValidationError, root: str = "value", schema: type | None = None,
             within: str = "") -> list[str]:
    """One `path.to.field: what is wrong (got X)` per error, without pydantic's URL. A
    validator's own message (a ValueError it raised) is given without pydantic's "Value error, "
    prefix, and names its keys and values itself. With the `schema` (a pydantic model), a key it
    does not know gets the nearest ones it does. `within` is the section `exc` came from, put
    before each key (a section validated on its own still reads `section.key`)."""
    def one(error) -> str:
        path = ".".join(str(p) for p in (*([within] if within else []), *error["loc"]))
        text = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden" and schema is not None:
            known = _keys_at(schema, error["loc"][:-1])
            near = difflib.get_close_matches(str(error["loc"][-1]), known, n=2, cutoff=0.6)
            text = "not a setting" + (f"; did you mean {' or '.join(near)}?" if near else
                                      f" here (known: {', '.join(known)})" if known else "")
        elif error["type"] == "model_type" and path and schema is not None:  # a config file
            text = f"a section of settings ([{path}] in a file, {path}.KEY=VALUE in --set), not a value"
        if not path and error["type"] == "value_error":
            return text  # a model's own validator: its message names the keys
        return f"{path or root}: {text}{_got(error)}"
    return [one(error) for error in exc.errors(include_url=False)]


# Errors whose message says all there is: a missing or unknown key has no value to show, and a
# validator's own message quotes what it refused.
_SAYS_ITSELF = {"missing", "extra_forbidden", "value_error", "assertion_error"}
# A refused value under these names is not echoed: it may be a credential.
_SECRET_WORDS = ("token", "password", "secret", "key")


def _got(error) -> str:
    """` (got X)`: the refused value, short, so the user sees what was read (a typo, a unit)."""
    if error["type"] in _SAYS_ITSELF or "input" not in error:
        return ""
    if any(word in str(part).lower() for part in error["loc"] for word in _SECRET_WORDS):
        return ""
    value = error["input"]
    shown = "a section" if isinstance(value, dict) else repr(value)
    return f" (got {shown[:57] + '...' if len(shown) > 60 else shown})"


def _keys_at(schema: type, path: tuple) -> list[str]:
    """The setting names of the model found at `path` inside `schema` ([] where none is)."""
    model = schema
    for part in path:
        field = getattr(model, "model_fields", {}).get(part)
        candidates = [field.annotation] if field is not None else []
        candidates += list(getattr(field.annotation, "__args__", ())) if field is not None else []
        model = next((c for c in candidates if isinstance(c, type) and hasattr(c, "model_fields")),
                     None)
        if model is None:
            return []
    return sorted(getattr(model, "model_fields", {}))


# Limits of `load_json`: far above anything fedprune writes (its headers and manifests nest under
# 10 levels and their integers are counts, sizes and rounds), far below what breaks the parser
# (CPython's json recurses per level; int() of >4,300 digits raises, and is quadratic before).
JSON_MAX_DEPTH = 32
JSON_MAX_DIGITS = 20

# A string, or an unterminated one up to the end: matches never restart inside a string, so
# cutting them out is linear (a pattern that must find the closing quote retries at every quote:
# quadratic, minutes for a 64 KiB header of escaped quotes).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class _Refused(ValueError):
    """Raised inside the json hooks; `load_json` turns it into the caller's error."""


def load_json(data: bytes, what: str, error: type[Exception], max_bytes: int) -> Any:
    """Parse JSON that came from a peer or a file, or raise `error` saying why it was refused.

    Whatever the bytes are, the only exception is `error`: the size, nesting depth and integer
    lengths are bounded before the parser can recurse or convert, NaN, Infinity and overflowing
    floats (1e999) are refused (fedprune never writes them, and they poison sums and databases),
    and so are unpaired surrogate escapes ("\\ud800"), which no UTF-8 encoder can write back.
    """
    if len(data) > max_bytes:
        raise error(f"{what} is {len(data):,} bytes; the limit is {max_bytes:,}")
    try:
        text = bytes(data).decode("utf-8")
        _check_depth(text)
        value = json.loads(text, parse_constant=_refuse_constant, parse_int=_bounded_int,
                           parse_float=_finite_float)
        if _SURROGATE_ESCAPE.search(text):
            _check_encodable(value)
    except _Refused as exc:
        raise error(f"{what} is refused: {exc}") from None
    except UnicodeError as exc:
        raise error(f"{what} is not valid UTF-8 text: {exc}") from None
    except (ValueError, RecursionError) as exc:  # json.JSONDecodeError is a ValueError
        raise error(f"{what} is not valid JSON: {exc}") from None
    return value


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than JSON_MAX_DEPTH without recursing: strings are cut out, then
    the running depth of the remaining brackets is summed."""
    brackets = _NOT_A_BRACKET.sub("", _STRING.sub("", text))
    deepest = max(accumulate(1 if c in "[{" else -1 for c in brackets), default=0)
    if deepest > JSON_MAX_DEPTH:
        raise _Refused(f"it nests {deepest} levels deep; the limit is {JSON_MAX_DEPTH}")


def _check_encodable(value: Any) -> None:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise _Refused("a string holds an unpaired surrogate escape (\\ud800-\\udfff), "
                       "which is not text") from None


def _refuse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a number JSON allows; send finite numbers only")


def _bounded_int(literal: str) -> int:
    digits = len(literal) - literal.startswith("-")
    if digits > JSON_MAX_DIGITS:
        raise _Refused(f"an integer has {digits:,} digits; the limit is {JSON_MAX_DIGITS}")
    return int(literal)


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise _Refused(f"the number {literal[:40]} overflows a float; send finite numbers only")
    return value
