"""Kernel knobs: launch parameters beyond `KernelConfig`'s own fields, each added in one call.

`register_knob` names a knob, its choices, its default, an optional feasibility check and the
launch keyword its value travels as. From then on, with no other file edited:

- `KernelConfig.knobs` takes it (policy YAML: ``kernel: {..., knobs: {name: value}}``); the
  default is left out, so configs that do not set it keep their stored form and `key`;
- `config.infeasibility` asks its check;
- the kernel stage (`fpstune.stages.kernel_space`) searches its choices in every kernel space;
- `dispatch` passes the value (or the default) to the kernel launch as keyword ``launch``: a
  Triton launch option (``maxnreg``, ...) or a ``constexpr`` parameter the kernel declares.

A knob registered by a call exists in that process only. A package that ships knobs declares a
module in the entry-point group ``fpstune.knobs`` whose import registers them: every process that
looks a knob up (Ray workers, the production runtime loading a policy) imports it first. A policy
naming a knob no process registered is refused with the knob's name.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import DeviceLimits
    from .spec import KernelConfig, Mode, Tile

Scalar = bool | int | float | str
#: ``check(config, tile=, head_dim=, mode=, limits=)``: why ``config`` cannot run, or None
Check = Callable[..., "str | None"]

_FIELDS = ("block_m", "block_n", "num_warps", "num_stages", "impl", "knobs")


@dataclass(frozen=True)
class Knob:
    name: str
    choices: tuple[Scalar, ...]
    default: Scalar
    check: Check | None = None
    launch: str | None = None

    def reason(
        self, config: KernelConfig, *, tile: Tile, head_dim: int, mode: Mode, limits: DeviceLimits
    ) -> str | None:
        if self.check is None:
            return None
        why = self.check(config, tile=tile, head_dim=head_dim, mode=mode, limits=limits)
        return None if why is None else f"{self.name}={config.knob(self.name)!r}: {why}"


_REGISTRY: dict[str, Knob] = {}
ENTRY_POINT_GROUP = "fpstune.knobs"
_plugins_loaded = False


def _load_plugins() -> None:
    """Import the modules of the ``fpstune.knobs`` entry points (their import registers knobs)."""
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()
            except Exception as e:  # a broken plug-in must not break every attention call
                msg = f"fpstune knob entry point {ep.name!r} ({ep.value}) skipped: {e}"
                warnings.warn(msg.splitlines()[0], RuntimeWarning, stacklevel=3)


def register_knob(
    name: str,
    choices: tuple[Scalar, ...] | list[Scalar],
    default: Scalar,
    *,
    check: Check | None = None,
    launch: str | None = None,
) -> Knob:
    """Add a knob; `ValueError` for a taken name, no choices or a default not among them."""
    if not name.isidentifier() or name in _FIELDS or name in _REGISTRY:
        raise ValueError(f"knob name {name!r} is taken or not an identifier")
    if default not in choices or len(set(choices)) != len(choices):
        raise ValueError(f"knob {name}: default {default!r} must be one of distinct {choices}")
    knob = Knob(name, tuple(choices), default, check, launch)
    _REGISTRY[name] = knob
    return knob


def unregister_knob(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered() -> tuple[Knob, ...]:
    """The registered knobs in registration order (hashable: a cache key for search plans)."""
    _load_plugins()
    return tuple(_REGISTRY.values())


def get(name: str) -> Knob:
    _load_plugins()
    if name not in _REGISTRY:
        known = ", ".join(_REGISTRY) or "none"
        raise ValueError(f"unknown knob {name!r} (registered: {known})")
    return _REGISTRY[name]


def launch_options(values: Mapping[str, Scalar]) -> dict[str, Any]:
    """The launch keywords of the registered knobs: ``values``' choice, else the default."""
    _load_plugins()
    return {k.launch: values.get(k.name, k.default) for k in _REGISTRY.values() if k.launch}
