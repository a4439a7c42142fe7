"""Quality probes: how good a policy's attention is, as named values and trial attributes.

A `QualityProbe` is built once per worker (its references cached) and asked about many policies.
`AttentionProbe` is the proxy of the service issue: on a calibration set, each (layer, step)
cell runs ``fpstune.kernels.attention`` with the policy's spec for that cell and is compared with
the BF16-dense output of the same inputs. End-to-end probes (a denoising loop scored by PSNR /
SSIM against the BF16-dense video for the same seeds) implement the same protocol and sit beside
it in the `ScheduleEvaluator`.

Sampled queries (a capture with ``max_tokens``: q holds whole ``query_box`` boxes of rows, k
and v every token): each cell runs `attention` on the full grid with the rows q does not hold
zero-filled, and only the held rows are compared. That is exact for those rows: a row's softmax
runs over the complete k and v; FP8's v scales are per channel over all tokens; k's tile scales
and tile means come from the complete k; and the row's own q tile, whose FP8 scale and (for
``topk``/``cdf``) tile mean decide its quantisation and kept kv tiles, is whole when the spec's
tile divides the box (a spec whose tile does not is refused with `CandidateError`). The zero
rows cost compute (the kernel takes one grid for q and k) but no storage.

A probe raises `CandidateError` when the policy is at fault (non-finite output, a spec the
runtime refuses) and stays usable afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fpstune.errors import one_line
from fpstune.kernels import AttentionSpec, InfeasibleConfig, Mode, SpecError, attention
from fpstune.kernels.config import default_tile
from fpstune.quality.calibration import CalibrationSet, Cell
from fpstune.quality.metrics import compare
from fpstune.stages.evaluation import CandidateError

AttentionFn = Callable[..., torch.Tensor]
REFERENCE = AttentionSpec(mode=Mode.BF16_DENSE)
_CACHE_LIMIT = 200_000  # (cell, spec) -> metrics; a few floats each


@dataclass(frozen=True)
class QualityResult:
    """``values``: name -> number (objectives and constraints name them); ``attrs``: JSON-ready."""

    values: dict[str, float]
    attrs: dict[str, Any] = field(default_factory=dict)


class QualityProbe(Protocol):
    @property
    def names(self) -> tuple[str, ...]:
        """The value names `measure` returns (checked against constraints up front)."""
        ...

    def measure(self, policy: Any) -> QualityResult: ...


class AttentionProbe:
    """Attention-output rel-L2 and cosine vs BF16-dense over the cells of a calibration set.

    values: ``rel_l2`` (mean over cells), ``rel_l2_max``, ``cosine`` (mean), ``cosine_min``.
    attrs: ``cell_rel_l2`` / ``cell_cosine`` as ``[[layer, step], value]`` pairs, and where the
    calibration came from. Metrics per (cell, spec) are cached: cells whose spec recurs across
    trials (all of bf16_dense, most of fp8_dense) are not recomputed.
    """

    names: tuple[str, ...] = ("rel_l2", "rel_l2_max", "cosine", "cosine_min")

    def __init__(
        self,
        calibration: CalibrationSet,
        *,
        device: torch.device | str = "cpu",
        attention_fn: AttentionFn = attention,
    ) -> None:
        self.device = torch.device(device)
        self.calibration = calibration.to(self.device)
        self._attention = attention_fn
        self._grid = calibration.meta.grid
        self._rows = self.calibration.query_index
        self._refs: dict[Cell, torch.Tensor] = {}
        self._cache: dict[tuple[Cell, AttentionSpec], dict[str, float]] = {}
        for cell, (q, k, v) in self.calibration:
            ref = self._held(attention(self._full(q), k, v, grid=self._grid, spec=REFERENCE))
            if not bool(torch.isfinite(ref).all()):
                layer, step = cell
                raise ValueError(
                    f"calibration set {calibration.meta.model}: the bf16_dense reference of "
                    f"layer {layer}, step {step} is not finite"
                )
            self._refs[cell] = ref

    def measure(self, policy: Any) -> QualityResult:
        per_cell: dict[Cell, dict[str, float]] = {}
        for cell in self.calibration.cells:
            layer, step = cell
            spec = policy.spec(layer=layer, step=step)
            per_cell[cell] = self._cell(cell, spec)
        rel = [m["rel_l2"] for m in per_cell.values()]
        cos = [m["cosine"] for m in per_cell.values()]
        meta = self.calibration.meta
        return QualityResult(
            values={
                "rel_l2": math.fsum(rel) / len(rel),
                "rel_l2_max": max(rel),
                "cosine": math.fsum(cos) / len(cos),
                "cosine_min": min(cos),
            },
            attrs={
                "cell_rel_l2": [[[c[0], c[1]], _round(m["rel_l2"])] for c, m in per_cell.items()],
                "cell_cosine": [[[c[0], c[1]], _round(m["cosine"])] for c, m in per_cell.items()],
                "calibration": {
                    "model": meta.model,
                    "source": meta.source,
                    "seed": meta.seed,
                    "grid": list(meta.grid),
                    "model_grid": list(meta.model_grid),
                    "batch": meta.batch,
                    "cells": len(meta.cells),
                    "queries": meta.queries,
                    "query_box": None if meta.query_box is None else list(meta.query_box),
                },
            },
        )

    def _cell(self, cell: Cell, spec: AttentionSpec) -> dict[str, float]:
        key = (cell, spec)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        layer, step = cell
        q, k, v = self.calibration.qkv(layer, step)
        where = f"layer {layer}, step {step} ({spec.describe()})"
        self._check_exact(spec, where)
        try:
            out = self._held(self._attention(self._full(q), k, v, grid=self._grid, spec=spec))
        except (SpecError, InfeasibleConfig) as e:
            raise CandidateError(f"{where}: {one_line(e)}") from None
        except Exception as e:
            if _is_compile_error(e):
                raise CandidateError(f"{where}: kernel failed: {one_line(e)}") from None
            raise
        if not bool(torch.isfinite(out).all()):
            what = "NaN" if bool(torch.isnan(out).any()) else "Inf"
            raise CandidateError(f"{where}: attention output holds {what}")
        metrics = compare(out, self._refs[cell], ("rel_l2", "cosine"))
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = metrics
        return metrics

    def _full(self, q: torch.Tensor) -> torch.Tensor:
        """q on every token of the grid: the rows the set does not hold are zero."""
        if self._rows is None:
            return q
        full = q.new_zeros(q.shape[0], q.shape[1], math.prod(self._grid), q.shape[3])
        return full.index_copy_(2, self._rows, q)

    def _held(self, out: torch.Tensor) -> torch.Tensor:
        return out if self._rows is None else out.index_select(2, self._rows)

    def _check_exact(self, spec: AttentionSpec, where: str) -> None:
        """Refuse a spec whose q tiles would straddle held and zero rows (see the module)."""
        box = self.calibration.meta.query_box
        pooled = spec.mode.sparse and spec.pattern is not None and spec.pattern.kind != "window"
        if box is None or not (spec.mode.fp8 or pooled):
            return
        tile = spec.tile or default_tile(self._grid)
        if any(b % t and b < g for b, t, g in zip(box, tile, self._grid, strict=True)):
            raise CandidateError(
                f"{where}: tile {list(tile)} does not divide the calibration set's query box "
                f"{list(box)}: its sampled query rows cannot be scored exactly (capture with a "
                "--query-box that every tile divides)"
            )


def _is_compile_error(e: Exception) -> bool:
    # Triton's errors, recognised without importing Triton (it may not be installed).
    return type(e).__module__.startswith("triton") and type(e).__name__ in (
        "CompilationError",
        "OutOfResources",
        "CompileTimeAssertionFailure",
    )


def _round(x: float) -> float:
    return float(f"{x:.6g}")
