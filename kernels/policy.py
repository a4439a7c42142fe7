"""The policy file: which `AttentionSpec` every (denoising step, layer) of one model runs.

A policy is tuned for one model shape on one GPU type and is refused elsewhere, with the field and
both values in the error. Schema version 1, in YAML::

    schema_version: 1
    checksum: sha256:…         # over the content; Policy.dump writes it, delete it after hand edits
    model: {name, heads, head_dim, layers, grid: [T, H, W], steps, cfg, task, text}
                               # task: t2v (the default, omitted) or i2v; text: prompt tokens
                               # inside self-attention (HunyuanVideo, CogVideoX; 0, omitted)
    hardware: {gpu, sm_count, capability: [major, minor], driver, torch, triton, fpstune}
    provenance: {study, trial, storage, objectives: {name: value}, remeasured: {name: value},
                 latency_source, created, fpstune_version, notes}   # optional
    default: <AttentionSpec>   # every (step, layer) no entry covers
    entries:                   # half-open ranges [start, stop); entries never overlap
    - {steps: [0, 10], layers: [0, 30], spec: <AttentionSpec>}

Every error is a `PolicyError` whose text is one line, ``<file>: <dotted.field>: <message>``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import sys
import warnings
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

import numpy as np
import yaml
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .atomic import write_text
from .config import DeviceLimits, default_tile, infeasibility
from .fingerprint import (
    GPU_TYPE_FIELDS,
    SOFTWARE_FIELDS,
    HardwareFingerprint,
    current_fingerprint,
    differences,
    format_value,
)
from .spec import AttentionSpec, KernelConfig, Mode, Pattern, SpecError
from .tiling import tile_overhang
from .yaml_io import YamlInputError, read_yaml

SCHEMA_VERSION: Final = 1
MAX_STEPS = 1000
MAX_LAYERS = 1000
MAX_TEXT = 65536  # text tokens in one joint attention call

_Positive = Annotated[int, Field(strict=True, ge=1)]
_Index = Annotated[int, Field(strict=True, ge=0)]
_Finite = Annotated[float, Field(allow_inf_nan=False)]
#: what the pipeline generates: text to video, or image to video
Task = Literal["t2v", "i2v"]

_UNITS = {"capability": ("compute capability ", ""), "sm_count": ("", " SMs")}

_HEADER = (
    "# fpstune policy: the attention spec each denoising step and layer runs.\n"
    "# Written by Policy.dump. After editing by hand, delete the checksum line.\n"
)


class PolicyError(SpecError):
    """A policy that cannot be used. ``str(e)`` is one line: ``<path>: <field>: <message>``."""

    def __init__(
        self, field: str, message: str, path: str | os.PathLike[str] | None = None
    ) -> None:
        self.field, self.message = field, message
        self.path = None if path is None else str(path)
        text = ": ".join(p for p in (self.path, field, message) if p)
        ValueError.__init__(self, " ".join(text.splitlines()))  # one line, whatever came in

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.field, self.message, self.path))

    def at(self, path: str | os.PathLike[str]) -> PolicyError:
        return PolicyError(self.field, self.message, path)


class PolicyWarning(UserWarning):
    """A policy runs, but on something other than what it was tuned on."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelShape(_Frozen):
    """The attention shape a policy is tuned for; `Policy.check` compares all of it but ``name``."""

    name: str = Field(min_length=1)
    heads: _Positive
    head_dim: _Positive
    layers: Annotated[int, Field(strict=True, ge=1, le=MAX_LAYERS)]
    grid: tuple[_Positive, _Positive, _Positive]
    steps: Annotated[int, Field(strict=True, ge=1, le=MAX_STEPS)]
    cfg: Annotated[int, Field(strict=True, ge=1, le=8)]  # attention passes per layer and step
    #: text to video or image to video; files without it are t2v, and t2v is not written (so
    #: their checksums stay what they were)
    task: Task = "t2v"
    #: text tokens attended to with the video in one call (joint attention); 0 (not written)
    #: for models whose text reaches the video through cross-attention only
    text: Annotated[int, Field(strict=True, ge=0, le=MAX_TEXT)] = 0


class Provenance(_Frozen):
    """Where a policy came from. ``storage`` never holds a password: it is masked on the way in."""

    study: str = Field(min_length=1)
    trial: _Index | None = None
    storage: str | None = None
    objectives: dict[str, _Finite] = Field(default_factory=dict)
    remeasured: dict[str, _Finite] = Field(default_factory=dict)  # objectives re-run at export
    latency_source: str | None = None  # "measured" or how it was estimated
    created: AwareDatetime
    fpstune_version: str = Field(min_length=1)
    notes: str | None = None

    @field_validator("storage")
    @classmethod
    def _mask(cls, url: str | None) -> str | None:
        return None if url is None else mask_credentials(url)


