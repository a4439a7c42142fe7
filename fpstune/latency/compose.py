"""A policy's attention latency, composed from per-call latencies: Σ over steps x layers of the
latency of ``policy.spec(layer=, step=)`` on the model's attention shape, times the CFG passes.

Per-call latencies come from one `CallLatency` source, never two:
- `TableLatency`: rows of a `LatencyTable` made on one exact fingerprint, of one row source
  (``measured`` or ``estimated``). Lookup rules:
  * ``bf16_dense`` uses its own row (torch SDPA; no tile, no kernel config);
  * a tile the spec names must match; a spec that leaves the tile to the runtime (tile None, as
    the schedule space writes fp8_dense) takes the best stored tile;
  * likewise a kernel config the spec names must match, else the best stored config;
    the lookup reports the row it used (`Lookup.to_dict` ``used``), so an exporter can pin the
    tile and config in the policy and the runtime runs what was costed;
  * sparse modes must match the pattern kind; sparsity buckets are never extrapolated. With
    ``sparsity_rule="floor"`` (default) a spec takes the nearest bucket *at or below* its
    sparsity: sparsity is the fraction of kv tiles skipped, so a lower bucket does at least as
    much work and the composed latency is an upper bound off the buckets (conservative). With
    ``"interpolate"`` it is linear between the two neighbouring buckets. A sparsity below every
    bucket (or above every bucket, when interpolating) is an error.
- `MeasuredLatency`: each distinct spec timed on this GPU (cached), on random inputs of the shape.

A missing row raises `NoLatencyRow` naming the shape, mode, sparsity and fingerprint.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from fpstune import trial_attrs
from fpstune.kernels import AttentionSpec, Mode
from fpstune.kernels.fingerprint import HardwareFingerprint, current_fingerprint
from fpstune.latency.measure import MIN_SAMPLE_MS, measure, warm_gpu
from fpstune.latency.rows import NoLatencyRow, Source
from fpstune.latency.shape import AttentionShape, resolve_spec
from fpstune.latency.table import LatencyTable

if TYPE_CHECKING:
    import torch

_EPS = 1e-6


@dataclass(frozen=True)
class CallCost:
    """The latency of one attention call as a source answers it, and what it actually looked up
    (``used``: the resolved spec of the row or the timed call, e.g. the sparsity bucket)."""

    median_ms: float
    iqr_ms: float
    used: AttentionSpec
    method: str
    interpolated_to: AttentionSpec | None = None  # the upper bucket's row, when interpolated


class CallLatency(Protocol):
    """Where per-call latencies come from. ``kind`` is ``table`` or ``measured``; ``fingerprint``
    is the hardware the figures were made on."""

    @property
    def kind(self) -> Literal["table", "measured"]: ...

    @property
    def fingerprint(self) -> HardwareFingerprint: ...

    def cost(self, spec: AttentionSpec, shape: AttentionShape) -> CallCost: ...


@dataclass(frozen=True)
class Lookup:
    requested: AttentionSpec
    cost: CallCost
    calls: int  # attention calls of the policy that ran this spec (cells x cfg)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested.to_dict(),
            "used": self.cost.used.to_dict(),
            **(
                {"interpolated_to": self.cost.interpolated_to.to_dict()}
                if self.cost.interpolated_to is not None
                else {}
            ),
            "median_ms": self.cost.median_ms,
            "method": self.cost.method,
            "calls": self.calls,
        }


@dataclass(frozen=True)
class ComposedLatency:
    """total_ms = Σ by_mode; ``source`` is ``table`` or ``measured``; ``row_source`` says whether
    the table's rows were measured or estimated (``measured`` for a `MeasuredLatency`)."""

    total_ms: float
    by_mode: dict[str, float]
    calls_by_mode: dict[str, int]
    source: Literal["table", "measured"]
    row_source: Source
    fingerprint: HardwareFingerprint
    shape: AttentionShape
    lookups: tuple[Lookup, ...] = field(default=())
    # the shape the per-call costs were looked up at, when not ``shape`` (`latency.target`)
    target: AttentionShape | None = None

    def attrs(self) -> dict[str, Any]:
        """JSON-ready trial attributes (the dashboard's latency breakdown)."""
        return {
            trial_attrs.LATENCY_SOURCE: self.source,
            trial_attrs.LATENCY_ROW_SOURCE: self.row_source,
            trial_attrs.LATENCY_FINGERPRINT: self.fingerprint.model_dump(mode="json"),
            "latency_by_mode_ms": dict(self.by_mode),
            "calls_by_mode": dict(self.calls_by_mode),
            trial_attrs.LATENCY_LOOKUPS: [lk.to_dict() for lk in self.lookups],
            **({"latency_target": self.target.to_dict()} if self.target is not None else {}),
        }


