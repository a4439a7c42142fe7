"""Kernel configs: documented defaults and the pure feasibility check run before any launch.

The tuner owns configs (no ``@triton.autotune`` in the hot path). A config is feasible when its
blocks tile the 3D tile exactly, fit the GPU's shared memory and leave the accumulator a sane
register budget. `infeasibility` returns the reasons, so a search space can drop points up front.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from .dispatch import impl_infeasibility, kv_block
from .knobs import registered as registered_knobs
from .spec import KernelConfig, Mode, Tile
from .tiling import TileLayout

# Candidate tiles for `default_tile`, each 128 tokens (two 64-row blocks or one 128-row block).
# (1, 8, 16) before (1, 16, 8): same padding at 720p, half as many partly filled tiles, 1-3 %
# faster in every H100 run (docs/kernel-design.md).
_DEFAULT_TILE_CANDIDATES: tuple[Tile, ...] = (
    (1, 8, 16),
    (1, 16, 8),
    (2, 8, 8),
    (2, 4, 16),
    (2, 16, 4),
    (4, 4, 8),
    (4, 8, 4),
    (1, 4, 32),
)


@dataclass(frozen=True)
class DeviceLimits:
    """What feasibility needs to know of the GPU (defaults: H100 SXM, sm_90)."""

    smem_per_block: int = 227 * 1024
    registers_per_thread: int = 255
    capability: tuple[int, int] = (9, 0)


H100 = DeviceLimits()


def default_tile(grid: tuple[int, int, int]) -> Tile:
    """The 128-token tile with the least padding on ``grid`` (first candidate wins ties)."""
    return min(_DEFAULT_TILE_CANDIDATES, key=lambda t: TileLayout(grid, t).padded_tokens)


def default_config(tile: Tile, head_dim: int, mode: Mode) -> KernelConfig:
    """Default launch config for a tile; benchmark evidence in docs/kernel-design.md.

    fp8 (H100, 1x12x75600x128 sweeps): 64-row q blocks on 4 warps, so two CTAs share an SM and
    overlap one's softmax with the other's MMAs; 128-key blocks; 5 stages (Triton 3.6 lays out
    3 and 4 stages alike, and 5 and 6 alike: 5 prefetches deeper, 13-16 % faster than 3).
    About 1.2x the 128x128 / 8-warp config, whose two warpgroups wait for each other per block.
    bf16: 128x128 on 8 warps (one CTA per SM either way; 10 % faster than 128x64).
    """
    tokens = math.prod(tile)
    small = min(64, tokens & -tokens)  # largest power of two dividing the tile, at most 64
    wide = 128 if tokens % 128 == 0 else small
    if mode.fp8:
        return KernelConfig(block_m=small, block_n=wide, num_warps=4, num_stages=5)
    return KernelConfig(block_m=wide, block_n=wide, num_warps=8 if wide == 128 else 4, num_stages=3)


def smem_bytes(config: KernelConfig, head_dim: int, mode: Mode) -> int:
    """Shared memory the kernel's pipelined loads need: Q once, K and V per stage."""
    elt = 1 if mode.fp8 else 2
    q = config.block_m * head_dim * elt
    kv = 2 * config.block_n * head_dim * elt * config.num_stages
    return q + kv


def is_block_size(b: int) -> bool:
    """Whether ``b`` can be a kernel block dimension: a power of two >= 16."""
    return b >= 16 and not b & (b - 1)


def infeasibility(
    config: KernelConfig,
    *,
    tile: Tile,
    head_dim: int,
    mode: Mode,
    limits: DeviceLimits = H100,
) -> list[str]:
    """Reasons ``config`` cannot run ``mode`` on ``tile`` (empty when it can): the rules every
    kernel shares here, each kernel's own in `dispatch`, each registered knob's check."""
    reasons: list[str] = []
    tokens = math.prod(tile)
    for name in ("block_m", "block_n"):
        b = getattr(config, name)
        unit = kv_block(config) if name == "block_n" else b  # what must lie within one tile
        if not is_block_size(b):
            reasons.append(f"{name}={b} is not a power of two >= 16")
        elif tokens % unit:
            reasons.append(f"{name}={unit} does not divide the tile's {tokens} tokens {list(tile)}")
    if mode.fp8 and config.block_n < 32:
        # P·V contracts over block_n; Hopper's fp8 MMA takes K >= 32 (seen failing to compile
        # at 16 on the H100, Triton 3.6: docs/kernel-design.md).
        reasons.append(f"block_n={config.block_n}: fp8 P·V needs block_n >= 32")
    if head_dim not in (64, 128):
        reasons.append(f"head_dim={head_dim} is not 64 or 128")
    smem = smem_bytes(config, head_dim, mode)
    if smem > limits.smem_per_block:
        reasons.append(f"needs {smem} B of shared memory, the GPU has {limits.smem_per_block}")
    # fp32 accumulator (block_m x head_dim) + scores (block_m x block_n) spread over the threads.
    threads = 32 * config.num_warps
    regs = (config.block_m * head_dim + config.block_m * config.block_n) // threads
    if regs > limits.registers_per_thread - 32:
        reasons.append(
            f"accumulators need ~{regs} registers per thread with {config.num_warps} warps, "
            f"over the {limits.registers_per_thread - 32} left after addressing"
        )
    reasons += impl_infeasibility(config, head_dim=head_dim, mode=mode, limits=limits)
    if mode.fp8 and limits.capability < (8, 9):
        reasons.append(f"fp8 needs compute capability >= 8.9, the GPU has {limits.capability}")
    for knob in registered_knobs():
        why = knob.reason(config, tile=tile, head_dim=head_dim, mode=mode, limits=limits)
        reasons += [why] if why else []
    return reasons


class InfeasibleConfig(ValueError):
    pass


def check_feasible(
    config: KernelConfig, *, tile: Tile, head_dim: int, mode: Mode, limits: DeviceLimits = H100
) -> None:
    reasons = infeasibility(config, tile=tile, head_dim=head_dim, mode=mode, limits=limits)
    if reasons:
        raise InfeasibleConfig("kernel: " + "; ".join(reasons))


def feasible_configs(
    configs: Iterable[KernelConfig],
    *,
    tile: Tile,
    head_dim: int,
    mode: Mode,
    limits: DeviceLimits = H100,
) -> list[KernelConfig]:
    return [
        c
        for c in configs
        if not infeasibility(c, tile=tile, head_dim=head_dim, mode=mode, limits=limits)
    ]
