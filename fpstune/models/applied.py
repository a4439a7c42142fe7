"""What `fpstune.apply` leaves on a transformer, and how it is undone: shared by `apply` and the
adapters (an adapter's ``remove`` undoes an apply without importing the apply machinery)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fpstune.kernels.policy import Policy
from fpstune.models.router import AttentionRouter

HOOK_NAME = "fpstune"


@dataclass
class Applied:
    """What `apply` installed on one transformer (``transformer._fpstune``)."""

    policy: Policy
    router: AttentionRouter
    processors: dict[str, Any]  # the processors it replaced, by module name


def installed(transformer: Any) -> Applied | None:
    """What `apply` installed on this (unwrapped) transformer, or None."""
    return getattr(transformer, "_fpstune", None)


def undo(transformer: Any) -> None:
    """Put back the processors `apply` replaced and drop its hook; nothing when not applied."""
    applied = installed(transformer)
    if applied is None:
        return
    for name, processor in applied.processors.items():
        transformer.get_submodule(name).set_processor(processor)
    transformer._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
    del transformer._fpstune