def latency_provenance(composed: ComposedLatency, *, here: str) -> str:
    """Where a composed latency's figures were made, against the machine ``here`` ("cpu" or a
    GPU name) that composed them: ``from table measured on NVIDIA H100 80GB HBM3 (not this
    machine: cpu)``, or ``measured on NVIDIA H200 (this machine)``."""
    measured_on = composed.fingerprint.gpu
    what = "from table measured on" if composed.source == "table" else "measured on"
    if composed.row_source != "measured":
        what = f"from table of {composed.row_source} rows for"
    where = "this machine" if measured_on == here else f"not this machine: {here}"
    return f"{what} {measured_on} ({where})"


def compose(
    policy: Any,
    table: LatencyTable,
    *,
    fingerprint: HardwareFingerprint,
    source: Source = "measured",
    batch: int = 1,
    sparsity_rule: Literal["floor", "interpolate"] = "floor",
) -> ComposedLatency:
    """A policy's latency from ``table`` rows of exactly ``fingerprint`` and one ``source``."""
    per_call = TableLatency(
        table, fingerprint=fingerprint, source=source, sparsity_rule=sparsity_rule
    )
    return compose_with(policy, per_call, batch=batch)


def compose_with(policy: Any, per_call: CallLatency, *, batch: int = 1) -> ComposedLatency:
    """Compose with any per-call source. ``policy``: a `fpstune.kernels.policy.Policy` (``model``
    with heads/head_dim/grid/cfg and ``spec_table()``)."""
    shape = AttentionShape.of_model(policy.model, batch=batch)
    cfg = int(policy.model.cfg)
    counts = Counter(spec for row in policy.spec_table() for spec in row)
    by_mode: dict[str, float] = {}
    calls_by_mode: dict[str, int] = {}
    lookups = []
    for spec, cells in counts.items():
        cost = per_call.cost(spec, shape)
        calls = cells * cfg
        mode = spec.mode.value
        by_mode[mode] = by_mode.get(mode, 0.0) + cost.median_ms * calls
        calls_by_mode[mode] = calls_by_mode.get(mode, 0) + calls
        lookups.append(Lookup(requested=spec, cost=cost, calls=calls))
    return ComposedLatency(
        total_ms=sum(by_mode.values()),
        by_mode=by_mode,
        calls_by_mode=calls_by_mode,
        source=per_call.kind,
        row_source=getattr(per_call, "source", "measured"),
        fingerprint=per_call.fingerprint,
        shape=shape,
        lookups=tuple(lookups),
        target=getattr(per_call, "target", None),
    )