class PolicyEntry(_Frozen):
    """``spec`` runs on steps [start, stop) and layers [start, stop), both half-open."""

    steps: tuple[_Index, _Index]
    layers: tuple[_Index, _Index]
    spec: AttentionSpec

    @model_validator(mode="after")
    def _non_empty(self) -> PolicyEntry:
        for name in ("steps", "layers"):
            start, stop = getattr(self, name)
            if stop <= start:
                raise SpecError(name, f"[{start}, {stop}) is empty (ranges are [start, stop))")
        return self


class Policy(_Frozen):
    """A validated policy; `spec` answers for every (layer, step) in O(1).

    Build a changed copy with `replace`, not ``model_copy(update=...)`` (which skips validation).
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    model: ModelShape
    hardware: HardwareFingerprint
    provenance: Provenance | None = None  # None while a candidate is being tuned
    default: AttentionSpec
    entries: tuple[PolicyEntry, ...] = ()

    # _table[step][layer] indexes _specs: 0 is the default, i + 1 is entries[i].
    _specs: tuple[AttentionSpec, ...] = PrivateAttr(default=())
    _table: tuple[tuple[int, ...], ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _check_entries(self) -> Policy:
        shape = self.model
        hw = self.hardware
        limits = DeviceLimits() if hw.is_cpu else DeviceLimits(capability=hw.capability)
        _check_kernel(self.default, "default", shape, limits)
        owner = np.full((shape.steps, shape.layers), -1, dtype=np.int32)
        for i, entry in enumerate(self.entries):
            for name, n in (("steps", shape.steps), ("layers", shape.layers)):
                start, stop = getattr(entry, name)
                if stop > n:
                    raise SpecError(
                        f"entries[{i}].{name}",
                        f"[{start}, {stop}) goes past the model's {n} {name} [0, {n})",
                    )
            block = owner[entry.steps[0] : entry.steps[1], entry.layers[0] : entry.layers[1]]
            taken = np.argwhere(block >= 0)
            if len(taken):
                s, layer = (int(x) for x in taken[0])
                raise SpecError(
                    f"entries[{i}]",
                    f"overlaps entries[{block[s, layer]}] at step {entry.steps[0] + s}, "
                    f"layer {entry.layers[0] + layer}",
                )
            block[...] = i
            _check_kernel(entry.spec, f"entries[{i}].spec", shape, limits)
        self._specs = (self.default, *(e.spec for e in self.entries))
        self._table = tuple(tuple(row) for row in (owner + 1).tolist())
        return self

    # -- lookup -----------------------------------------------------------------------------

    def spec(self, *, layer: int, step: int) -> AttentionSpec:
        """The spec for denoising step ``step`` (0-based) and transformer layer ``layer``."""
        for name, value, n in (
            ("step", step, self.model.steps),
            ("layer", layer, self.model.layers),
        ):
            if not 0 <= value < n:
                raise IndexError(f"{name} {value} is outside the policy's {name}s [0, {n})")
        return self._specs[self._table[step][layer]]

    def spec_table(self) -> tuple[tuple[AttentionSpec, ...], ...]:
        """``table[step][layer]``: the spec of every cell (for heatmaps and reports)."""
        return tuple(tuple(self._specs[i] for i in row) for row in self._table)

    def grid_of_modes(self) -> tuple[tuple[Mode, ...], ...]:
        """``table[step][layer]``: the mode of every cell."""
        return tuple(tuple(self._specs[i].mode for i in row) for row in self._table)

    def replace(self, **changes: Any) -> Policy:
        """A validated copy with some top-level fields replaced; raises `PolicyError`."""
        try:
            return type(self).model_validate({**dict(self), **changes})
        except ValidationError as e:
            raise _from_validation(e) from None

    def with_provenance(self, provenance: Provenance | Mapping[str, Any]) -> Policy:
        return self.replace(provenance=provenance)

    # -- checks against the model and the machine ---------------------------------------------

    def check(
        self,
        *,
        model: ModelShape | None = None,
        hardware: HardwareFingerprint | Literal["auto"] | None = "auto",
        allow_other_gpu: bool = False,
        source: str | None = None,
    ) -> None:
        """Raise `PolicyError` if this policy does not fit ``model`` or ``hardware``.

        ``hardware="auto"`` compares with this machine, None skips the check. Another GPU type
        (name, capability or SM count) is refused unless ``allow_other_gpu``, then a warning;
        other driver / torch / triton / fpstune versions give a `PolicyWarning`. ``source`` (the
        file) prefixes warnings.
        """
        where = f"{source}: " if source else ""
        if model is not None:
            self._check_model(model, where)
        if hardware is not None:
            here = current_fingerprint() if hardware == "auto" else hardware
            self._check_hardware(here, allow_other_gpu, where)

    def _check_model(self, model: ModelShape, where: str) -> None:
        for name in ("heads", "head_dim", "layers", "grid", "steps", "cfg", "task", "text"):
            ours, theirs = getattr(self.model, name), getattr(model, name)
            if ours != theirs:
                raise PolicyError(
                    f"model.{name}", f"policy has {_show(ours)}, model has {_show(theirs)}"
                )
        if model.name != self.model.name:
            _warn(
                f"{where}model.name: tuned for {self.model.name}, running {model.name} (same shape)"
            )

    def _check_hardware(self, here: HardwareFingerprint, allow_other_gpu: bool, where: str) -> None:
        diff = differences(self.hardware, here)
        for name in GPU_TYPE_FIELDS:
            if name in diff:
                pre, post = _UNITS.get(name, ("", ""))
                tuned, this = (f"{pre}{format_value(name, v)}{post}" for v in diff[name])
                what = f"tuned on {tuned}, this machine has {this}"
                if not allow_other_gpu:
                    raise PolicyError(
                        f"hardware.{name}", f"{what} (pass allow_other_gpu=True to run it anyway)"
                    )
                _warn(f"{where}hardware.{name}: {what}; running it anyway (allow_other_gpu=True)")
                break
        if soft := [name for name in SOFTWARE_FIELDS if name in diff]:
            tuned = ", ".join(f"{n} {format_value(n, diff[n][0])}" for n in soft)
            this = ", ".join(f"{n} {format_value(n, diff[n][1])}" for n in soft)
            _warn(
                f"{where}hardware: tuned with {tuned}; this machine has {this} (latency may differ)"
            )

    # -- dict / YAML ----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Any) -> Policy:
        """Validate a policy mapping (as YAML gives it); raises `PolicyError` naming the field."""
        if not isinstance(d, Mapping):
            raise PolicyError("", f"expected a mapping at the top level, got {_kind(d)}")
        if "schema_version" not in d:
            raise PolicyError("schema_version", f"missing (this fpstune reads {SCHEMA_VERSION})")
        version = d["schema_version"]
        if type(version) is not int or version != SCHEMA_VERSION:
            raise PolicyError(
                "schema_version",
                f"{_short(version)} is not supported (this fpstune reads {SCHEMA_VERSION})",
            )
        try:
            policy = cls.model_validate({k: v for k, v in d.items() if k != "checksum"})
        except ValidationError as e:
            raise _from_validation(e) from None
        if "checksum" in d:
            given = d["checksum"]
            if not isinstance(given, str):
                raise PolicyError("checksum", f"expected a string 'sha256:…', got {_kind(given)}")
            if given != policy.checksum():
                raise PolicyError(
                    "checksum",
                    "does not match the content: the file was truncated or edited "
                    "(delete the checksum line to accept hand edits)",
                )
        return policy

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON types) that `from_dict` reads back equal; carries the checksum."""
        body = self._body()
        return {"schema_version": body.pop("schema_version"), "checksum": self.checksum(), **body}

    def checksum(self) -> str:
        canonical = json.dumps(self._body(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()

    def _body(self) -> dict[str, Any]:
        d = self.model_dump(mode="json")
        for field, default in (("task", "t2v"), ("text", 0)):
            if d["model"][field] == default:  # as files written before the field say it
                del d["model"][field]
        if self.provenance is None:
            del d["provenance"]
        else:
            d["provenance"] = {k: v for k, v in d["provenance"].items() if v not in (None, {})}
        d["default"] = self.default.to_dict()
        d["entries"] = [
            {"steps": list(e.steps), "layers": list(e.layers), "spec": e.spec.to_dict()}
            for e in self.entries
        ]
        return d

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        model: ModelShape | None = None,
        hardware: HardwareFingerprint | Literal["auto"] | None = "auto",
        allow_other_gpu: bool = False,
    ) -> Policy:
        """Read, validate and check a policy file (see `check`); errors are `PolicyError`."""
        try:
            policy = cls.from_dict(_read_yaml(path))
            policy.check(
                model=model, hardware=hardware, allow_other_gpu=allow_other_gpu, source=str(path)
            )
        except PolicyError as e:
            raise e.at(path) from None
        return policy

    def dump(self, path: str | os.PathLike[str]) -> None:
        """Write YAML atomically (a temp file in the same folder, then `os.replace`)."""
        text = _HEADER + yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, width=100)
        write_text(path, text)


