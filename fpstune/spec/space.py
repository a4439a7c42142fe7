"""Search spaces as declared in ``search_spaces/*.yaml``: what may vary, never how it is searched.

Two kinds, told apart by ``kind``:

- `KernelSpace` (``kind: kernel``): the kernel-level grid per GPU and attention shape: modes,
  sparsity buckets, patterns, 3D tiles and launch configs. `fpstune.stages.kernel_space` removes the
  infeasible points and turns the rest into Optuna suggestions.
- `ScheduleSpace` (``kind: schedule``): compact parameters of a per-(step, layer) schedule: phase
  boundaries, per-phase sparsity, pattern, tile, dense first/last layers and per-layer-group
  sparsity offsets. `fpstune.stages.schedule_space` turns them into a `Policy`.

A searched parameter (`FloatParam`, `IntParam`) is written either as a range ``{low, high,
step}`` (``step`` optional for floats, 1 for ints) or as a list of choices (``[0.5, 0.75]`` or
``{choices: [...]}``); a single number is a fixed value. Empty ranges, empty lists and duplicate
choices are refused. A parameter with only one possible value is *fixed*: it is never suggested to
Optuna, so it costs the sampler nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fpstune.kernels import Mode, Pattern
from fpstune.kernels.config import is_block_size
from fpstune.spec.loading import show

# -- shared building blocks ------------------------------------------------------------------

Int = Annotated[int, Strict()]
PosInt = Annotated[int, Strict(), Field(ge=1)]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Tile = tuple[PosInt, PosInt, PosInt]
PatternKind = Literal["window", "topk", "cdf"]

_EPS = 1e-9


class Frozen(BaseModel):
    """Base of every spec model: unknown keys refused, immutable after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _SourcedFrozen(Frozen):
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> str:
        """The file this was loaded from (for error messages), or ``<kind space>`` when built
        in memory."""
        if self._source is not None:
            return str(self._source)
        return f"<{getattr(self, 'kind', 'search')} space>"


def tile_key(tile: tuple[int, int, int]) -> str:
    """Stable string for a 3D tile (``2x8x8``): Optuna categorical choices must be scalars."""
    return "x".join(str(int(x)) for x in tile)


def aspect_key(aspect: tuple[float, float, float]) -> str:
    """Stable string for a window aspect (``1x2x2``, ``0.5x1x1``)."""
    return "x".join(f"{float(x):g}" for x in aspect)


def unique(values: tuple[Any, ...], what: str = "") -> tuple[Any, ...]:
    """``values``, or a validation error at the index of the first repeat."""
    seen: list[Any] = []
    for i, v in enumerate(values):
        if v in seen:
            first = seen.index(v)
            raise at(str(i), f"duplicate{' ' + what if what else ''} {show(v)} (also at {first})")
        seen.append(v)
    return values


def non_empty(values: tuple[Any, ...]) -> tuple[Any, ...]:
    if not values:
        raise ValueError("empty list (give at least one value)")
    return values


