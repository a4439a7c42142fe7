"""One stored latency (`LatencyRow`: fingerprint, shape, resolved spec, timing statistics, source),
and the JSON form rows are exported and shipped in (`write_json` / `read_json`).

- A row's ``source`` is ``measured`` (on a GPU) or ``estimated``; queries name one, never mix them.
- The JSON form is ``{"format": "fpstune-latency", "version": 1, "source": ..., "rows": [...]}``,
  one `LatencyRow.to_dict` per row; anything else is refused with a ValueError naming the file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fpstune.kernels import AttentionSpec, KernelConfig, Mode
from fpstune.kernels.atomic import write_text
from fpstune.kernels.fingerprint import HardwareFingerprint
from fpstune.latency.shape import AttentionShape

Source = Literal["measured", "estimated"]
SOURCES: tuple[str, ...] = ("measured", "estimated")
JSON_FORMAT = "fpstune-latency"
JSON_VERSION = 1


class NoLatencyRow(LookupError):
    """No row of the requested source matches; the message names what was asked for."""


@dataclass(frozen=True)
class LatencyRow:
    """One stored latency. ``spec`` is resolved (see `resolve_spec`)."""

    fingerprint: HardwareFingerprint
    shape: AttentionShape
    spec: AttentionSpec
    median_ms: float
    iqr_ms: float
    reps: int
    warmup: int
    method: str
    source: Source
    study: str | None = None
    trial: int | None = None
    created: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    #: the physical card (`device_identity`): rows of one fingerprint may come from several GPUs
    gpu_uuid: str | None = None
    gpu_index: int | None = None

    @property
    def mode(self) -> Mode:
        return self.spec.mode

    @property
    def sparsity(self) -> float:
        return self.spec.sparsity

    @property
    def pattern(self) -> str | None:
        return self.spec.pattern.kind if self.spec.pattern else None

    @property
    def tile(self) -> tuple[int, int, int] | None:
        return self.spec.tile

    @property
    def kernel(self) -> KernelConfig | None:
        return self.spec.kernel

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint.model_dump(mode="json"),
            "shape": self.shape.to_dict(),
            "spec": self.spec.to_dict(),
            "median_ms": self.median_ms,
            "iqr_ms": self.iqr_ms,
            "reps": self.reps,
            "warmup": self.warmup,
            "method": self.method,
            "source": self.source,
            "study": self.study,
            "trial": self.trial,
            "created": utc(self.created).isoformat(),
            "gpu_uuid": self.gpu_uuid,
            "gpu_index": self.gpu_index,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyRow:
        return cls(
            fingerprint=HardwareFingerprint.model_validate(d["fingerprint"]),
            shape=AttentionShape.from_dict(d["shape"]),
            spec=AttentionSpec.from_dict(d["spec"]),
            median_ms=float(d["median_ms"]),
            iqr_ms=float(d["iqr_ms"]),
            reps=int(d["reps"]),
            warmup=int(d["warmup"]),
            method=str(d["method"]),
            source=check_source(d["source"]),
            study=d.get("study"),
            trial=d.get("trial"),
            created=utc(dt.datetime.fromisoformat(d["created"])),
            gpu_uuid=d.get("gpu_uuid"),
            gpu_index=d.get("gpu_index"),
        )


def write_json(path: str | os.PathLike[str], rows: Sequence[LatencyRow], source: Source) -> int:
    """Write rows of one source in the JSON form (atomically); returns the count."""
    doc = {
        "format": JSON_FORMAT,
        "version": JSON_VERSION,
        "source": source,
        "rows": [r.to_dict() for r in rows],
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(doc, indent=1, sort_keys=False) + "\n")
    return len(rows)


def read_json(path: str | os.PathLike[str]) -> list[LatencyRow]:
    """Rows of a latency JSON file; ValueError naming the file for anything malformed."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{p}: no such latency table") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not a latency table JSON: {e}") from None
    return rows_of(doc, str(p))


def rows_of(doc: Any, where: str) -> list[LatencyRow]:
    """Rows of a parsed JSON document; errors name ``where`` (the file) and the bad row."""
    if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT:
        raise ValueError(f"{where}: not a latency table (expected format {JSON_FORMAT!r})")
    if doc.get("version") != JSON_VERSION:
        raise ValueError(f"{where}: latency table version {doc.get('version')!r} is not supported")
    rows = []
    for i, d in enumerate(doc.get("rows", [])):
        try:
            rows.append(LatencyRow.from_dict(d))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: rows[{i}]: {' '.join(str(e).splitlines())}") from None
    return rows


def check_source(source: Any) -> Source:
    if source not in SOURCES:
        raise ValueError(f"latency source must be one of {', '.join(SOURCES)}, got {source!r}")
    return source  # type: ignore[no-any-return,unused-ignore]


def utc(t: dt.datetime) -> dt.datetime:
    # SQLite drops the zone; every time fpstune writes is UTC.
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)
