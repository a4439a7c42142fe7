"""Pinning a policy's kernel configs to the latency rows its latency was composed from."""

from __future__ import annotations

from typing import Any

from fpstune.kernels.policy import Policy
from fpstune.kernels.spec import AttentionSpec


def pin_kernels(policy: Policy, lookups: list[dict[str, Any]]) -> Policy:
    """Give each spec the tile and kernel config its latency was composed from (``lookups``: a
    trial's ``latency_lookups``), so the exported policy runs what was timed. Used by
    ``fpstune export`` and by the dashboard's "policy this trial would export"."""
    used = {
        AttentionSpec.from_dict(lk["requested"]): AttentionSpec.from_dict(lk["used"])
        for lk in lookups
    }

    def pin(spec: AttentionSpec) -> AttentionSpec:
        u = used.get(spec)
        if u is None or u.kernel is None or (spec.tile is not None and u.tile != spec.tile):
            return spec
        return spec.model_copy(update={"tile": u.tile, "kernel": u.kernel})

    entries = [e.model_copy(update={"spec": pin(e.spec)}) for e in policy.entries]
    return policy.replace(default=pin(policy.default), entries=tuple(entries))


__all__ = ["pin_kernels"]
