"""Kernel-level search: buckets, feasible points, and Optuna suggestions within one bucket.

The kernel stage runs one Optuna study per `KernelBucket` (a mode, and for sparse modes a
sparsity bucket and pattern). Within a bucket it searches tile x launch config, over points that
`fpstune.kernels.config.infeasibility` accepts; nothing infeasible is ever suggested.

Parameters of a bucket study (stable names, categorical over stable string keys):

- ``tile``: a tile key (``2x8x8``) among the tiles with at least one feasible config;
- ``config``: a config key (``m128_n64_w8_s3``) when every tile has the same feasible configs,
  else ``config.<tile key>`` for the chosen tile only (Optuna needs one fixed choice set per
  parameter name). A config is the space's launch parameters times the choices of every knob
  registered with `fpstune.kernels.knobs.register_knob` (its key names the knobs set off their
  default, ``m64_n128_w4_s5_<knob>-<value>``), so a new knob needs no edit here.

A parameter with a single choice is fixed and not suggested. ``bf16_dense`` runs torch SDPA on
the GPU: its bucket has one point (no tile, no config) and no parameters; it is measured as the
baseline.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

from fpstune.kernels import AttentionSpec, DeviceLimits, KernelConfig, Mode, Pattern, infeasibility
from fpstune.kernels.knobs import Knob
from fpstune.kernels.knobs import registered as registered_knobs
from fpstune.spec.loading import BadInput
from fpstune.spec.space import KernelSpace, tile_key

if TYPE_CHECKING:
    import optuna

Tile = tuple[int, int, int]
H100 = DeviceLimits()


@dataclass(frozen=True)
class KernelBucket:
    """What one kernel-stage study tunes: a mode, and for sparse modes a sparsity and pattern."""

    mode: Mode
    sparsity: float = 0.0
    pattern: Pattern | None = None

    @property
    def key(self) -> str:
        """``fp8_dense`` or ``fp8_sparse:0.9:window``: part of the study name, stable."""
        if self.pattern is None:
            return self.mode.value
        return f"{self.mode.value}:{self.sparsity:g}:{self.pattern.kind}"


Bucket = KernelBucket  # the short name the controller uses


class KernelPoint(NamedTuple):
    """One candidate of the kernel space; ``tile`` and ``config`` are None for bf16_dense."""

    mode: Mode
    sparsity: float
    pattern: Pattern | None
    tile: Tile | None
    config: KernelConfig | None

    @property
    def bucket(self) -> KernelBucket:
        return KernelBucket(self.mode, self.sparsity, self.pattern)

    @property
    def spec(self) -> AttentionSpec:
        return AttentionSpec(
            mode=self.mode,
            tile=self.tile,
            sparsity=self.sparsity,
            pattern=self.pattern,
            kernel=self.config,
        )


def kernel_buckets(
    space: KernelSpace, head_dim: int | None = None, *, limits: DeviceLimits = H100
) -> list[KernelBucket]:
    """Buckets in declaration order: modes, then sparsities, then patterns. With ``head_dim``,
    first checks that every bucket keeps a feasible point (`BadInput` naming the space file)."""
    if head_dim is not None:
        feasible_kernel_points(space, head_dim, limits=limits)
    out: list[KernelBucket] = []
    for mode in space.mode_enums:
        if not mode.sparse:
            out.append(KernelBucket(mode))
            continue
        for s in space.sparsities:
            out.extend(KernelBucket(mode, s, p) for p in space.patterns)
    return out


def feasible_kernel_points(
    space: KernelSpace,
    head_dim: int,
    *,
    limits: DeviceLimits = H100,
    file: str | None = None,
) -> list[KernelPoint]:
    """Every feasible point of the space, bucket by bucket; `BadInput` naming the space file when
    nothing survives (or when some bucket keeps no point)."""
    points: list[KernelPoint] = []
    for bucket in kernel_buckets(space):
        points.extend(bucket_points(space, head_dim, bucket, limits=limits, file=file))
    return points


def bucket_points(
    space: KernelSpace,
    head_dim: int,
    bucket: KernelBucket,
    *,
    limits: DeviceLimits = H100,
    file: str | None = None,
    prefix: str = "",
) -> list[KernelPoint]:
    """The feasible points of one bucket; `BadInput` when there are none."""
    if bucket.mode is Mode.BF16_DENSE:
        return [KernelPoint(bucket.mode, 0.0, None, None, None)]
    plan = _plan(space, head_dim, bucket.mode, limits, file or space.source, prefix)
    return [
        KernelPoint(bucket.mode, bucket.sparsity, bucket.pattern, plan.tiles[t], c)
        for t, configs in plan.configs.items()
        for c in configs.values()
    ]


def suggest_kernel(
    trial: optuna.Trial,
    space: KernelSpace,
    head_dim: int,
    bucket: KernelBucket,
    *,
    limits: DeviceLimits = H100,
) -> AttentionSpec:
    """Suggest tile x config within ``bucket``; returns the spec to measure."""
    plan = _checked_plan(space, head_dim, bucket, limits)
    if plan is None:
        return AttentionSpec(mode=bucket.mode)
    tile = _pick(trial, "tile", list(plan.tiles))
    config = _pick(trial, plan.config_param(tile), list(plan.configs[tile]))
    return plan.spec(bucket, tile, config)


def default_params(
    space: KernelSpace,
    head_dim: int,
    bucket: KernelBucket,
    grid: tuple[int, int, int],
    *,
    limits: DeviceLimits = H100,
) -> dict[str, str] | None:
    """The parameters of the runtime's own default (`default_tile`, `default_config`) for this
    bucket, or None when the space does not hold it. The kernel stage measures it first, so a
    latency table is never slower than what `attention()` runs without a policy."""
    from fpstune.kernels.config import default_config, default_tile

    plan = _checked_plan(space, head_dim, bucket, limits)
    if plan is None:
        return None
    tile = default_tile(grid)
    tkey = tile_key(tile)
    if tkey not in plan.tiles:
        return None
    config = default_config(tile, head_dim, bucket.mode)
    ckey = config.key
    if ckey not in plan.configs[tkey]:
        return None
    params = {}
    if len(plan.tiles) > 1:
        params["tile"] = tkey
    if len(plan.configs[tkey]) > 1:
        params[plan.config_param(tkey)] = ckey
    return params


def kernel_from_params(
    params: Mapping[str, Any],
    space: KernelSpace,
    head_dim: int,
    bucket: KernelBucket,
    *,
    limits: DeviceLimits = H100,
) -> AttentionSpec:
    """The spec `suggest_kernel` returned for a trial with these ``params`` (pure)."""
    plan = _checked_plan(space, head_dim, bucket, limits)
    used: set[str] = set()

    def read(name: str, choices: list[str]) -> str:
        if len(choices) == 1:
            return choices[0]
        if name not in params:
            raise ValueError(f"parameter {name!r} is missing")
        value = params[name]
        if value not in choices:
            raise ValueError(f"parameter {name}={value!r} is not one of {choices}")
        used.add(name)
        return str(value)

    if plan is None:
        spec = AttentionSpec(mode=bucket.mode)
    else:
        tile = read("tile", list(plan.tiles))
        spec = plan.spec(bucket, tile, read(plan.config_param(tile), list(plan.configs[tile])))
    extra = sorted(set(params) - used)
    if extra:
        raise ValueError(f"parameters {extra} do not belong to bucket {bucket.key}")
    return spec


# -- internals ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Feasible choices of one mode: tile key -> tile, tile key -> {config key -> config}."""

    tiles: dict[str, Tile]
    configs: dict[str, dict[str, KernelConfig]]

    @property
    def shared(self) -> bool:
        sets = {tuple(c) for c in self.configs.values()}
        return len(sets) <= 1

    def config_param(self, tile: str) -> str:
        return "config" if self.shared else f"config.{tile}"

    def spec(self, bucket: KernelBucket, tile: str, config: str) -> AttentionSpec:
        return KernelPoint(
            bucket.mode,
            bucket.sparsity,
            bucket.pattern,
            self.tiles[tile],
            self.configs[tile][config],
        ).spec


