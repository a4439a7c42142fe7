"""What the adapters of the families served through `fpstune.apply` share: one JSON reader for
checkpoint files, and `RoutedAdapter`, the `fpstune.models.adapters.ModelAdapter` half that
follows from a family's `fpstune.models.routing.Routing` (which transformers it serves,
``install`` / ``remove``), with the loop half (capture, replay, denoising, end-to-end quality)
refused in one line (`NoModel`) until it is built for the family.

A family's adapter subclasses `RoutedAdapter` and adds ``name``, ``routing``,
``transformer_class`` (diffusers' class name), ``processor`` (fpstune's processor type, what a
bare ``remove`` takes out) and its checkpoint reading: ``read_config``, ``load_checkpoint`` and
``shape``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from fpstune.errors import BadInput, NoModel, one_line
from fpstune.models import routing
from fpstune.models.applied import undo
from fpstune.models.router import AttentionRouter
from fpstune.models.routing import Routing, unwrap

if TYPE_CHECKING:
    from fpstune.models.capture import Capture, ReplayRecord
    from fpstune.models.loop import Conditions, Sampling
    from fpstune.quality.probe import QualityProbe


def read_json(file: Path, *, what: str) -> dict[str, Any]:
    """A JSON object from ``file``; a missing or malformed file is `BadInput` naming it."""
    if not file.is_file():
        raise BadInput(f"{file}: no {what}")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{file}: not a JSON {what}: {one_line(e)}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{file}: not a JSON {what} (expected an object)")
    return data


class RoutedAdapter:
    """The routing half of a model adapter (module docstring)."""

    name: str
    end_to_end = False
    routing: Routing
    transformer_class: str
    processor: type

    def read_config(self, path: str | os.PathLike[str]) -> Mapping[str, Any]:
        raise NotImplementedError

    def load_checkpoint(
        self, path: str | os.PathLike[str], *, device: torch.device | str, dtype: torch.dtype
    ) -> tuple[Any, Any]:
        raise NotImplementedError

    def config(self, path: str | os.PathLike[str] | None) -> Mapping[str, Any]:
        if path is None:
            raise NoModel(f"adapter {self.name} needs a checkpoint directory")
        return self.read_config(path)

    def load(
        self,
        path: str | os.PathLike[str] | None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Any, Any]:
        if path is None:
            raise NoModel(f"adapter {self.name} needs a checkpoint directory")
        return self.load_checkpoint(path, device=device, dtype=dtype)

    def serves(self, transformer: Any) -> bool:
        import diffusers

        return isinstance(transformer, getattr(diffusers, self.transformer_class))

    def install(self, transformer: Any, router: AttentionRouter, *, fuse_rope: bool = True) -> int:
        return routing.install(self.routing, unwrap(transformer), router, fuse_rope)

    def remove(self, transformer: Any) -> None:
        """Undo `fpstune.apply`; a bare `install`'s processors give way to diffusers' own."""
        transformer = unwrap(transformer)
        undo(transformer)
        routing.uninstall(self.routing, transformer, self.processor)

    def _not_built(self, what: str) -> NoReturn:
        raise NoModel(
            f"adapter {self.name} has no {what} yet (capture, replay and the denoising loop are "
            "built for the Wan family only); use fpstune.apply on its diffusers pipeline"
        )

    def denoise(
        self,
        transformer: Any,
        router: AttentionRouter,
        conditions: Conditions,
        sampling: Sampling,
        *,
        on_step: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        self._not_built("denoising loop")

    def replay(
        self, transformer: Any, record: ReplayRecord, router: AttentionRouter | None = None
    ) -> torch.Tensor:
        self._not_built("replay")

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
        self._not_built("capture")

    def end_to_end_probe(
        self,
        *,
        seeds: Sequence[int],
        steps: int,
        guidance: float,
        device: torch.device | str,
        weights: str | None = None,
    ) -> QualityProbe:
        self._not_built("end-to-end quality probe")


__all__ = ["RoutedAdapter", "read_json"]