class _Param(Frozen):
    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, list | tuple):
            return {"choices": list(v)}
        if isinstance(v, dict | cls):
            return v
        if isinstance(v, int | float) and not isinstance(v, bool):
            return {"choices": [v]}
        raise ValueError(
            f"expected a range {{low, high, step}}, a list of choices or a number, got {show(v)}"
        )

    @model_validator(mode="after")
    def _one_form(self) -> _Param:
        low, high, step, choices = self._fields()
        if choices is not None:
            if low is not None or high is not None or step is not None:
                raise ValueError("give either a range (low, high, step) or choices, not both")
            if not choices:
                raise ValueError("empty list of choices")
            seen = set()
            for c in choices:
                if c in seen:
                    raise ValueError(f"duplicate choice {show(c)}")
                seen.add(c)
            return self
        if low is None or high is None:
            raise ValueError("a range needs both low and high")
        if low > high:
            raise ValueError(f"empty range: low {low} > high {high}")
        if step is not None:
            n = (high - low) / step
            if abs(n - round(n)) > 1e-6:
                raise ValueError(f"step {step} does not divide high - low = {high - low:g}")
        return self

    def _fields(self) -> tuple[Any, Any, Any, tuple[Any, ...] | None]:
        return (
            getattr(self, "low", None),
            getattr(self, "high", None),
            getattr(self, "step", None),
            getattr(self, "choices", None),
        )

    @property
    def bounds(self) -> tuple[Any, Any]:
        """Smallest and largest value the parameter can take."""
        low, high, _, choices = self._fields()
        if choices is not None:
            return (min(choices), max(choices))
        return (low, high)

    @property
    def fixed(self) -> Any | None:
        """The value when there is only one (then it is never suggested), else None."""
        low, high, _, choices = self._fields()
        if choices is not None:
            return choices[0] if len(choices) == 1 else None
        return low if low == high else None

    def check_bounds(self, lo: float, hi: float, *, hi_open: bool = False) -> None:
        """Raise ValueError unless every value lies in [lo, hi] ([lo, hi) with ``hi_open``)."""
        a, b = self.bounds
        if a < lo or b > hi or (hi_open and b >= hi):
            got = f"got {a:g}" if a == b else f"got {a:g} .. {b:g}"
            if math.isinf(hi):
                raise ValueError(f"values must be >= {lo:g}, {got}")
            right = ")" if hi_open else "]"
            raise ValueError(f"values must lie in [{lo:g}, {hi:g}{right}, {got}")


class FloatParam(_Param):
    """A float to search: ``{low, high, step?}``, ``[choices]`` or one number."""

    low: Float | None = None
    high: Float | None = None
    step: Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)] | None = None
    choices: tuple[Float, ...] | None = None

    def contains(self, value: float) -> bool:
        if self.choices is not None:
            return any(abs(value - c) <= _EPS for c in self.choices)
        assert self.low is not None and self.high is not None
        if not self.low - _EPS <= value <= self.high + _EPS:
            return False
        if self.step is None:
            return True
        k = (value - self.low) / self.step
        return abs(k - round(k)) <= 1e-6


class IntParam(_Param):
    """An integer to search: ``{low, high, step?}``, ``[choices]`` or one number."""

    low: Int | None = None
    high: Int | None = None
    step: PosInt | None = None
    choices: tuple[Int, ...] | None = None

    def contains(self, value: int) -> bool:
        if self.choices is not None:
            return value in self.choices
        assert self.low is not None and self.high is not None
        return self.low <= value <= self.high and (value - self.low) % (self.step or 1) == 0


# -- kernel space ----------------------------------------------------------------------------

KernelMode = Literal["bf16_dense", "fp8_dense", "fp8_sparse", "bf16_sparse"]