class TableLatency:
    """Per-call latencies from a latency table, rows of one exact fingerprint and one source."""

    kind: Literal["table"] = "table"

    def __init__(
        self,
        table: LatencyTable,
        *,
        fingerprint: HardwareFingerprint,
        source: Source = "measured",
        sparsity_rule: Literal["floor", "interpolate"] = "floor",
    ) -> None:
        if sparsity_rule not in ("floor", "interpolate"):
            raise ValueError(f"sparsity_rule must be floor or interpolate, got {sparsity_rule!r}")
        self.table = table
        self.fingerprint = fingerprint
        self.source: Source = source
        self.sparsity_rule = sparsity_rule
        self._cache: dict[tuple[AttentionSpec, AttentionShape], CallCost] = {}

    def cost(self, spec: AttentionSpec, shape: AttentionShape) -> CallCost:
        key = (spec, shape)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._lookup(spec, shape)
        return hit

    def _lookup(self, spec: AttentionSpec, shape: AttentionShape) -> CallCost:
        common: dict[str, Any] = {"gpu": self.fingerprint, "source": self.source, "exact": True}
        if spec.mode is Mode.BF16_DENSE:
            row = self.table.best(shape, spec.mode, 0.0, **common)
            return CallCost(row.median_ms, row.iqr_ms, row.spec, row.method)
        common["tile"] = tuple(spec.tile) if spec.tile else None
        common["kernel"] = spec.kernel
        if not spec.mode.sparse:
            row = self.table.best(shape, spec.mode, 0.0, **common)
            return CallCost(row.median_ms, row.iqr_ms, row.spec, row.method)
        assert spec.pattern is not None
        common["pattern"] = spec.pattern.kind
        buckets = self.table.sparsities(shape, spec.mode, **common)
        s = spec.sparsity
        below = [b for b in buckets if b <= s + _EPS]
        above = [b for b in buckets if b >= s - _EPS]
        if not below or (self.sparsity_rule == "interpolate" and not above):
            side = "at or below" if not below else "at or above"
            raise NoLatencyRow(
                f"{self._no_row(spec, shape)}: no sparsity bucket {side} it "
                f"(buckets: {', '.join(f'{b:g}' for b in buckets) or 'none'})"
            )
        lo = self.table.best(shape, spec.mode, max(below), **common)
        if self.sparsity_rule == "floor" or abs(max(below) - s) <= _EPS:
            return CallCost(lo.median_ms, lo.iqr_ms, lo.spec, lo.method)
        hi = self.table.best(shape, spec.mode, min(above), **common)
        w = (s - lo.sparsity) / (hi.sparsity - lo.sparsity)
        return CallCost(
            (1 - w) * lo.median_ms + w * hi.median_ms,
            (1 - w) * lo.iqr_ms + w * hi.iqr_ms,
            lo.spec,
            lo.method,
            interpolated_to=hi.spec,
        )

    def _no_row(self, spec: AttentionSpec, shape: AttentionShape) -> str:
        fp = self.fingerprint
        what = f"pattern {spec.pattern.kind}, " if spec.pattern else ""
        what += f"tile {list(spec.tile)}" if spec.tile else "any tile"
        return (
            f"no {self.source} latency for shape {shape.describe()}, mode {spec.mode.value}, "
            f"sparsity {spec.sparsity:g} ({what}) on fingerprint gpu={fp.gpu}, "
            f"sm_count={fp.sm_count}, capability={fp.capability[0]}.{fp.capability[1]}"
        )


class MeasuredLatency:
    """Per-call latencies timed on this GPU, each distinct (resolved spec, shape) once.

    Inputs are seeded standard-normal bf16; data-dependent patterns (``topk``, ``cdf``) are timed
    on them, which for ``cdf`` may keep a different number of tiles than real activations would.
    ``allow_cpu`` (smoke tests only) times the reference on a CPU: ``cpu-wallclock`` figures under
    the CPU fingerprint, never a GPU latency.
    """

    kind: Literal["measured"] = "measured"
    source: Source = "measured"

    def __init__(
        self,
        device: torch.device | str,
        *,
        warmup: int = 10,
        reps: int = 30,
        seed: int = 0,
        allow_cpu: bool = False,
        min_sample_ms: float = MIN_SAMPLE_MS,
    ) -> None:
        import torch

        self.device = torch.device(device)
        self.min_sample_ms = min_sample_ms
        if self.device.type != "cuda" and not allow_cpu:
            raise ValueError(
                f"measured latency needs a CUDA GPU; device is {self.device} "
                "(use a latency table on a CPU worker)"
            )
        self.warmup, self.reps, self.seed = warmup, reps, seed
        self.fingerprint = current_fingerprint(self.device)
        warm_gpu(self.device)
        self._cache: dict[tuple[AttentionSpec, AttentionShape], CallCost] = {}
        self._inputs: dict[AttentionShape, tuple[torch.Tensor, ...]] = {}

    def cost(self, spec: AttentionSpec, shape: AttentionShape) -> CallCost:
        used = resolve_spec(spec, shape)
        key = (used, shape)
        hit = self._cache.get(key)
        if hit is None:
            from fpstune.kernels import attention  # torch: only where a call is measured

            q, k, v = self._qkv(shape)
            timing = measure(
                lambda: attention(q, k, v, grid=shape.grid, spec=used, text=shape.text),
                warmup=self.warmup,
                reps=self.reps,
                device=self.device,
                min_sample_ms=self.min_sample_ms,
            )
            hit = CallCost(timing.median_ms, timing.iqr_ms, used, timing.method)
            self._cache[key] = hit
        return hit

    def _qkv(self, shape: AttentionShape) -> tuple[torch.Tensor, ...]:
        import torch

        if shape not in self._inputs:
            self._inputs.clear()  # one shape at a time: these can be GBs
            gen = torch.Generator(device=self.device).manual_seed(self.seed)
            dims = (shape.batch, shape.heads, shape.tokens, shape.head_dim)
            self._inputs[shape] = tuple(
                torch.randn(dims, generator=gen, device=self.device).to(torch.bfloat16)
                for _ in range(3)
            )
        return self._inputs[shape]
