"""Quality metrics of an attention output against the BF16-dense reference output.

Both are computed from four sums over the flattened tensors, accumulated in float64 chunk by chunk
(a 14B-720p output is 387 M elements: no full float64 copy):

- ``rel_l2`` = ‖out - ref‖₂ / ‖ref‖₂ (minimise; 0 for an identical output);
- ``cosine`` = ⟨out, ref⟩ / (‖out‖₂ ‖ref‖₂) (maximise; 1 for an output parallel to the reference).

A metric is named and carries its direction, so a study's objectives and constraints can refer to
it by name; end-to-end metrics (PSNR / SSIM of generated videos) come in beside these under the
same `Metric` shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

_CHUNK = 1 << 24


@dataclass(frozen=True)
class Sums:
    """Σ(out - ref)², Σref², Σout², Σout·ref, in float64."""

    diff2: float
    ref2: float
    out2: float
    dot: float


def sums(out: torch.Tensor, ref: torch.Tensor) -> Sums:
    if out.shape != ref.shape:
        raise ValueError(
            f"output shape {tuple(out.shape)} differs from reference {tuple(ref.shape)}"
        )
    o, r = out.reshape(-1), ref.reshape(-1)
    acc = torch.zeros(4, dtype=torch.float64, device=out.device)
    for start in range(0, o.numel(), _CHUNK):
        oc = o[start : start + _CHUNK].to(torch.float64)
        rc = r[start : start + _CHUNK].to(torch.float64)
        acc += torch.stack(
            ((oc - rc).square().sum(), rc.square().sum(), oc.square().sum(), (oc * rc).sum())
        )
    d2, r2, o2, dot = acc.tolist()
    return Sums(d2, r2, o2, dot)


def rel_l2_of(s: Sums) -> float:
    if s.ref2 == 0.0:
        return 0.0 if s.diff2 == 0.0 else math.inf
    return math.sqrt(s.diff2 / s.ref2)


def cosine_of(s: Sums) -> float:
    if s.out2 == 0.0 or s.ref2 == 0.0:
        return 1.0 if s.out2 == s.ref2 else 0.0
    return s.dot / math.sqrt(s.out2 * s.ref2)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out - ref‖₂ / ‖ref‖₂ over all elements, in float64."""
    return rel_l2_of(sums(out, ref))


def cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors, in float64."""
    return cosine_of(sums(out, ref))


@dataclass(frozen=True)
class Metric:
    name: str
    direction: Literal["minimize", "maximize"]
    of_sums: Callable[[Sums], float]


METRICS: dict[str, Metric] = {
    "rel_l2": Metric("rel_l2", "minimize", rel_l2_of),
    "cosine": Metric("cosine", "maximize", cosine_of),
}


def compare(
    out: torch.Tensor, ref: torch.Tensor, names: Sequence[str] = tuple(METRICS)
) -> dict[str, float]:
    """Every metric in ``names`` from one pass over the tensors."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r} (known: {', '.join(METRICS)})")
    s = sums(out, ref)
    return {n: METRICS[n].of_sums(s) for n in names}