class KernelSpace(_SourcedFrozen):
    """Kernel-level search space (``kind: kernel``).

    Buckets are (mode, sparsity, pattern): one per dense mode (``bf16_dense`` is measured as the
    SDPA baseline, with nothing to tune), and one per sparsity x pattern for each sparse mode.
    Within a bucket the search runs over tile x launch config; points the runtime's feasibility
    check refuses are removed before any trial (see `fpstune.stages.kernel_space`).
    """

    kind: Literal["kernel"]
    modes: Annotated[tuple[KernelMode, ...], Field()]
    sparsities: tuple[Float, ...] = ()
    patterns: tuple[Pattern, ...] = (Pattern(kind="window"),)
    tiles: tuple[Tile, ...]
    block_m: tuple[PosInt, ...]
    block_n: tuple[PosInt, ...]
    num_warps: tuple[Literal[1, 2, 4, 8, 16], ...]
    num_stages: tuple[Annotated[int, Strict(), Field(ge=1, le=8)], ...]
    #: fp8 kernel implementation: the Triton kernel, or a Gluon one (see `KernelConfig.impl`)
    impl: tuple[Literal["triton", "gluon", "gluon_ws"], ...] = ("triton",)

    @field_validator("patterns", mode="before")
    @classmethod
    def _pattern_shorthand(cls, v: Any) -> Any:
        if isinstance(v, list | tuple):
            return [{"kind": p} if isinstance(p, str) else p for p in v]
        return v

    @field_validator(
        "modes", "tiles", "block_m", "block_n", "num_warps", "num_stages", "impl", "patterns",
    )  # fmt: skip
    @classmethod
    def _non_empty_unique(cls, v: tuple[Any, ...]) -> tuple[Any, ...]:
        return unique(non_empty(v))

    @field_validator("block_m", "block_n")
    @classmethod
    def _powers_of_two(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        # The kernels' own rule, checked here so that a typo is named instead of being dropped
        # silently with the infeasible points.
        for i, b in enumerate(v):
            if not is_block_size(b):
                raise at(str(i), f"block sizes are powers of two >= 16, got {b}")
        return v

    @field_validator("patterns")
    @classmethod
    def _one_per_kind(cls, v: tuple[Pattern, ...]) -> tuple[Pattern, ...]:
        unique(tuple(p.kind for p in v), "pattern kind")
        return v

    @field_validator("sparsities")
    @classmethod
    def _sparsity_buckets(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        for i, s in enumerate(v):
            if not 0.0 < s < 1.0:
                raise at(str(i), f"sparsity buckets must lie in (0, 1), got {s:g}")
        return unique(v)

    @model_validator(mode="after")
    def _buckets_for_sparse_modes(self) -> KernelSpace:
        if any(Mode(m).sparse for m in self.modes) and not self.sparsities:
            raise at("sparsities", "a sparse mode is listed, so give at least one bucket")
        return self

    @property
    def mode_enums(self) -> tuple[Mode, ...]:
        return tuple(Mode(m) for m in self.modes)


# -- schedule space --------------------------------------------------------------------------


class PhaseSpace(Frozen):
    """Phase boundaries as fractions of the denoising steps.

    Step ``s`` (0-based, of ``n``) runs bf16_dense while ``s < round(bf16_until * n)``, fp8_dense
    while ``s < round(max(bf16_until, fp8_dense_until) * n)``, and the sparse phase after that.
    ``bf16_late``: the last ``round(bf16_late * n)`` steps before the sparse phase run bf16_dense
    instead of fp8_dense (taken from the FP8 phase: for models whose FP8 error comes from the
    late steps, as the mini model's does; fixed at 0 unless the space gives it a range).
    """

    bf16_until: FloatParam = FloatParam(choices=(0.0,))
    fp8_dense_until: FloatParam = FloatParam(choices=(0.0,))
    bf16_late: FloatParam = FloatParam(choices=(0.0,))

    @field_validator("bf16_until", "fp8_dense_until", "bf16_late")
    @classmethod
    def _fraction(cls, v: FloatParam) -> FloatParam:
        v.check_bounds(0.0, 1.0)
        return v


class SparseSpace(Frozen):
    """What the sparse phase runs (fp8_sparse).

    ``splits``: the sparse phase is cut into this many equal runs of steps, each with its own
    sparsity parameter (``sparsity.0`` .. ``sparsity.{splits-1}``), so sparsity can grow over the
    phase without a free per-step grid. ``window`` (aspect choices) applies only to the window
    pattern and ``mass`` only to cdf.
    """

    splits: Annotated[int, Strict(), Field(ge=1, le=8)] = 1
    sparsity: FloatParam
    pattern: tuple[PatternKind, ...] = ("window",)
    window: tuple[tuple[Float, Float, Float], ...] = ((1.0, 1.0, 1.0),)
    mass: FloatParam = FloatParam(choices=(0.95,))
    tile: tuple[Tile, ...]

    @field_validator("pattern", "window", "tile")
    @classmethod
    def _non_empty_unique(cls, v: tuple[Any, ...]) -> tuple[Any, ...]:
        return unique(non_empty(v))

    @field_validator("window")
    @classmethod
    def _positive(cls, v: tuple[tuple[float, float, float], ...]) -> Any:
        for i, aspect in enumerate(v):
            if min(aspect) <= 0:
                raise at(str(i), f"window aspects must be positive, got {show(list(aspect))}")
        unique(tuple(aspect_key(a) for a in v), "window")
        return v

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: FloatParam) -> FloatParam:
        v.check_bounds(0.0, 1.0, hi_open=True)
        return v

    @field_validator("mass")
    @classmethod
    def _mass(cls, v: FloatParam) -> FloatParam:
        if v.bounds[0] <= 0 or v.bounds[1] > 1:
            raise ValueError(f"cdf mass must lie in (0, 1], got {v.bounds[0]:g} .. {v.bounds[1]:g}")
        return v


class LayerSpace(Frozen):
    """Which layers deviate from the phase's plan.

    In the sparse phase the first ``dense_first`` and last ``dense_last`` layers run
    ``dense_mode`` instead (fp8_dense by default: boundary layers carry the most global
    attention and suffer most from pruning, while FP8 quantisation alone costs them little).
    The layers are cut into ``groups`` contiguous groups of near-equal size; each group's sparsity
    is the phase's sparsity plus an offset (``group_offset.<g>``), clipped to the sparsity range.
    """

    dense_first: IntParam = IntParam(choices=(0,))
    dense_last: IntParam = IntParam(choices=(0,))
    dense_mode: Literal["fp8_dense", "bf16_dense"] = "fp8_dense"
    groups: Annotated[int, Strict(), Field(ge=1, le=64)] = 1
    group_offset: FloatParam = FloatParam(choices=(0.0,))

    @field_validator("dense_first", "dense_last")
    @classmethod
    def _count(cls, v: IntParam) -> IntParam:
        v.check_bounds(0, math.inf)
        return v

    @field_validator("group_offset")
    @classmethod
    def _offset(cls, v: FloatParam) -> FloatParam:
        if v.bounds[0] <= -1 or v.bounds[1] >= 1:
            raise ValueError(f"offsets must lie in (-1, 1), got {v.bounds[0]:g} .. {v.bounds[1]:g}")
        return v


class ScheduleSpace(_SourcedFrozen):
    """Schedule-level search space (``kind: schedule``); see `fpstune.stages.schedule_space`."""

    kind: Literal["schedule"]
    phases: PhaseSpace = PhaseSpace()
    sparse: SparseSpace
    layers: LayerSpace = LayerSpace()

    def modes(self) -> set[Mode]:
        """Every mode a schedule drawn from this space can run (conservatively)."""
        ph, ly = self.phases, self.layers
        dense_layers = ly.dense_first.bounds[1] > 0 or ly.dense_last.bounds[1] > 0
        out: set[Mode] = set()
        bf16 = ph.bf16_until.bounds[1] > 0 or ph.bf16_late.bounds[1] > 0
        if bf16 or (dense_layers and ly.dense_mode == "bf16_dense"):
            out.add(Mode.BF16_DENSE)
        if ph.fp8_dense_until.bounds[1] > ph.bf16_until.bounds[0] or (
            dense_layers and ly.dense_mode == "fp8_dense"
        ):
            out.add(Mode.FP8_DENSE)
        if max(ph.bf16_until.bounds[0], ph.fp8_dense_until.bounds[0]) < 1.0:
            out.add(Mode.FP8_SPARSE)
        return out


def at(field: str, message: str) -> PydanticCustomError:
    """A validation error pointing at ``field`` below the field or model that raises it."""
    return PydanticCustomError("nested", "{message}", {"message": message, "subfield": field})
