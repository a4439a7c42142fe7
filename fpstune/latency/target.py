"""Latency of a proxy model's schedule at the deployment shape it stands in for.

The embedded mini model (960 tokens) is a quality proxy: at its size every attention call is
bound by kernel launches, so BF16 SDPA is the fastest mode there and its measured latencies say
nothing about Wan at 720p. A study can therefore name a ``latency.target`` shape: each (layer,
step) cell of the proxy's schedule is costed as the same spec at the target shape (from a latency
table measured there, best tile for the mode, sparsity bucket and pattern), and scaled by
target cells / proxy cells, so the total is the attention time of one whole generation of the
target model under the same schedule proportions. Trials say so in ``latency_method``.
"""

from __future__ import annotations

from typing import Any, Literal

from fpstune.kernels import AttentionSpec
from fpstune.kernels.fingerprint import HardwareFingerprint
from fpstune.latency.compose import CallCost, TableLatency
from fpstune.latency.shape import AttentionShape


class TargetShapeLatency:
    """Per-call costs at ``target`` (from ``inner``) times ``scale``, target / proxy cells."""

    kind: Literal["table"] = "table"

    def __init__(self, inner: TableLatency, *, target: AttentionShape, scale: float) -> None:
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.inner = inner
        self.target = target
        self.scale = scale
        self.source = inner.source

    @classmethod
    def for_model(cls, inner: TableLatency, model: Any, target: Any) -> TargetShapeLatency:
        """``model``: the proxy (batch, layers, steps); ``target``: heads, head_dim, grid,
        layers, steps of the shape it stands in for (a study's ``latency.target``)."""
        return cls(
            inner,
            target=AttentionShape.of_model(target, batch=model.batch),
            scale=(target.layers * target.steps) / (model.layers * model.steps),
        )

    @property
    def fingerprint(self) -> HardwareFingerprint:
        return self.inner.fingerprint

    def cost(self, spec: AttentionSpec, shape: AttentionShape) -> CallCost:
        # The proxy's tile and kernel config do not exist at the target grid: take the best
        # measured tile there for the same mode, sparsity bucket and pattern.
        at_target = AttentionSpec.from_dict({**spec.to_dict(), "tile": None, "kernel": None})
        c = self.inner.cost(at_target, self.target)
        return CallCost(
            c.median_ms * self.scale,
            c.iqr_ms * self.scale,
            c.used,
            f"{c.method}+at-target-x{self.scale:g}",
            c.interpolated_to,
        )


__all__ = ["TargetShapeLatency"]
