"""The metrics a study may name, the quality probes that produce them, and how a bound is broken.

A schedule trial reports ``latency_ms`` (its latency source: `LATENCY_MS`, no probe's) and the
values of its quality probes. A `ProbeKind` declares one kind of probe: the metrics it produces,
each with the way it gets better; which of them a given study measures; and the factory that
builds the probe for a study on a device. A study may name a metric in an objective or a
constraint only if a registered probe produces it (`direction`, asked by `fpstune.spec.study`)
and measures it for that study (`measured`); a schedule evaluator runs the probes whose metrics
the study names (`probes_for`).

Built in:

- ``attention``: the attention output's ``rel_l2`` and ``cosine`` against BF16-dense on the
  study's calibration set (`fpstune.quality.probe.AttentionProbe`). Every study has a calibration
  set; the schedule evaluator builds this probe from it and runs it in every trial (its
  ``build`` is None).
- ``end_to_end``: ``psnr``, ``psnr_min``, ``frame_psnr`` and ``ssim`` of the videos generated with
  the policy against the BF16-dense ones (`fpstune.quality.e2e`, built by the model adapter), for
  a study with an ``end_to_end`` section.

Third-party probes plug in with `register_probe`, or without editing fpstune through the entry
point group ``fpstune.probes``: each entry point loads to a `ProbeKind` (or a factory called with
no arguments that returns one). Entry points are read once, on the first lookup; one that fails
to load is skipped with a warning. A plug-in never replaces a built-in. A probe registered by a
call exists in that process only: worker processes see the entry points.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from fpstune.plugins import load_entry_points

if TYPE_CHECKING:
    import torch

    from fpstune.quality.probe import QualityProbe
    from fpstune.spec.study import StudySpec

Direction = Literal["minimize", "maximize"]
#: ``(study, device) -> probe``, built once per worker (None: this study does not run it)
ProbeFactory = Callable[["StudySpec", "torch.device"], "QualityProbe | None"]

ENTRY_POINT_GROUP = "fpstune.probes"
#: the latency source's metric: every schedule trial reports it, from no probe
LATENCY_MS = "latency_ms"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class UnknownMetric(ValueError):
    """No registered probe produces this metric; ``str(e)`` is one line naming the probes that
    exist and their metrics."""


@dataclass(frozen=True)
class ProbeKind:
    """One kind of quality probe.

    name: what listings and errors call it. metrics: each metric a study may name, with the
    direction in which it gets better (the probe may report more values, such as ``rel_l2_max``;
    no study names those). build: the factory (`ProbeFactory`); None where the evaluator builds
    the probe itself (the attention probe, from its calibration set). measures: which of
    ``metrics`` a study measures (default: all). hint: why a study does not measure one of them,
    appended to the error that refuses it (default: nothing).
    """

    name: str
    metrics: Mapping[str, Direction]
    build: ProbeFactory | None
    measures: Callable[[StudySpec], Collection[str]] | None = None
    hint: Callable[[StudySpec, str], str | None] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"probe name {self.name!r} must match {_NAME.pattern}")
        if not self.metrics:
            raise ValueError(f"probe {self.name} declares no metrics")
        for metric, d in self.metrics.items():
            if not isinstance(metric, str) or not _NAME.match(metric):
                raise ValueError(f"probe {self.name}: metric {metric!r} must match {_NAME.pattern}")
            if d not in ("minimize", "maximize"):
                raise ValueError(
                    f"probe {self.name}: {metric} must minimize or maximize, not {d!r}"
                )
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))

    def measured(self, spec: StudySpec) -> frozenset[str]:
        return frozenset(self.metrics if self.measures is None else self.measures(spec))


# -- the registry -----------------------------------------------------------------------------

_kinds: dict[str, ProbeKind] = {}
_broken: dict[str, str] = {}  # entry point name -> why it did not load
_plugins_loaded = False
_lock = threading.RLock()


def register_probe(kind: ProbeKind, *, replace: bool = False) -> ProbeKind:
    """Add ``kind`` under its name; another probe of that name is refused unless ``replace``, and
    so is a metric another probe (or the latency source) produces. Returns ``kind``."""
    if not isinstance(kind, ProbeKind):
        raise TypeError(f"{type(kind).__name__} is not a ProbeKind")
    with _lock:
        old = _kinds.get(kind.name)
        if old is not None and old is not kind and not replace:
            raise ValueError(f"probe {kind.name!r} is already registered")
        for metric in kind.metrics:
            owner = LATENCY_MS if metric == LATENCY_MS else _owner(metric, besides=kind.name)
            if owner is not None:
                what = "the latency source" if owner == LATENCY_MS else f"probe {owner}"
                raise ValueError(f"probe {kind.name}: {metric} is already produced by {what}")
        _kinds[kind.name] = kind
    return kind


def probe_kinds() -> tuple[ProbeKind, ...]:
    """The registered probes, built-ins first."""
    _load_plugins()
    return tuple(_kinds.values())


def directions() -> dict[str, Direction]:
    """Every metric a study may name, with the direction in which it gets better."""
    out: dict[str, Direction] = {LATENCY_MS: "minimize"}
    for kind in probe_kinds():
        out.update(kind.metrics)
    return out


def direction(metric: str) -> Direction:
    """The natural direction of ``metric``; `UnknownMetric` (one line) if no probe produces it."""
    found = directions().get(metric)
    if found is not None:
        return found
    listing = "; ".join(f"{k.name}: {', '.join(k.metrics)}" for k in probe_kinds())
    broken = "".join(f"; entry point {n!r} failed to load: {why}" for n, why in _broken.items())
    raise UnknownMetric(
        f"no probe produces {metric!r} (the latency source produces {LATENCY_MS}; "
        f"probes: {listing}){broken}"
    )


def measured(spec: StudySpec) -> frozenset[str]:
    """The metrics ``spec`` measures: latency and what each probe measures for it."""
    return frozenset({LATENCY_MS}).union(*(k.measured(spec) for k in probe_kinds()))


def not_measured(spec: StudySpec, metric: str) -> str:
    """Why ``spec`` may not name ``metric`` (a metric it does not measure), in one line."""
    owner = _owner(metric)
    kind = _kinds.get(owner) if owner is not None else None
    hint = kind.hint(spec, metric) if kind is not None and kind.hint is not None else None
    return (
        f"{metric} is not measured by this study (it measures {', '.join(sorted(measured(spec)))}"
        + (f"; {hint})" if hint else ")")
    )


def probes_for(spec: StudySpec, device: torch.device) -> list[QualityProbe]:
    """The probes a schedule evaluator for ``spec`` builds: those whose metrics an objective or a
    constraint names (the attention probe aside: the evaluator builds it from its calibration)."""
    named = {o.name for o in spec.objectives} | {c.name for c in spec.constraints}
    probes = []
    for kind in probe_kinds():
        if kind.build is not None and named & kind.metrics.keys():
            probe = kind.build(spec, device)
            if probe is not None:
                probes.append(probe)
    return probes


def violation(value: float, *, max: float | None = None, min: float | None = None) -> float:
    """How far ``value`` breaks its bound (give exactly one): ``value - max`` or ``min - value``;
    Optuna's convention, feasible when <= 0."""
    if (max is None) == (min is None):
        raise ValueError("give exactly one of max or min")
    return value - max if max is not None else min - value  # type: ignore[operator]


