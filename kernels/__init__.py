"""fpstune's kernel runtime: FP8 + 3D-tile block-sparse attention, its reference, and policies.

Imports only torch, numpy, yaml and pydantic (Triton lazily, on first GPU call): a production
server that imports ``fpstune.kernels`` pulls in none of the tuner's dependencies.
"""

from __future__ import annotations

from .api import attention
from .config import (
    DeviceLimits,
    InfeasibleConfig,
    check_feasible,
    default_config,
    default_tile,
    infeasibility,
)
from .patterns import BlockIndex, block_index, keep_count
from .spec import AttentionSpec, KernelConfig, Mode, Pattern, SpecError
from .tiling import TileLayout

__all__ = [
    "AttentionSpec",
    "BlockIndex",
    "DeviceLimits",
    "InfeasibleConfig",
    "KernelConfig",
    "Mode",
    "Pattern",
    "SpecError",
    "TileLayout",
    "attention",
    "block_index",
    "check_feasible",
    "default_config",
    "default_tile",
    "infeasibility",
    "keep_count",
]
