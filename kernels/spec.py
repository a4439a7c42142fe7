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
    model_serializer,
    model_validator,
)

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


class KernelConfig(_Frozen):
    """Launch parameters of the Triton attention kernel; checked by `config.check_feasible`."""

    block_m: int = Field(gt=0)
    block_n: int = Field(gt=0)
    num_warps: Literal[1, 2, 4, 8, 16] = 8
    num_stages: int = Field(default=2, ge=1, le=8)
    #: fp8 modes: the softmax's exponentials as fp32 or as packed fp16 pairs (``ex2.approx.f16x2``;
    #: P is cast to e4m3 anyway). On sm_90 ptxas issues the pair as two scalar MUFU ops, so it
    #: saves nothing there (docs/kernel_notes.md, v5); bf16 ignores it
    exp2: Literal["f32", "f16x2"] = "f32"
    #: fp8 modes: which kernel runs them. ``gluon`` is `gluon_attention`'s Hopper kernel (TMA
    #: ring, FlashAttention-3's overlap of one block's softmax with the previous block's P·V);
    #: it needs an sm_90 GPU, 64-row blocks on 4 warps, head_dim 128 and >= 3 stages.
    #: ``gluon_ws`` is its warp-specialised form: 128-row blocks on two consumer warpgroups
    #: (``num_warps=8``) fed by a producer warp, one K/V ring per CTA, >= 2 stages
    impl: Literal["triton", "gluon", "gluon_ws"] = "triton"

    @model_serializer(mode="wrap")
    def _without_default_knobs(self, handler: Any) -> dict[str, Any]:
        # Configs written before the knobs existed keep their stored form (table keys, YAML).
        d: dict[str, Any] = handler(self)
        for knob, default in (("exp2", "f32"), ("impl", "triton")):
            if d.get(knob) == default:
                del d[knob]
        return d

    @property
    def key(self) -> str:
        """Stable short name: ``m64_n128_w4_s5`` (``_e16`` added for packed fp16 exponentials,
        ``_gl`` / ``_glws`` for the Gluon kernels)."""
        e16 = "_e16" if self.exp2 == "f16x2" else ""
        gl = {"triton": "", "gluon": "_gl", "gluon_ws": "_glws"}[self.impl]
        return f"m{self.block_m}_n{self.block_n}_w{self.num_warps}_s{self.num_stages}{e16}{gl}"


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
