"""The attention call a latency is about: `AttentionShape` (batch, heads, head_dim over a latent
grid), and `resolve_spec`, the spec as the runtime runs it on that shape. No storage here: the
dashboard, the evaluators and the latency table all use these."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fpstune.kernels import AttentionSpec, Mode, default_config, default_tile


@dataclass(frozen=True)
class AttentionShape:
    """One attention call: (batch, heads, tokens, head_dim) over a (T, H, W) latent-patch grid."""

    batch: int
    heads: int
    head_dim: int
    grid: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        if min(self.batch, self.heads, self.head_dim, *self.grid) < 1 or len(self.grid) != 3:
            raise ValueError(f"attention shape needs positive sizes and a 3D grid, got {self}")

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @classmethod
    def of_model(cls, model: Any, *, batch: int = 1) -> AttentionShape:
        """From anything with ``heads``, ``head_dim`` and ``grid`` (a policy's `ModelShape`)."""
        return cls(batch=batch, heads=model.heads, head_dim=model.head_dim, grid=tuple(model.grid))

    def describe(self) -> str:
        t, h, w = self.grid
        return f"{self.batch}x{self.heads}x{self.tokens}x{self.head_dim} (grid {t}x{h}x{w})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "heads": self.heads,
            "head_dim": self.head_dim,
            "grid": list(self.grid),
            "tokens": self.tokens,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AttentionShape:
        return cls(
            batch=d["batch"], heads=d["heads"], head_dim=d["head_dim"], grid=tuple(d["grid"])
        )


def resolve_spec(spec: AttentionSpec, shape: AttentionShape) -> AttentionSpec:
    """The spec as the runtime runs it on ``shape``: tile and kernel config filled in with the
    defaults `attention()` would use; ``bf16_dense`` (torch SDPA) without either."""
    if spec.mode is Mode.BF16_DENSE:
        return AttentionSpec(mode=Mode.BF16_DENSE)
    tile = spec.tile or default_tile(shape.grid)
    kernel = spec.kernel or default_config(tile, shape.head_dim, spec.mode)
    return AttentionSpec.from_dict(
        {**spec.to_dict(), "tile": list(tile), "kernel": kernel.model_dump(mode="json")}
    )
