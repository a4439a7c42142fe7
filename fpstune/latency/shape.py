"""The attention call a latency is about: `AttentionShape` (batch, heads, head_dim over a latent
grid, plus the text tokens of a joint text + video call), and `resolve_spec`, the spec as the
runtime runs it on that shape. No storage here: the dashboard, the evaluators and the latency
table all use these."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fpstune.kernels import AttentionSpec, Mode, default_config, default_tile


@dataclass(frozen=True)
class AttentionShape:
    """One attention call: (batch, heads, tokens, head_dim) over a (T, H, W) latent-patch grid;
    ``text``: prompt tokens in the same call (HunyuanVideo, CogVideoX: `attention(..., text=)`),
    so ``tokens`` = T·H·W + text. Whether the text sits before or after the video does not
    change the kernels' work (text tiles follow the video tiles either way)."""

    batch: int
    heads: int
    head_dim: int
    grid: tuple[int, int, int]
    text: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        object.__setattr__(self, "text", int(self.text))
        if min(self.batch, self.heads, self.head_dim, *self.grid) < 1 or len(self.grid) != 3:
            raise ValueError(f"attention shape needs positive sizes and a 3D grid, got {self}")
        if self.text < 0:
            raise ValueError(f"attention shape needs text >= 0 tokens, got {self}")

    @property
    def tokens(self) -> int:
        return math.prod(self.grid) + self.text

    @classmethod
    def of_model(cls, model: Any, *, batch: int = 1) -> AttentionShape:
        """From anything with ``heads``, ``head_dim``, ``grid`` and optionally ``text`` (a
        policy's `ModelShape`, a study's model section)."""
        return cls(
            batch=batch,
            heads=model.heads,
            head_dim=model.head_dim,
            grid=tuple(model.grid),
            text=getattr(model, "text", 0) or 0,
        )

    def describe(self) -> str:
        t, h, w = self.grid
        text = f" + {self.text} text" if self.text else ""
        return f"{self.batch}x{self.heads}x{self.tokens}x{self.head_dim} (grid {t}x{h}x{w}{text})"

    def to_dict(self) -> dict[str, Any]:
        """``text`` only when there is some, so video-only rows read as they always did."""
        d: dict[str, Any] = {
            "batch": self.batch,
            "heads": self.heads,
            "head_dim": self.head_dim,
            "grid": list(self.grid),
            "tokens": self.tokens,
        }
        if self.text:
            d["text"] = self.text
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AttentionShape:
        return cls(
            batch=d["batch"],
            heads=d["heads"],
            head_dim=d["head_dim"],
            grid=tuple(d["grid"]),
            text=d.get("text", 0),
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
