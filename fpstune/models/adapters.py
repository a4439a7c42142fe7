"""Model adapters: what fpstune needs to know about one family of models, behind one interface.

A study's ``model.adapter`` names a `ModelAdapter` in the registry (`get`); `fpstune.apply` asks
`for_transformer` which adapter serves the transformer it was handed. Built in:

- ``synthetic``: no model at all; the study file gives the attention shape and the calibration
  set is generated. Every model operation refuses in one line (`NoModel`).
- ``mini``: the embedded mini model (`fpstune.models.mini`), the one that runs end-to-end quality.
- ``wan-diffusers``: a user's diffusers Wan 2.1 / 2.2 checkpoint from a local directory
  (`fpstune.models.wan`).
- ``hunyuanvideo``, ``hunyuanvideo-1.5`` (`fpstune.models.hunyuan`), ``cogvideox``
  (`fpstune.models.cogvideox`), ``ltx-video`` (`fpstune.models.ltx`): config, shape, load and
  `fpstune.apply` on the family's diffusers pipelines; their capture, replay and denoising loop
  are not built yet (`NoModel`).

The built-ins delegate to the modules that do the work (`wan`, `mini`, `processor`, `loop`,
`capture`, `fpstune.quality.e2e`); this module adds no model code of its own.

Third-party adapters register without editing fpstune, through the entry point group
``fpstune.adapters``: each entry point loads to an adapter object (or a class / factory called
with no arguments that returns one), registered under the adapter's own ``name``. Entry points
are read once, on the first lookup. One that fails to load is skipped; its error is what `get`
reports if a study names it. A plug-in never replaces a built-in.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, runtime_checkable

import torch

from fpstune.errors import NoModel
from fpstune.kernels.policy import ModelShape
from fpstune.models.cogvideox import CogVideoXAdapter
from fpstune.models.hunyuan import HunyuanVideo15Adapter, HunyuanVideoAdapter
from fpstune.models.ltx import LTXVideoAdapter
from fpstune.models.routing import unwrap
from fpstune.plugins import load_entry_points

if TYPE_CHECKING:
    from fpstune.models.capture import Capture, ReplayRecord
    from fpstune.models.loop import Conditions, Sampling
    from fpstune.models.router import AttentionRouter
    from fpstune.models.routing import Routing
    from fpstune.quality.probe import QualityProbe

ENTRY_POINT_GROUP = "fpstune.adapters"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class UnknownAdapter(ValueError):
    """No registered adapter has this name; ``str(e)`` is one line listing the registered ones."""


@runtime_checkable
class ModelAdapter(Protocol):
    """One family of models, as fpstune's study, capture, quality and `apply` code sees it.

    Contract:

    - ``name``: what a study's ``model.adapter`` names; unique in the registry.
    - ``end_to_end``: whether `end_to_end_probe` works (a study's ``end_to_end`` section is
      refused for an adapter without it).
    - `config` reads a checkpoint's transformer config without building the model; `shape` turns
      a config and a video size into the attention shape (`ModelShape`) studies and policies
      name. `load` builds the transformer (eval mode) and its scheduler, never downloading.
    - `serves` says whether a transformer instance (unwrapped: no pipeline, no torch.compile
      wrapper) is one of this family; `install` routes its self-attention through a router,
      `remove` restores the model's own attention. Both are idempotent.
    - `denoise`, `replay` and `capture` run the denoising loop (with an installed router; under
      a replay record; as the BF16-dense capture run); `end_to_end_probe` builds the quality
      probe of generated videos. An adapter whose probe replays a capture (class attribute
      ``end_to_end_from_record = True``) is also handed ``record``, the replay record beside
      the study's ``calibration.source``, and ``weights`` is its checkpoint directory.

    Optional: ``routing`` (a `fpstune.models.routing.Routing`), what `fpstune.apply` needs to
    install a policy in the family's pipelines; an adapter without it is refused by `apply`.

    User mistakes (a bad path, a size that does not fit) raise `fpstune.errors.BadInput`; an
    operation the adapter does not offer raises `NoModel`. Every message is one line.
    Adapters hold no per-model state: one instance serves every model and thread.
    """

    name: str
    end_to_end: bool

    def config(self, path: str | os.PathLike[str] | None) -> Mapping[str, Any]: ...

    def shape(
        self,
        config: Mapping[str, Any],
        *,
        name: str,
        height: int,
        width: int,
        frames: int,
        steps: int,
        cfg: int,
    ) -> ModelShape: ...

    def load(
        self,
        path: str | os.PathLike[str] | None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Any, Any]: ...

    def serves(self, transformer: Any) -> bool: ...

    def install(
        self, transformer: Any, router: AttentionRouter, *, fuse_rope: bool = True
    ) -> int: ...

    def remove(self, transformer: Any) -> None: ...

    def denoise(
        self,
        transformer: Any,
        router: AttentionRouter,
        conditions: Conditions,
        sampling: Sampling,
        *,
        on_step: Callable[[int], None] | None = None,
    ) -> torch.Tensor: ...

    def replay(
        self, transformer: Any, record: ReplayRecord, router: AttentionRouter | None = None
    ) -> torch.Tensor: ...

    def capture(
        self,
        transformer: Any,
        sampling: Sampling,
        conditions: Conditions,
        *,
        out: str | os.PathLike[str] | None = None,
        name: str,
        seeds: Sequence[int],
        layers: Sequence[int] | None = None,
        steps: Sequence[int] | None = None,
        max_tokens: int | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> Capture: ...

    def end_to_end_probe(
        self,
        *,
        seeds: Sequence[int],
        steps: int,
        guidance: float,
        device: torch.device | str,
        weights: str | None = None,
    ) -> QualityProbe: ...


# -- the registry -----------------------------------------------------------------------------

_registry: dict[str, ModelAdapter] = {}
_broken: dict[str, str] = {}  # entry point name -> why it did not load
_plugins_loaded = False
_lock = threading.RLock()


def register(adapter: ModelAdapter, *, replace: bool = False) -> ModelAdapter:
    """Add ``adapter`` under its ``name``; another adapter of that name is refused unless
    ``replace``. Returns ``adapter``."""
    if not isinstance(adapter, ModelAdapter):
        missing = [m for m in _MEMBERS if not hasattr(adapter, m)]
        raise TypeError(
            f"{type(adapter).__name__} is not a ModelAdapter (missing {', '.join(missing)})"
        )
    name = adapter.name
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"adapter name {name!r} must match {_NAME.pattern}")
    old = _registry.get(name)
    if old is not None and old is not adapter and not replace:
        raise ValueError(f"adapter {name!r} is already registered ({type(old).__name__})")
    _registry[name] = adapter
    return adapter


def get(name: str) -> ModelAdapter:
    """The adapter registered as ``name``; `UnknownAdapter` (one line) otherwise."""
    _load_plugins()
    adapter = _registry.get(name)
    if adapter is not None:
        return adapter
    why = f"; its entry point failed to load: {_broken[name]}" if name in _broken else ""
    raise UnknownAdapter(f"unknown adapter {name!r} (registered: {', '.join(names())}){why}")


def names() -> tuple[str, ...]:
    """The registered adapter names, sorted."""
    _load_plugins()
    return tuple(sorted(_registry))


def for_transformer(obj: Any) -> ModelAdapter | None:
    """The adapter serving ``obj`` (a diffusers pipeline, its transformer, or a torch.compile'd
    transformer), or None. The first registered that serves it wins (built-ins come first)."""
    _load_plugins()
    transformer = unwrap(obj)
    return next((a for a in _registry.values() if a.serves(transformer)), None)


def _load_plugins() -> None:
    global _plugins_loaded
    with _lock:  # re-entrant: a plug-in module may look adapters up while it loads
        if not _plugins_loaded:
            _plugins_loaded = True
            load_entry_points(ENTRY_POINT_GROUP, "adapter", _add_plugin, _broken)


def _add_plugin(obj: Any) -> None:
    # a class or a factory is called; an adapter instance is taken as it is
    adapter = obj() if isinstance(obj, type) or not isinstance(obj, ModelAdapter) else obj
    if getattr(adapter, "name", None) in _registry:
        raise ValueError(f"adapter {adapter.name!r} is already registered")
    register(adapter)


_MEMBERS = (
    "name",
    "end_to_end",
    "config",
    "shape",
    "load",
    "serves",
    "install",
    "remove",
    "denoise",
    "replay",
    "capture",
    "end_to_end_probe",
)


# -- built-in adapters ------------------------------------------------------------------------


class _WanFamily:
    """What every diffusers ``WanTransformer3DModel`` shares: routing, loop, replay, capture."""

    name = ""
    end_to_end = False

    @property
    def routing(self) -> Routing:
        from fpstune.models.processor import WAN

        return WAN

    def serves(self, transformer: Any) -> bool:
        from diffusers import WanTransformer3DModel

        return isinstance(transformer, WanTransformer3DModel)

    def install(self, transformer: Any, router: AttentionRouter, *, fuse_rope: bool = True) -> int:
        from fpstune.models.processor import install

        return install(transformer, router, fuse_rope=fuse_rope)

    def remove(self, transformer: Any) -> None:
        """What `fpstune.apply` installed is undone by `fpstune.remove`; a bare `install`'s
        processors give way to diffusers' own."""
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        from fpstune.models.applied import undo
        from fpstune.models.processor import WanSelfAttention

        undo(unwrap(transformer))
        for block in transformer.blocks:
            if isinstance(block.attn1.processor, WanSelfAttention):
                block.attn1.set_processor(WanAttnProcessor())

    def denoise(
        self,
        transformer: Any,
        router: AttentionRouter,
        conditions: Conditions,
        sampling: Sampling,
        *,
        on_step: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        from fpstune.models.loop import denoise

        return denoise(transformer, router, conditions, sampling, on_step=on_step)

    def replay(
        self, transformer: Any, record: ReplayRecord, router: AttentionRouter | None = None
    ) -> torch.Tensor:
        from fpstune.models.capture import replay

        return replay(transformer, record, router)

    def capture(
        self,
        transformer: Any,
        sampling: Sampling,
        conditions: Conditions,
        *,
        out: str | os.PathLike[str] | None = None,
        name: str,
        seeds: Sequence[int],
        layers: Sequence[int] | None = None,
        steps: Sequence[int] | None = None,
        max_tokens: int | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> Capture:
        from fpstune.models.capture import capture

        return capture(
            transformer,
            sampling,
            conditions,
            out=out,
            name=name,
            seeds=seeds,
            layers=layers,
            steps=steps,
            max_tokens=max_tokens,
            on_step=on_step,
        )

    def end_to_end_probe(
        self,
        *,
        seeds: Sequence[int],
        steps: int,
        guidance: float,
        device: torch.device | str,
        weights: str | None = None,
    ) -> QualityProbe:
        raise NoModel(
            f"adapter {self.name} does not run end-to-end quality; capture a calibration set "
            "with `fpstune capture` instead"
        )


class WanDiffusersAdapter(_WanFamily):
    """A diffusers-format Wan checkpoint directory (`fpstune.models.wan`): 2.1, 2.2's TI2V-5B;
    `fpstune.apply` also serves the two-expert A14B and the I2V pipelines. Its end-to-end
    quality replays a capture's record (`fpstune.quality.e2e.replay_probe`): ``weights`` is the
    checkpoint directory, ``record`` the replay record; steps and guidance are the record's."""

    name = "wan-diffusers"
    end_to_end = True
    end_to_end_from_record = True

    def end_to_end_probe(
        self,
        *,
        seeds: Sequence[int],
        steps: int,
        guidance: float,
        device: torch.device | str,
        weights: str | None = None,
        record: str | os.PathLike[str] | None = None,
    ) -> QualityProbe:
        from fpstune.quality.e2e import replay_probe

        if weights is None or record is None:
            raise NoModel(
                f"adapter {self.name} runs end-to-end quality from a checkpoint directory "
                "(end_to_end.weights) and a capture's replay record"
            )
        return replay_probe(checkpoint=weights, record=record, seeds=tuple(seeds), device=device)

    def config(self, path: str | os.PathLike[str] | None) -> Mapping[str, Any]:
        """The transformer config, plus the VAE's compression when the checkpoint has a VAE
        (`fpstune.models.wan.checkpoint_config`: TI2V-5B's VAE is 16 x, not 8 x, spatially)."""
        from fpstune.models.wan import checkpoint_config

        if path is None:
            raise NoModel(f"adapter {self.name} needs a checkpoint directory")
        return checkpoint_config(Path(path))

    def shape(
        self,
        config: Mapping[str, Any],
        *,
        name: str,
        height: int,
        width: int,
        frames: int,
        steps: int,
        cfg: int,
    ) -> ModelShape:
        from fpstune.models.wan import model_shape

        return model_shape(
            config, name=name, height=height, width=width, frames=frames, steps=steps, cfg=cfg
        )

    def load(
        self,
        path: str | os.PathLike[str] | None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Any, Any]:
        from fpstune.models.wan import load_wan

        if path is None:
            raise NoModel(f"adapter {self.name} needs a checkpoint directory")
        return load_wan(path, device=device, dtype=dtype)


class MiniAdapter(_WanFamily):
    """The embedded mini model (`fpstune.models.mini`): pixels modelled directly (no VAE), so its
    shape is the Wan shape at a VAE scale of 1; ``path`` is a weights file (default: packaged)."""

    name = "mini"
    end_to_end = True

    def config(self, path: str | os.PathLike[str] | None) -> Mapping[str, Any]:
        from fpstune.models.mini import MINI_CONFIG

        return dict(MINI_CONFIG)

    def shape(
        self,
        config: Mapping[str, Any],
        *,
        name: str,
        height: int,
        width: int,
        frames: int,
        steps: int,
        cfg: int,
    ) -> ModelShape:
        from fpstune.models.wan import VaeScale, model_shape

        return model_shape(
            config,
            name=name,
            height=height,
            width=width,
            frames=frames,
            steps=steps,
            cfg=cfg,
            scale=VaeScale(temporal=1, spatial=1),
        )

    def load(
        self,
        path: str | os.PathLike[str] | None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Any, Any]:
        from fpstune.models.mini import build_mini, sampling

        model = build_mini(weights=None if path is None else Path(path), device=device)
        return model.to(dtype=dtype), sampling().scheduler

    def serves(self, transformer: Any) -> bool:
        from fpstune.models.mini import MINI_CONFIG

        if not super().serves(transformer):
            return False
        config = transformer.config
        return all(_same(config.get(k), v) for k, v in MINI_CONFIG.items())

    def end_to_end_probe(
        self,
        *,
        seeds: Sequence[int],
        steps: int,
        guidance: float,
        device: torch.device | str,
        weights: str | None = None,
    ) -> QualityProbe:
        from fpstune.quality.e2e import mini_probe

        return mini_probe(
            seeds=tuple(seeds), steps=steps, guidance=guidance, device=device, weights=weights
        )


class SyntheticAdapter:
    """No model: the study gives the attention shape and the calibration set is generated.
    It serves no transformer; every model operation is refused in one line (`NoModel`)."""

    name = "synthetic"
    end_to_end = False

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NoModel(
            "adapter synthetic has no model (its attention inputs are generated); "
            "name mini or a checkpoint adapter such as wan-diffusers"
        )

    config = shape = load = install = remove = denoise = replay = capture = _refuse
    end_to_end_probe = _refuse

    def serves(self, transformer: Any) -> bool:
        return False


def _same(have: Any, want: Any) -> bool:
    # diffusers stores tuples from the config as lists
    return list(have) == list(want) if isinstance(want, tuple) else bool(have == want)


for _builtin in (
    SyntheticAdapter(),
    MiniAdapter(),
    WanDiffusersAdapter(),
    HunyuanVideoAdapter(),
    HunyuanVideo15Adapter(),
    CogVideoXAdapter(),
    LTXVideoAdapter(),
):
    register(_builtin)


__all__ = [
    "ENTRY_POINT_GROUP",
    "CogVideoXAdapter",
    "HunyuanVideo15Adapter",
    "HunyuanVideoAdapter",
    "LTXVideoAdapter",
    "MiniAdapter",
    "ModelAdapter",
    "NoModel",
    "SyntheticAdapter",
    "UnknownAdapter",
    "WanDiffusersAdapter",
    "for_transformer",
    "get",
    "names",
    "register",
    "unwrap",
]