def _checked_plan(
    space: KernelSpace, head_dim: int, bucket: KernelBucket, limits: DeviceLimits
) -> _Plan | None:
    """The bucket's plan; None for bf16_dense, which has nothing to tune."""
    if bucket not in kernel_buckets(space):
        raise ValueError(f"bucket {bucket.key} is not in the kernel space {space.source}")
    if bucket.mode is Mode.BF16_DENSE:
        return None
    return _plan(space, head_dim, bucket.mode, limits, space.source, "")


def _plan(
    space: KernelSpace, head_dim: int, mode: Mode, limits: DeviceLimits, file: str, prefix: str
) -> _Plan:
    return _knob_plan(space, head_dim, mode, limits, file, prefix, registered_knobs())


@lru_cache(maxsize=64)
def _knob_plan(
    space: KernelSpace,
    head_dim: int,
    mode: Mode,
    limits: DeviceLimits,
    file: str,
    prefix: str,
    knobs: tuple[Knob, ...],
) -> _Plan:
    """`_plan` for the knobs registered now (`fpstune.kernels.knobs`): each one's choices are
    searched like a launch parameter of the space."""
    reasons: dict[str, None] = {}  # ordered set
    tiles: dict[str, Tile] = {}
    configs: dict[str, dict[str, KernelConfig]] = {}
    candidates = [
        KernelConfig(block_m=m, block_n=n, num_warps=w, num_stages=s, impl=i, knobs=dict(kv))
        for m in space.block_m
        for n in space.block_n
        for w in space.num_warps
        for s in space.num_stages
        # the kernel is an fp8 knob: bf16 keeps the default
        for i in (space.impl if mode.fp8 else ["triton"])
        for kv in itertools.product(*([(k.name, c) for c in k.choices] for k in knobs))
    ]
    for tile in space.tiles:
        ok: dict[str, KernelConfig] = {}
        for c in candidates:
            why = infeasibility(c, tile=tile, head_dim=head_dim, mode=mode, limits=limits)
            if why:
                reasons.update(dict.fromkeys(why))
            else:
                ok[c.key] = c
        if ok:
            tiles[tile_key(tile)] = tile
            configs[tile_key(tile)] = ok
    if not tiles:
        shown = list(reasons)[:4]
        more = f" (and {len(reasons) - 4} more)" if len(reasons) > 4 else ""
        raise BadInput(
            file,
            prefix.rstrip("."),
            f"kernel space is empty after removing infeasible points for {mode.value} with "
            f"head_dim {head_dim}: {'; '.join(shown)}{more}",
        )
    return _Plan(tiles, configs)


def _pick(trial: optuna.Trial, name: str, choices: list[str]) -> str:
    if len(choices) == 1:
        return choices[0]
    return str(trial.suggest_categorical(name, choices))
