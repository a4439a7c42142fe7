"""Entry-point plug-ins: third-party model adapters (``fpstune.adapters``) and quality probes
(``fpstune.probes``) join the registries without editing fpstune."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from importlib import metadata
from typing import Any

from fpstune.errors import one_line


def load_entry_points(
    group: str, what: str, add: Callable[[Any], None], broken: dict[str, str]
) -> None:
    """Load every entry point of ``group`` and hand what it loads to ``add``. One that fails (to
    load, or in ``add``) is skipped with a `RuntimeWarning` and noted in ``broken`` (entry point
    name -> why), so a broken plug-in never breaks every study."""
    for ep in metadata.entry_points(group=group):
        try:
            add(ep.load())
        except Exception as e:
            broken[ep.name] = f"{ep.value}: {one_line(e)}"
            warnings.warn(
                f"fpstune {what} entry point {ep.name!r} ({ep.value}) skipped: {one_line(e)}",
                RuntimeWarning,
                stacklevel=4,
            )
