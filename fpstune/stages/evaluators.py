"""The evaluators a worker runs: one per stage, built once per worker and reused across trials.

- `KernelEvaluator` (kernel stage): times one attention call of the study's shape with the
  candidate's spec on this GPU. `KernelCandidate` -> ``latency_ms`` (median), timing statistics
  and the fingerprint in attrs; the attrs hold all a latency-table row needs
  (`LatencyTable.record_evaluation`).
- `ScheduleEvaluator` (schedule stage): `ScheduleCandidate` -> ``latency_ms`` composed from
  one latency source (a table of one fingerprint, or measured on this GPU: never mixed) and
  quality values from its probes (attention-output rel-L2 / cosine on a calibration set;
  end-to-end probes plug in beside it), constraints as value - max.

Both raise `CandidateError` for a candidate at fault and stay usable; set-up mistakes (no GPU
for the kernel stage, an unknown constraint, a table without the model's shape) are ValueErrors
at construction, before any trial runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from fpstune import trial_attrs
from fpstune.errors import one_line
from fpstune.kernels import (
    AttentionSpec,
    DeviceLimits,
    InfeasibleConfig,
    Mode,
    SpecError,
    attention,
    infeasibility,
)
from fpstune.kernels.fingerprint import HardwareFingerprint, current_fingerprint, same_gpu_type
from fpstune.latency.compose import (
    CallLatency,
    MeasuredLatency,
    TableLatency,
    compose_with,
    latency_provenance,
)
from fpstune.latency.measure import CPU_METHOD, GPU_WARMUP_S, measure, warm_gpu
from fpstune.latency.rows import NoLatencyRow
from fpstune.latency.shape import AttentionShape, resolve_spec
from fpstune.latency.shipped import gpu_slug, packaged_table, shipped_tables
from fpstune.latency.table import LatencyTable
from fpstune.latency.target import TargetShapeLatency
from fpstune.quality import registry
from fpstune.quality.calibration import (
    CalibrationSet,
    check_fits,
    load_calibration,
    synthetic_calibration,
)
from fpstune.quality.probe import AttentionProbe, QualityProbe
from fpstune.stages.evaluation import CandidateError, Evaluation

if TYPE_CHECKING:
    from fpstune.kernels.policy import Policy
    from fpstune.spec.study import StudySpec
    from fpstune.stages.candidates import KernelCandidate, ScheduleCandidate

LATENCY = "latency_ms"
_MODEL_FIELDS = ("heads", "head_dim", "layers", "grid", "steps", "cfg")
_MAX_ROTATE_SETS = 64
_MAX_ROTATE_BYTES = 4 << 30


class KernelEvaluator:
    """Measured latency of one attention call on this GPU.

    shape: the study's attention shape; warmup/reps: see `measure`; rotate_inputs: cycle
    through enough copies of q, k, v to fill twice the L2 cache (at least two), else flush L2
    before every rep. ``allow_cpu`` is for tests only: it times the PyTorch reference with the
    CPU wall clock, labelled ``cpu-wallclock`` under the CPU fingerprint.
    """

    def __init__(
        self,
        shape: AttentionShape,
        *,
        device: torch.device | str,
        warmup: int = 10,
        reps: int = 50,
        rotate_inputs: bool = True,
        seed: int = 0,
        allow_cpu: bool = False,
        gpu_warmup_s: float = GPU_WARMUP_S,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda" and not allow_cpu:
            raise ValueError(
                f"the kernel stage measures GPU latency and needs a CUDA device; got {self.device}"
            )
        warm_gpu(self.device, seconds=gpu_warmup_s)
        self.shape = shape
        self.warmup, self.reps = warmup, reps
        self.rotate_inputs = rotate_inputs
        self.seed = seed
        self.fingerprint = current_fingerprint(self.device)
        self.limits = _device_limits(self.device)
        self._sets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def evaluate(self, candidate: KernelCandidate) -> Evaluation:
        run = resolve_spec(candidate.spec, self.shape)
        if run.kernel is not None and run.tile is not None:
            reasons = infeasibility(
                run.kernel,
                tile=run.tile,
                head_dim=self.shape.head_dim,
                mode=run.mode,
                limits=self.limits,
            )
            if reasons:
                raise CandidateError("infeasible: " + "; ".join(reasons))
        sets = self._inputs()
        grid, text = self.shape.grid, self.shape.text

        def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return attention(q, k, v, grid=grid, spec=run, text=text)

        out = _run_checked(lambda: call(*sets[0]), what=run.describe())
        if not bool(torch.isfinite(out).all()):
            raise CandidateError(f"{run.describe()}: attention output is not finite")
        del out
        timing = _run_checked(
            lambda: measure(
                call if len(sets) > 1 else lambda: call(*sets[0]),
                warmup=self.warmup,
                reps=self.reps,
                rotate=sets if len(sets) > 1 else None,
                flush_l2=len(sets) == 1,
                device=self.device,
            ),
            what=run.describe(),
        )
        return Evaluation(
            values={LATENCY: timing.median_ms},
            attrs={
                trial_attrs.LATENCY_SOURCE: "measured",
                "median_ms": timing.median_ms,
                "iqr_ms": timing.iqr_ms,
                "relative_iqr": timing.relative_iqr,
                "reps": timing.reps,
                "warmup": timing.warmup,
                "method": timing.method,
                "fingerprint": self.fingerprint.model_dump(mode="json"),
                "shape": self.shape.to_dict(),
                "spec": run.to_dict(),
            },
        )

    def _inputs(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self._sets:
            return self._sets
        s = self.shape
        dims = (s.batch, s.heads, s.tokens, s.head_dim)
        set_bytes = 3 * math.prod(dims) * 2
        n = 1
        if self.rotate_inputs and self.device.type == "cuda":
            l2 = int(getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0))
            n = max(2, math.ceil(2 * max(l2, 1) / set_bytes))
            n = min(n, _MAX_ROTATE_SETS, max(2, _MAX_ROTATE_BYTES // set_bytes))
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        for _ in range(n):
            q, k, v = (
                torch.randn(dims, generator=gen, device=self.device, dtype=torch.bfloat16)
                for _ in range(3)
            )
            self._sets.append((q, k, v))
        return self._sets


class ScheduleEvaluator:
    """Latency and quality of a schedule (a policy) for one model.

    model: the policy's model section (`ModelShape`); candidates for another shape are refused.
    calibration: Q/K/V for the attention-output probe (None: only ``probes`` score quality).
    latency: a per-call source (`TableLatency` over a table and one fingerprint) or
      ``"measure"``: each distinct spec timed on this GPU.
    constraints: ``{name, max}`` (violation value - max) or ``{name, min}`` (min - value); a
      study's `Constraint` objects work too. Names must be values this evaluator produces.
    probes: more quality probes (end-to-end PSNR / SSIM), beside the attention probe.
    batch: the batch of one attention pass (the study's ``model.batch``).
    """

    def __init__(
        self,
        model: Any,
        calibration: CalibrationSet | None,
        *,
        latency: CallLatency | Literal["measure"],
        constraints: Sequence[Any] = (),
        device: torch.device | str = "cpu",
        batch: int = 1,
        probes: Sequence[QualityProbe] = (),
        measure_warmup: int = 10,
        measure_reps: int = 30,
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.batch = batch
        #: the machine trials are evaluated on ("cpu" or the GPU's name), for provenance
        self.machine = current_fingerprint(self.device).gpu
        self.probes: list[QualityProbe] = []
        if calibration is not None:
            check_fits(calibration, model)
            self.probes.append(AttentionProbe(calibration, device=self.device))
        self.probes.extend(probes)
        if not self.probes:
            raise ValueError("a schedule evaluator needs a calibration set or a quality probe")
        names = [LATENCY] + [n for p in self.probes for n in p.names]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"quality probes report {dup[0]!r} twice")
        self.names = tuple(names)
        self.constraints = [_constraint(c, self.names) for c in constraints]
        if latency == "measure":
            self.latency: CallLatency = MeasuredLatency(
                self.device, warmup=measure_warmup, reps=measure_reps
            )
        else:
            self.latency = latency
            if latency.kind == "table":
                shape = AttentionShape.of_model(model, batch=batch)
                try:
                    latency.cost(AttentionSpec(mode=Mode.BF16_DENSE), shape)
                except NoLatencyRow as e:
                    raise ValueError(f"latency table cannot serve this model: {e}") from None

    def evaluate(self, candidate: ScheduleCandidate) -> Evaluation:
        policy = self._check_model(candidate.policy)
        try:
            composed = compose_with(policy, self.latency, batch=self.batch)
        except NoLatencyRow as e:
            raise CandidateError(str(e)) from None
        values: dict[str, float] = {LATENCY: composed.total_ms}
        attrs: dict[str, Any] = composed.attrs()
        attrs[trial_attrs.LATENCY_PROVENANCE] = latency_provenance(composed, here=self.machine)
        for probe in self.probes:
            result = probe.measure(policy)
            values.update(result.values)
            attrs.update(result.attrs)
        constraints = {name: bound(values[name]) for name, bound in self.constraints}
        attrs["metrics"] = dict(values)
        return Evaluation(values=values, constraints=constraints, attrs=attrs)

    def _check_model(self, policy: Policy) -> Policy:
        for name in _MODEL_FIELDS:
            ours, theirs = _plain(getattr(self.model, name)), _plain(getattr(policy.model, name))
            if ours != theirs:
                raise CandidateError(
                    f"policy model.{name} is {theirs}, this evaluator's model has {ours}"
                )
        return policy


def build_schedule_evaluator(
    spec: StudySpec,
    *,
    device: torch.device | str,
    latency_table: LatencyTable | None = None,
    latency: Literal["auto", "table", "measure"] = "auto",
) -> ScheduleEvaluator:
    """The evaluator a schedule-stage worker runs, from the study file.

    Schedule-stage latency: ``auto`` composes from ``latency_table`` when given (rows of this
    GPU's exact fingerprint; on a CPU, of the table's only fingerprint), else measures on a GPU,
    else uses the table fpstune ships for a GPU (``fpstune/data/latency``; its fingerprint is
    reported). ``measure`` on a CPU times the reference with the wall clock (smoke tests only:
    labelled ``cpu-wallclock`` under the CPU fingerprint, never a GPU latency).
    """
    device = torch.device(device)
    model = spec.model
    source = schedule_latency(spec, device=device, latency_table=latency_table, latency=latency)
    # A registered probe runs in every trial only when an objective or constraint names one of
    # its metrics (an end_to_end section otherwise serves `fpstune export --verify-e2e` alone);
    # the attention probe is built from the calibration set.
    probes = registry.probes_for(spec, device)
    return ScheduleEvaluator(
        model.shape(),
        _calibration(spec),
        latency=source,
        constraints=spec.constraints,
        device=device,
        batch=model.batch,
        probes=probes,
        measure_warmup=spec.latency.warmup,
        measure_reps=spec.latency.reps,
    )


#: The study's end-to-end quality probe (`fpstune export --verify-e2e` builds one too).
end_to_end_probe = registry.end_to_end_probe


def schedule_latency(
    spec: StudySpec,
    *,
    device: torch.device,
    latency_table: LatencyTable | None = None,
    latency: Literal["auto", "table", "measure"] = "auto",
) -> CallLatency | Literal["measure"]:
    """Where a schedule study's per-call latencies come from (see `build_schedule_evaluator`); with
    ``latency.target``, always a table at the target shape (`TargetShapeLatency`)."""
    model, target = spec.model, spec.latency.target
    if target is not None:
        # A proxy costed at a target shape takes another GPU's shipped table when none was
        # measured for this one (labelled in every trial: `latency_provenance`), not a crash.
        inner = _table_source(latency_table, device, other_gpu=True)
        return TargetShapeLatency.for_model(inner, model, target)
    if latency == "measure" or (
        latency == "auto" and latency_table is None and device.type == "cuda"
    ):
        if device.type == "cuda":
            return "measure"
        return MeasuredLatency(
            device, warmup=spec.latency.warmup, reps=spec.latency.reps, allow_cpu=True
        )
    return _table_source(latency_table, device)


# -- helpers --------------------------------------------------------------------------------------


def _table_source(
    table: LatencyTable | None, device: torch.device, *, other_gpu: bool = False
) -> TableLatency:
    """``other_gpu``: on a GPU fpstune ships no table for, take the one it ships for another
    GPU (composed under that GPU's fingerprint, as on a CPU) instead of failing."""
    here = current_fingerprint(device) if device.type == "cuda" else None
    if table is None:
        shipped = shipped_tables()
        if here is not None and (not other_gpu or not shipped or gpu_slug(here.gpu) in shipped):
            table = packaged_table(here)
        else:
            here = None
            if len(shipped) != 1:
                raise ValueError(
                    f"no table for this machine and {len(shipped)} shipped with fpstune "
                    f"({', '.join(shipped) or 'none'}); pass a latency table measured on a GPU "
                    "(or latency='measure' for a CPU smoke run)"
                )
            table = packaged_table(shipped[0])
    return TableLatency(table, fingerprint=_table_fingerprint(table, here))


def _table_fingerprint(
    table: LatencyTable, here: HardwareFingerprint | None
) -> HardwareFingerprint:
    """This GPU's exact fingerprint if the table has it, else the table's only fingerprint of
    the same GPU type (on a CPU: the table's only GPU fingerprint)."""
    fps = [f for f in table.fingerprints(source="measured") if not f.is_cpu]
    if here is not None:
        if here in fps:
            return here
        fps = [f for f in fps if same_gpu_type(f, here)]
    if len(fps) != 1:
        found = "; ".join(f"{f.gpu}, torch {f.torch}, triton {f.triton}" for f in fps) or "none"
        want = f" of {here.gpu}" if here is not None else ""
        raise ValueError(
            f"composing latency needs one GPU fingerprint{want} in the latency table, "
            f"it has {len(fps)}: {found}"
        )
    return fps[0]


def _calibration(spec: StudySpec) -> CalibrationSet:
    cal, model = spec.calibration, spec.model
    layers, steps = cal.layer_indices(model), cal.step_indices(model)
    if cal.source == "synthetic":
        return synthetic_calibration(
            model,
            seed=cal.seed,
            layers=layers,
            steps=steps,
            max_tokens=cal.max_tokens,
            batch=cal.samples_per_cell,
        )
    loaded = load_calibration(cal.source, model=model)
    return loaded.select(layers=layers, steps=steps)


def _run_checked(fn: Any, *, what: str) -> Any:
    """Run a kernel; the candidate's own failures become `CandidateError`."""
    try:
        return fn()
    except (SpecError, InfeasibleConfig) as e:
        raise CandidateError(f"{what}: {one_line(e)}") from None
    except Exception as e:
        if type(e).__module__.startswith("triton"):
            raise CandidateError(f"{what}: kernel failed: {one_line(e)}") from None
        raise


def _device_limits(device: torch.device) -> DeviceLimits:
    if device.type != "cuda":
        return DeviceLimits()
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", None)
    return DeviceLimits(
        smem_per_block=int(smem) if smem else DeviceLimits().smem_per_block,
        capability=(props.major, props.minor),
    )


def _constraint(c: Any, names: Sequence[str]) -> tuple[str, Callable[[float], float]]:
    def get(key: str) -> Any:
        return c.get(key) if isinstance(c, Mapping) else getattr(c, key, None)

    name, hi, lo = get("name"), get("max"), get("min")
    if name not in names:
        raise ValueError(f"constraint on {name!r}: this evaluator reports {', '.join(names)}")
    if (hi is None) == (lo is None):
        raise ValueError(f"constraint on {name!r}: give exactly one of max or min")
    hi, lo = (None if b is None else float(b) for b in (hi, lo))
    return str(name), lambda v: registry.violation(v, max=hi, min=lo)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


__all__ = [
    "CPU_METHOD",
    "KernelEvaluator",
    "ScheduleEvaluator",
    "build_schedule_evaluator",
    "schedule_latency",
]