def mask_credentials(url: str) -> str:
    """``postgresql://user:***@host/db`` for ``postgresql://user:secret@host/db``, and
    ``password=***`` (or token, secret, ...) in the query."""
    url = re.sub(r"^([A-Za-z][\w+.-]*://[^/@:]*:)[^@]*@", r"\1***@", url)
    return re.sub(r"(?i)([?&](?:password|passwd|pwd|secret|token|api_key)=)[^&#]*", r"\1***", url)


# -- helpers ------------------------------------------------------------------------------------


def _check_kernel(spec: AttentionSpec, field: str, shape: ModelShape, limits: DeviceLimits) -> None:
    if spec.tile is not None and (problem := tile_overhang(shape.grid, spec.tile)):
        raise SpecError(f"{field}.tile", problem)
    if spec.kernel is None:
        return
    tile = spec.tile or default_tile(shape.grid)
    reasons = infeasibility(
        spec.kernel, tile=tile, head_dim=shape.head_dim, mode=spec.mode, limits=limits
    )
    if reasons:
        raise SpecError(f"{field}.kernel", "; ".join(reasons))


def _warn(message: str) -> None:
    # Point the warning at the first caller outside this module (load, check or the user's code).
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, PolicyWarning, stacklevel=level)


# A 50-step x 40-layer policy written cell by cell with full specs is ~500 kB and ~82k YAML nodes;
# exported policies are a few kB. Within these bounds a hostile file is refused in about 2 s.
MAX_POLICY_BYTES = 1 << 20
MAX_POLICY_NODES = 120_000


