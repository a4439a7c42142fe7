"""What one attention call should compute: mode, 3D tile, sparsity, pattern and kernel config.

`AttentionSpec` is exactly what one policy entry holds. It is a frozen pydantic model, so a policy
entry with an unknown key, a wrong type or an out-of-range value is refused with the field's path.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from . import knobs as _knobs

Tile = tuple[int, int, int]
MAX_TILE_TOKENS = 8192  # shipped tiles hold 32-384 tokens; a kernel block is at most 256 rows


class Mode(StrEnum):
    BF16_DENSE = "bf16_dense"
    FP8_DENSE = "fp8_dense"
    FP8_SPARSE = "fp8_sparse"
    BF16_SPARSE = "bf16_sparse"

    @property
    def fp8(self) -> bool:
        return self in (Mode.FP8_DENSE, Mode.FP8_SPARSE)

    @property
    def sparse(self) -> bool:
        return self in (Mode.FP8_SPARSE, Mode.BF16_SPARSE)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Pattern(_Frozen):
    """Which kv tiles a q tile keeps; see `fpstune.kernels.patterns` for the exact rules.

    - ``window``: the kv tiles nearest the q tile in tile units (a 3D box grown around it, scaled by
      ``window`` as the box's aspect), static, the same for every head.
    - ``topk``: per head, the kv tiles with the largest tile-pooled q·kᵀ score.
    - ``cdf``: per head, the fewest top-scoring kv tiles whose pooled softmax mass reaches ``mass``,
      never more than the sparsity allows.
    Every pattern keeps the q tile's own kv tile.
    """

    kind: Literal["window", "topk", "cdf"]
    window: tuple[float, float, float] = (1.0, 1.0, 1.0)
    mass: float = Field(default=0.95, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _positive_window(self) -> Pattern:
        if min(self.window) <= 0:
            raise SpecError("window", f"window aspect must be positive, got {list(self.window)}")
        return self


#: Knobs that were measured, lost and left the kernels: named in one line if a policy sets them.
_REMOVED_KNOBS = {
    "exp2": "packed fp16 exponentials (f16x2) saved nothing on sm_90 and were removed; "
    "delete the key",
}


class KernelConfig(_Frozen):
    """Launch parameters of the attention kernels; checked by `config.check_feasible`."""

    block_m: int = Field(gt=0)
    block_n: int = Field(gt=0)
    num_warps: Literal[1, 2, 4, 8, 16] = 8
    num_stages: int = Field(default=2, ge=1, le=8)
    #: fp8 modes: which kernel runs them. ``gluon`` is `gluon_attention`'s Hopper kernel (TMA
    #: ring, FlashAttention-3's overlap of one block's softmax with the previous block's P·V);
    #: it needs an sm_90 GPU, 64-row blocks on 4 warps, head_dim 128 and >= 3 stages.
    #: ``gluon_ws`` is its warp-specialised form: 128-row blocks on two consumer warpgroups
    #: (``num_warps=8``) fed by a producer warp, one K/V ring per CTA, >= 2 stages
    impl: Literal["triton", "gluon", "gluon_ws"] = "triton"
    #: registered knobs (`fpstune.kernels.knobs`) set to other than their default
    knobs: dict[str, _knobs.Scalar] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        for name, why in _REMOVED_KNOBS.items():
            if isinstance(data, dict) and name in data:
                raise SpecError(name, why)
        return data

    @field_validator("knobs")
    @classmethod
    def _registered(cls, v: dict[str, _knobs.Scalar]) -> dict[str, _knobs.Scalar]:
        for name, value in v.items():
            try:
                knob = _knobs.get(name)
            except ValueError as e:
                raise SpecError(name, str(e)) from None
            if value not in knob.choices:
                raise SpecError(name, f"{value!r} is not one of {list(knob.choices)}")
        return {n: x for n, x in sorted(v.items()) if x != _knobs.get(n).default}

    @model_serializer(mode="wrap")
    def _without_default_knobs(self, handler: Any) -> dict[str, Any]:
        # Configs written before the knobs existed keep their stored form (table keys, YAML).
        d: dict[str, Any] = handler(self)
        for knob, default in (("impl", "triton"), ("knobs", {})):
            if d.get(knob) == default:
                del d[knob]
        return d

    def __hash__(self) -> int:  # ``knobs`` is a dict; specs are cache keys
        fields = (self.block_m, self.block_n, self.num_warps, self.num_stages, self.impl)
        return hash((*fields, tuple(self.knobs.items())))

    def knob(self, name: str) -> _knobs.Scalar:
        """A registered knob's value in this config (its default when not set)."""
        return self.knobs.get(name, _knobs.get(name).default)

    @property
    def key(self) -> str:
        """Stable short name: ``m64_n128_w4_s5`` (``_gl`` / ``_glws`` added for the Gluon
        kernels, ``_<knob>-<value>`` for each registered knob set off its default)."""
        gl = {"triton": "", "gluon": "_gl", "gluon_ws": "_glws"}[self.impl]
        extra = "".join(f"_{n}-{v}" for n, v in self.knobs.items())
        return f"m{self.block_m}_n{self.block_n}_w{self.num_warps}_s{self.num_stages}{gl}{extra}"


class AttentionSpec(_Frozen):
    mode: Mode
    tile: tuple[int, int, int] | None = None
    sparsity: float = Field(default=0.0, ge=0.0, lt=1.0)
    pattern: Pattern | None = None
    kernel: KernelConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> AttentionSpec:
        # SpecError (a ValueError) carries the field, which a model-level check otherwise loses.
        if self.tile is not None and min(self.tile) < 1:
            raise SpecError("tile", f"tile sizes must be >= 1, got {list(self.tile)}")
        if self.tile is not None and math.prod(self.tile) > MAX_TILE_TOKENS:
            raise SpecError(
                "tile",
                f"a tile of {math.prod(self.tile)} tokens {list(self.tile)} is more than "
                f"{MAX_TILE_TOKENS}",
            )
        if self.mode.sparse:
            if self.pattern is None:
                raise SpecError("pattern", f"mode {self.mode.value} needs a pattern")
        elif self.sparsity != 0.0 or self.pattern is not None:
            raise SpecError(
                "sparsity" if self.sparsity != 0.0 else "pattern",
                f"dense mode {self.mode.value} takes no sparsity or pattern",
            )
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttentionSpec:
        """Build from a policy entry; raises `SpecError` naming the offending field."""
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise SpecError.from_validation(e) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def describe(self) -> str:
        """One line for messages, e.g. ``fp8_sparse, sparsity 0.9 window, tile 1x16x8``."""
        parts = [self.mode.value]
        if self.mode.sparse and self.pattern is not None:
            parts.append(f"sparsity {self.sparsity:g} {self.pattern.kind}")
        if self.tile:
            parts.append("tile " + "x".join(str(t) for t in self.tile))
        if self.kernel:
            parts.append(self.kernel.key)
        return ", ".join(parts)


class SpecError(ValueError):
    """A spec or policy that does not validate; `field` is a dotted path (``kernel.block_m``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message

    @classmethod
    def from_validation(cls, e: ValidationError, prefix: str = "") -> SpecError:
        err = e.errors()[0]
        loc: tuple[object, ...] = (prefix, *err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, SpecError):
            loc, msg = (*loc, cause.field), cause.message
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        path = ".".join(str(p) for p in loc if p != "")
        return cls(path, msg)
