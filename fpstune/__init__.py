"""fpstune: tune FP8 + block-sparse attention for video diffusion transformers, and run the
result. In a diffusers pipeline: ``fpstune.apply(pipe, "policy.yaml")``."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def apply(
    target: Any, policy: Any, *, fuse_rope: bool = True, allow_other_gpu: bool = False
) -> Any:
    """Make a diffusers pipeline (or its transformer) run ``policy`` (a `Policy` or a policy
    file); see `fpstune.models.apply.apply`."""
    from fpstune.models.apply import apply as _apply

    return _apply(target, policy, fuse_rope=fuse_rope, allow_other_gpu=allow_other_gpu)


def remove(target: Any) -> Any:
    """Undo `apply`; see `fpstune.models.apply.remove`."""
    from fpstune.models.apply import remove as _remove

    return _remove(target)


__all__ = ["__version__", "apply", "remove"]
