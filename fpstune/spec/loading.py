"""Reading hand-edited YAML safely and turning every mistake into one line that names the place.

`BadInput` is what the CLI turns into exit status 2: ``<file>: <dotted.field>: <message>``, one
line, no traceback. Files are read by `fpstune.kernels.yaml_io.read_yaml`: plain data only,
regular files only, bounded in bytes and nodes, no anchors/aliases, no duplicate keys.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from fpstune import errors
from fpstune.kernels import SpecError
from fpstune.kernels.yaml_io import YamlInputError, read_yaml

M = TypeVar("M", bound=BaseModel)

MAX_BYTES = 1 << 20  # a spec file is a few kB; refuse anything that plainly is not one


class BadInput(errors.BadInput):
    """A file a user handed in does not validate.

    ``str(err)`` is one line, ``<file>: <field>: <message>`` (``<file>: <message>`` when the file
    as a whole is at fault); ``file``, ``field`` and ``message`` keep the parts. A subclass of the
    CLI's `fpstune.errors.BadInput` (exit status 2). It is a ValueError, so pydantic wraps one
    raised inside a validator (a search space named by a study); `from_validation` unwraps it, so
    the error still names the space file, not the study.
    """

    def __init__(self, file: str | Path, field: str, message: str) -> None:
        self.file = str(file)
        # A key from the file may hold a line break; the error stays one line.
        self.field = field.replace("\r", "\\r").replace("\n", "\\n")
        self.message = " ".join(message.split())
        super().__init__(": ".join(p for p in (self.file, self.field, self.message) if p))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.file, self.field, self.message))


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file; `BadInput` if it is missing, unreadable, too big, not
    UTF-8, not YAML, empty, not a mapping, or has a duplicate key."""
    p = Path(path)
    try:
        data = read_yaml(p, max_bytes=MAX_BYTES)
    except YamlInputError as e:
        if e.key is not None:
            raise BadInput(
                p, e.key, f"duplicate key (line {e.line}; first at line {e.first})"
            ) from None
        raise BadInput(p, "", e.message) from None
    if data is None:
        raise BadInput(p, "", "file is empty (expected a mapping)")
    if not isinstance(data, dict):
        raise BadInput(p, "", f"expected a mapping at the top level, got {kind_of(data)}")
    for key in data:
        if not isinstance(key, str):
            raise BadInput(p, str(key), f"keys must be strings, got {kind_of(key)}")
    return data


def validate(
    model: type[M],
    data: Any,
    *,
    file: str | Path,
    prefix: str = "",
    context: dict[str, Any] | None = None,
) -> M:
    """``model.model_validate(data)``; the first error becomes `BadInput` at ``prefix.field``."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        raise from_validation(e, file=file, model=model, prefix=prefix) from None
    except SpecError as e:
        raise BadInput(file, join(prefix, e.field), e.message) from None


def load_model(model: type[M], path: str | Path, *, context: dict[str, Any] | None = None) -> M:
    return validate(model, read_mapping(path), file=path, context=context)


def from_validation(
    e: ValidationError, *, file: str | Path, model: type[BaseModel] | None = None, prefix: str = ""
) -> BadInput:
    """The first error of ``e`` as `BadInput`.

    Locations are dotted (``sampler.options.seed``, ``tiles.2``). Tags of tagged unions are written
    ``<tag>`` by this package and dropped from the path. A validator can point below its own field
    by raising ``PydanticCustomError("nested", "{message}", {"message": ..., "subfield": ...})``.
    """
    err = e.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith("<"))]
    ctx = err.get("ctx") or {}
    if ctx.get("subfield"):
        loc.append(str(ctx["subfield"]))
    kind = err["type"]
    msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    msg = msg.replace("a valid tuple", "a list")
    cause = ctx.get("error")
    if isinstance(cause, BadInput):
        return cause
    if isinstance(cause, SpecError):
        loc.extend(p for p in cause.field.split(".") if p)
        msg = cause.message
    elif kind == "extra_forbidden":
        msg = "unknown key" + (_hint(model, err["loc"]) if model else "")
    elif kind == "missing" and isinstance(err["loc"][-1], int):  # a fixed-length list too short
        loc.pop()
        msg = f"expected {err['loc'][-1] + 1} or more items, got {show(err.get('input'))}"
    elif kind == "missing":
        msg = "required key is missing" + _found_instead(e, err["loc"])
    elif kind not in _OWN_MESSAGE and "input" in err and not isinstance(err["input"], Mapping):
        msg = f"{msg} (got {show(err['input'])})"
    return BadInput(file, join(prefix, ".".join(loc)) or "(top level)", msg)


# Error kinds whose message already says what was wrong with the value.
_OWN_MESSAGE = frozenset({"value_error", "assertion_error", "nested", "missing", "extra_forbidden"})


def join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def show(value: Any, limit: int = 60) -> str:
    """A short rendering of a YAML value for an error message."""
    if isinstance(value, list | tuple | dict):
        text = yaml.safe_dump(
            _plain(value), default_flow_style=True, width=1 << 16, sort_keys=False
        ).strip()
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def kind_of(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _plain(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def _hint(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """`` (did you mean 'x'?)`` for an unknown key, from the fields of the model at ``loc``."""
    cls: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or (isinstance(part, str) and part.startswith("<")):
            continue
        fields = getattr(cls, "model_fields", None)
        if not fields or part not in fields:
            return ""
        cls = _model_in(fields[part].annotation)
        if cls is None:
            return ""
    known = list(getattr(cls, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (expected one of: {', '.join(known)})" if known else ""


def _found_instead(e: ValidationError, loc: tuple[Any, ...]) -> str:
    """`` (found 'trails': did you mean 'trials'?)`` for a missing key that an unknown key beside
    it nearly spells."""
    unknown = [
        str(x["loc"][-1])
        for x in e.errors(include_url=False)
        if x["type"] == "extra_forbidden" and x["loc"][:-1] == loc[:-1]
    ]
    close = difflib.get_close_matches(str(loc[-1]), unknown, n=1)
    return f" (found {close[0]!r}: did you mean {str(loc[-1])!r}?)" if close else ""


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The one pydantic model an annotation holds (through Optional, tuple[...], Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _model_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, tuple, list):
        found = {m for a in typing.get_args(annotation) if (m := _model_in(a)) is not None}
        return found.pop() if len(found) == 1 else None
    return None
