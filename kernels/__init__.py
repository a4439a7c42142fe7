"""fpstune's kernel runtime: FP8 + 3D-tile block-sparse attention, its reference, and policies.

Imports only torch, numpy, yaml and pydantic (Triton lazily, on first GPU call): a production
server that imports ``fpstune.kernels`` pulls in none of the tuner's dependencies.
"""

from __future__ import annotations

if __name__ == "fpstune.kernels":
    from importlib import import_module
    from typing import TYPE_CHECKING, Any

    if TYPE_CHECKING:
        from .api import attention
        from .config import (
            DeviceLimits,
            InfeasibleConfig,
            check_feasible,
            default_config,
            default_tile,
            infeasibility,
        )
        from .fingerprint import HardwareFingerprint, current_fingerprint, same_gpu_type
        from .patterns import BlockIndex, block_index, keep_count
        from .policy import (
            ModelShape,
            Policy,
            PolicyEntry,
            PolicyError,
            PolicyWarning,
            Provenance,
        )
        from .spec import AttentionSpec, KernelConfig, Mode, Pattern, SpecError
        from .tiling import TileLayout, prompt_key_mask

    # The names above are loaded on first use (PEP 562), so that ``fpstune.kernels.spec`` (the
    # spec types, pydantic only) does not import torch: the CLI's ``--help`` and its one-line
    # errors stay fast.
    _HOME = {
        "attention": "api",
        **dict.fromkeys(
            (
                "DeviceLimits",
                "InfeasibleConfig",
                "check_feasible",
                "default_config",
                "default_tile",
                "infeasibility",
            ),
            "config",
        ),
        **dict.fromkeys(
            ("HardwareFingerprint", "current_fingerprint", "same_gpu_type"), "fingerprint"
        ),
        **dict.fromkeys(("BlockIndex", "block_index", "keep_count"), "patterns"),
        **dict.fromkeys(
            ("ModelShape", "Policy", "PolicyEntry", "PolicyError", "PolicyWarning", "Provenance"),
            "policy",
        ),
        **dict.fromkeys(("AttentionSpec", "KernelConfig", "Mode", "Pattern", "SpecError"), "spec"),
        **dict.fromkeys(("TileLayout", "prompt_key_mask"), "tiling"),
    }

    def __getattr__(name: str) -> Any:
        home = _HOME.get(name)
        if home is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(import_module(f".{home}", __name__), name)
        globals()[name] = value
        return value

else:
    # Reached as a top-level ``kernels`` because the repository root is on sys.path (``python -c``,
    # ``python -m pytest`` or a Ray worker started there). That name belongs to Hugging Face's
    # ``kernels`` package, which transformers and diffusers import: hand it over.
    from ._upstream import load_upstream

    load_upstream(__name__, __file__)

__all__ = [
    "AttentionSpec",
    "BlockIndex",
    "DeviceLimits",
    "HardwareFingerprint",
    "InfeasibleConfig",
    "KernelConfig",
    "Mode",
    "ModelShape",
    "Pattern",
    "Policy",
    "PolicyEntry",
    "PolicyError",
    "PolicyWarning",
    "Provenance",
    "SpecError",
    "TileLayout",
    "attention",
    "block_index",
    "check_feasible",
    "current_fingerprint",
    "default_config",
    "default_tile",
    "infeasibility",
    "keep_count",
    "prompt_key_mask",
    "same_gpu_type",
]