def _read_yaml(path: str | os.PathLike[str]) -> Any:
    try:
        data = read_yaml(path, max_bytes=MAX_POLICY_BYTES, max_nodes=MAX_POLICY_NODES)
    except YamlInputError as e:
        raise PolicyError("", e.message, path) from None
    if data is None:
        raise PolicyError("", "empty file (expected a policy mapping)", path)
    return data


class _Dumper(yaml.SafeDumper):
    """Block style, but short lists of scalars on one line (``grid: [21, 30, 52]``)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(not isinstance(x, list | dict) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)

# For "unknown key" hints: which model a mapping at a path is, by the last key naming it.
_MODEL_AT: dict[str, type[BaseModel]] = {
    "": Policy,
    "model": ModelShape,
    "hardware": HardwareFingerprint,
    "provenance": Provenance,
    "default": AttentionSpec,
    "entries": PolicyEntry,
    "spec": AttentionSpec,
    "pattern": Pattern,
    "kernel": KernelConfig,
}


def _from_validation(e: ValidationError) -> PolicyError:
    err = e.errors()[0]
    loc = tuple(err["loc"])
    field = _dotted(loc)
    msg = str(err["msg"]).removeprefix("Value error, ").replace("a valid tuple", "a list")
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, SpecError):
        field = _join(field, cause.field)
        msg = cause.message
    elif err["type"] == "missing":
        msg = "missing"
    elif err["type"] == "extra_forbidden":
        msg = "unknown key" + _hint(loc)
    elif "input" in err and not isinstance(err["input"], Mapping):
        msg = f"{msg}, got {_short(err['input'])}"
    return PolicyError(field, msg)


def _hint(loc: tuple[Any, ...]) -> str:
    parents = [p for p in loc[:-1] if isinstance(p, str)]
    cls = _MODEL_AT.get(parents[-1] if parents else "")
    if cls is None:
        return ""
    known = list(cls.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (expected one of: {', '.join(known)})"


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        if p == "[key]":  # pydantic's marker for a bad mapping key; the key itself precedes it
            continue
        if isinstance(p, int):
            out = f"{out}[{p}]" if out else str(p)
        elif re.fullmatch(r"[\w-]+", str(p)):
            out = _join(out, str(p))
        else:  # a key a dotted path would garble: '', 'a b', 'x.y'
            out = f"{out}[{str(p)!r}]"
    return out


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else a or b


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def _kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