def _owner(metric: str, *, besides: str | None = None) -> str | None:
    return next((n for n, k in _kinds.items() if metric in k.metrics and n != besides), None)


def _load_plugins() -> None:
    global _plugins_loaded
    with _lock:  # re-entrant: a plug-in module may look probes up while it loads
        if not _plugins_loaded:
            _plugins_loaded = True
            load_entry_points(ENTRY_POINT_GROUP, "probe", _add_plugin, _broken)


def _add_plugin(obj: Any) -> None:
    kind = obj if isinstance(obj, ProbeKind) else obj()
    if getattr(kind, "name", None) in _kinds:
        raise ValueError(f"probe {kind.name!r} is already registered")
    register_probe(kind)


# -- built-in probes --------------------------------------------------------------------------


def end_to_end_probe(
    spec: StudySpec, *, seeds: Sequence[int], device: torch.device | str
) -> QualityProbe:
    """The study's end-to-end quality probe over ``seeds``; an adapter that replays a capture
    (``end_to_end_from_record``) gets the replay record beside ``calibration.source``."""
    from fpstune.models import adapters
    from fpstune.models.capture import record_path

    e2e, model = spec.end_to_end, spec.model
    if e2e is None:
        raise ValueError(f"study {spec.name} has no end_to_end section")
    adapter = adapters.get(model.adapter)
    extra: dict[str, Any] = {}
    if getattr(adapter, "end_to_end_from_record", False):
        extra["record"] = str(record_path(spec.calibration.source))
    return adapter.end_to_end_probe(
        seeds=tuple(seeds),
        steps=model.steps,
        guidance=e2e.guidance,
        device=device,
        weights=e2e.weights,
        **extra,
    )


def _end_to_end_measures(spec: StudySpec) -> set[str]:
    """Pixels' psnr, psnr_min and ssim (the mini); a replayed checkpoint's latent psnr and
    psnr_min, plus its decoded frames' frame_psnr and ssim when it has a VAE."""
    from fpstune.models import adapters

    e2e = spec.end_to_end
    if e2e is None:
        return set()
    if not getattr(adapters.get(spec.model.adapter), "end_to_end_from_record", False):
        return {"psnr", "psnr_min", "ssim"}
    from fpstune.models.wan import has_vae

    vae = e2e.weights is not None and has_vae(Path(e2e.weights))
    return {"psnr", "psnr_min"} | ({"frame_psnr", "ssim"} if vae else set())


def _end_to_end_hint(spec: StudySpec, metric: str) -> str | None:
    if spec.end_to_end is None:
        return f"add an end_to_end section for {metric}"
    if metric in ("frame_psnr", "ssim"):
        return "frame_psnr and ssim need a checkpoint with a vae/ folder"
    return None


def _build_end_to_end(spec: StudySpec, device: torch.device) -> QualityProbe | None:
    e2e = spec.end_to_end
    return None if e2e is None else end_to_end_probe(spec, seeds=e2e.seeds, device=device)


ATTENTION = register_probe(
    ProbeKind(name="attention", metrics={"rel_l2": "minimize", "cosine": "maximize"}, build=None)
)
END_TO_END = register_probe(
    ProbeKind(
        name="end_to_end",
        metrics={m: "maximize" for m in ("psnr", "psnr_min", "frame_psnr", "ssim")},
        build=_build_end_to_end,
        measures=_end_to_end_measures,
        hint=_end_to_end_hint,
    )
)


__all__ = [
    "ATTENTION",
    "END_TO_END",
    "ENTRY_POINT_GROUP",
    "LATENCY_MS",
    "Direction",
    "ProbeFactory",
    "ProbeKind",
    "UnknownMetric",
    "direction",
    "directions",
    "end_to_end_probe",
    "measured",
    "not_measured",
    "probe_kinds",
    "probes_for",
    "register_probe",
    "violation",
]
