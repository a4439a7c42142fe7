"""The study file (``studies/*.yaml``): one model at one resolution, what to search and how.

A study names the model's attention shape and adapter, its two search spaces (paths relative to
the study file, or inline mappings), objectives and constraints, the sampler, the trial budgets of
both stages, the calibration data and how latency is measured. `load_study` validates all of it,
the referenced spaces included, and checks that the pieces fit together (every kernel-space bucket
has a feasible point for the model's head_dim; every tile, pattern, mode and sparsity the schedule
space can produce is covered by the kernel space's latency table), so nothing is discovered by
crashing mid-study.

Two stages share the file:

- kernel: one Optuna study per kernel bucket (named ``<name>:kernel:<bucket key>``), single
  objective ``latency_ms`` (minimise); ``trials.kernel`` complete trials *per bucket*.
- schedule: one Optuna study (``<name>:schedule``) over the schedule space with ``objectives``
  and ``constraints``; ``trials.schedule`` complete trials.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    PrivateAttr,
    Strict,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fpstune.errors import one_line
from fpstune.kernels.policy import MAX_TEXT, ModelShape, Task
from fpstune.quality import registry
from fpstune.quality.registry import Direction
from fpstune.spec.loading import BadInput, load_model, read_mapping, show, validate
from fpstune.spec.space import (
    Float,
    Frozen,
    KernelSpace,
    NonNegInt,
    PosInt,
    ScheduleSpace,
    at,
    tile_key,
)

if TYPE_CHECKING:
    import optuna


def _metric(name: str) -> str:
    registry.direction(name)  # UnknownMetric (a ValueError): one line naming the probes
    return name


#: A metric some registered probe produces (`fpstune.quality.registry`; a study measures the
#: subset its probes produce: `StudySpec` checks).
Metric = Annotated[str, Strict(), AfterValidator(_metric)]

Stage = Literal["kernel", "schedule"]
SYNTHETIC = "synthetic"
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # no ':' (it separates study-name parts)


# -- model ------------------------------------------------------------------------------------


class ModelSpec(Frozen):
    """The model whose attention is tuned: its adapter and attention shape.

    ``cfg`` is the number of attention passes per layer and step (2 with classifier-free
    guidance); ``batch`` the batch size one pass runs; ``task`` and ``text`` go to the exported
    policy's model section as they are (`fpstune.kernels.policy.ModelShape`): what the pipeline
    generates, and the text tokens each joint text + video attention call holds (0 where text
    reaches the video by cross-attention only).
    """

    name: Annotated[str, Field(min_length=1, pattern=_NAME_PATTERN)]
    adapter: Annotated[str, Strict()]  # a name in `fpstune.models.adapters` (plug-ins too)
    heads: PosInt
    head_dim: PosInt
    layers: Annotated[int, Strict(), Field(ge=1, le=1000)]
    grid: tuple[PosInt, PosInt, PosInt]
    steps: Annotated[int, Strict(), Field(ge=1, le=1000)]
    cfg: Annotated[int, Strict(), Field(ge=1, le=8)]
    batch: PosInt = 1
    task: Task = "t2v"
    text: Annotated[int, Strict(), Field(ge=0, le=MAX_TEXT)] = 0

    @field_validator("adapter")
    @classmethod
    def _registered(cls, v: str) -> str:
        from fpstune.models import adapters

        adapters.get(v)  # UnknownAdapter (a ValueError): one line naming the registered ones
        return v

    @property
    def tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    def shape(self) -> ModelShape:
        """The policy's model section."""
        return ModelShape(
            name=self.name,
            heads=self.heads,
            head_dim=self.head_dim,
            layers=self.layers,
            grid=self.grid,
            steps=self.steps,
            cfg=self.cfg,
            task=self.task,
            text=self.text,
        )


# -- objectives and constraints --------------------------------------------------------------


class Objective(Frozen):
    """An objective; ``direction`` defaults to the metric's natural one and may not oppose it."""

    name: Metric
    direction: Direction

    @model_validator(mode="before")
    @classmethod
    def _natural(cls, data: Any) -> Any:
        name = data.get("name") if isinstance(data, dict) else None
        natural = registry.directions().get(name) if isinstance(name, str) else None
        if natural is None:
            return data  # the name's own error comes from the field
        direction = data.get("direction")
        if direction is None:
            return {**data, "direction": natural}
        if direction != natural and direction in ("minimize", "maximize"):
            better = "lower" if natural == "minimize" else "higher"
            raise at(
                "direction", f"{data['name']} is better when {better}: direction must be {natural}"
            )
        return data


class Constraint(Frozen):
    """Feasible when ``value <= max`` (or ``value >= min``); give exactly one bound."""

    name: Metric
    max: Float | None = None
    min: Float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> Constraint:
        if (self.max is None) == (self.min is None):
            raise ValueError("give exactly one of max or min")
        return self

    def violation(self, value: float) -> float:
        """Optuna's convention: feasible when <= 0 (`registry.violation`)."""
        return registry.violation(value, max=self.max, min=self.min)


# -- sampler ----------------------------------------------------------------------------------


class TPEOptions(Frozen):
    n_startup_trials: NonNegInt = 10
    n_ei_candidates: PosInt = 24
    multivariate: Annotated[bool, Strict()] = True
    group: Annotated[bool, Strict()] = True  # decomposes conditional spaces (pattern → window)
    constant_liar: Annotated[bool, Strict()] = True  # several workers ask at once


class NSGAIIOptions(Frozen):
    population_size: Annotated[int, Strict(), Field(ge=2)] = 50
    mutation_prob: Annotated[float, Strict(), Field(ge=0, le=1)] | None = None
    crossover_prob: Annotated[float, Strict(), Field(ge=0, le=1)] = 0.9
    swapping_prob: Annotated[float, Strict(), Field(ge=0, le=1)] = 0.5


class GPOptions(Frozen):
    n_startup_trials: NonNegInt = 10
    deterministic_objective: Annotated[bool, Strict()] = False


class RandomOptions(Frozen):
    pass


_OPTIONS: dict[str, type[Frozen]] = {
    "tpe": TPEOptions,
    "nsgaii": NSGAIIOptions,
    "gp": GPOptions,
    "random": RandomOptions,
}
_SAMPLER_CLASS = {
    "tpe": "TPESampler",
    "nsgaii": "NSGAIISampler",
    "gp": "GPSampler",
    "random": "RandomSampler",
}


class SamplerSpec(Frozen):
    """The Optuna sampler; ``options`` are checked against the chosen sampler's own set.

    Default ``tpe`` with ``multivariate`` and ``group``: it handles mixed categorical and
    conditional spaces and several objectives, and takes constraints. ``nsgaii`` is the classic
    alternative for large budgets; ``gp`` suits small continuous spaces (it falls back to
    independent sampling on conditional parameters); ``random`` is the baseline to beat.
    Constraints reach the samplers that use them through ``trial.set_constraint`` (Optuna 5 reads
    them from the trial; ``constraints_func`` is deprecated), see `StudySpec.constraint_values`.
    """

    name: Literal["tpe", "nsgaii", "gp", "random"] = "tpe"
    seed: NonNegInt | None = 0
    options: TPEOptions | NSGAIIOptions | GPOptions | RandomOptions = TPEOptions()
    #: schedule stage: evaluate the hand-set baselines' schedules that the schedule space holds
    #: exactly (`fpstune.baselines.baseline_params`) before the sampler's own picks; they count
    #: toward the budget
    start_from_baselines: Annotated[bool, Strict()] = False

    @model_validator(mode="before")
    @classmethod
    def _typed_options(cls, data: Any) -> Any:
        """Validate ``options`` against the named sampler's own model (defaults filled in)."""
        if not isinstance(data, dict):
            return data
        name = data.get("name", "tpe")
        options = data.get("options")
        if options is None:
            options = {}
        if not isinstance(name, str) or name not in _OPTIONS or isinstance(options, Frozen):
            return data  # the name's own error comes from the field
        if not isinstance(options, dict):
            raise at("options", f"expected a mapping of {name} options, got {show(options)}")
        from pydantic import ValidationError

        try:
            typed = _OPTIONS[name].model_validate(options)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            sub = ".".join(str(p) for p in err["loc"])
            msg = f"{err['msg']} (got {show(err.get('input'))})"
            if err["type"] == "extra_forbidden":
                known = ", ".join(_OPTIONS[name].model_fields)
                msg = f"unknown key for the {name} sampler " + (
                    f"(known: {known})" if known else "(it takes no options)"
                )
            raise at(f"options.{sub}", msg) from None
        return {**data, "options": typed}

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the Optuna sampler's constructor (without ``constraints_func``)."""
        return {"seed": self.seed, **self.options.model_dump()}

    def build(self) -> optuna.samplers.BaseSampler:
        """A fresh, seeded sampler."""
        import optuna

        cls = getattr(optuna.samplers, _SAMPLER_CLASS[self.name])
        sampler: optuna.samplers.BaseSampler = cls(**self.kwargs())
        return sampler


# -- budgets, calibration, latency ------------------------------------------------------------


class TrialBudget(Frozen):
    """COMPLETE trials to reach: ``kernel`` per kernel bucket (0 skips the stage; the runtime's
    default configs are used), ``schedule`` for the schedule study."""

    kernel: NonNegInt
    schedule: PosInt

    def of(self, stage: Stage) -> int:
        return self.kernel if stage == "kernel" else self.schedule


class CalibrationSpec(Frozen):
    """Which Q/K/V the quality objective is computed on.

    ``source``: ``synthetic`` (seeded random-but-structured tensors, for tests and smoke runs) or
    a ``.safetensors`` file written by ``fpstune capture``, relative to the study file.
    ``steps``/``layers``: which denoising steps and layers are scored (``all`` or a list).
    ``samples_per_cell``: Q/K/V samples per (layer, step) cell. ``max_tokens``: for a
    ``synthetic`` set, the grid is shrunk (aspect kept) to at most this many tokens; null keeps
    it whole. A captured set was sampled when it was captured (``fpstune capture --max-tokens``:
    every key and value, whole boxes of query rows), and this field does not change it.
    """

    source: str = SYNTHETIC
    seed: NonNegInt = 0
    steps: Literal["all"] | tuple[NonNegInt, ...] = "all"
    layers: Literal["all"] | tuple[NonNegInt, ...] = "all"
    samples_per_cell: PosInt = 1
    max_tokens: PosInt | None = None

    @field_validator("steps", "layers", mode="before")
    @classmethod
    def _all_or_list(cls, v: Any) -> Any:
        if v == "all":
            return v
        if not isinstance(v, list | tuple):
            raise ValueError(f"expected 'all' or a list of indices, got {show(v)}")
        if not v:
            raise ValueError("empty list (write 'all' for every index)")
        for i, x in enumerate(v):
            if type(x) is not int or x < 0:
                raise at(str(i), f"expected an index >= 0, got {show(x)}")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate index in {show(v)}")
        return tuple(sorted(v))

    @field_validator("source")
    @classmethod
    def _resolve(cls, v: str, info: ValidationInfo) -> str:
        if v == SYNTHETIC:
            return v
        base = Path((info.context or {}).get("base_dir", "."))
        path = (base / v).resolve()
        if path.suffix != ".safetensors":
            raise ValueError(f"expected 'synthetic' or a .safetensors file, got {v!r}")
        if not path.is_file():
            raise ValueError(f"no such file: {path}")
        return str(path)

    def step_indices(self, model: ModelSpec) -> tuple[int, ...]:
        return tuple(range(model.steps)) if self.steps == "all" else self.steps

    def layer_indices(self, model: ModelSpec) -> tuple[int, ...]:
        return tuple(range(model.layers)) if self.layers == "all" else self.layers


class TargetShape(Frozen):
    """The deployment shape a proxy model's schedule is costed at (see `latency.target`)."""

    heads: PosInt
    head_dim: PosInt
    grid: tuple[PosInt, PosInt, PosInt]
    layers: Annotated[int, Strict(), Field(ge=1, le=1000)]
    steps: Annotated[int, Strict(), Field(ge=1, le=1000)]


class LatencySpec(Frozen):
    """How one latency is measured: ``warmup`` untimed runs, then ``reps`` timed ones (median and
    IQR kept); ``rotate_inputs`` cycles through enough input copies to defeat the L2 cache.

    ``target``: cost the schedule at this shape instead of the model's own (a proxy model such
    as ``mini``, whose own calls are launch-bound): per-call latencies come from a table measured
    at the target shape, scaled to the target's layers x steps (`latency.target`).
    """

    warmup: NonNegInt = 10
    reps: Annotated[int, Strict(), Field(ge=20)] = 50
    rotate_inputs: Annotated[bool, Strict()] = True
    target: TargetShape | None = None


class EndToEndSpec(Frozen):
    """End-to-end quality (``psnr``, ``psnr_min``, ``ssim``): generate videos with the policy
    and with BF16 dense from the same ``seeds`` (one video each) and compare. ``weights``: the
    mini model's safetensors (relative to the study file; default: the packaged ones).

    For a checkpoint adapter that replays a capture (``wan-diffusers``): ``weights`` is the
    checkpoint directory, ``calibration.source`` a capture with its replay record, ``seeds``
    some of the record's seeds; the record's steps and guidance are used, and the final latents
    compared (``psnr``, ``psnr_min``); a checkpoint with a VAE also has its decoded frames
    compared (``frame_psnr``, ``ssim``).

    Every trial runs the probe only when an objective or constraint names one of its metrics;
    otherwise the section is for `fpstune export --verify-e2e` alone, which holds the pick to
    ``min_psnr`` (dB of ``psnr``) when no psnr objective or constraint sets a bar."""

    seeds: tuple[NonNegInt, ...] = (0, 1, 2, 3)
    guidance: Annotated[float, Field(ge=1.0, le=30.0, allow_inf_nan=False)] = 5.0
    weights: str | None = None
    min_psnr: Annotated[float, Field(gt=0.0, le=100.0, allow_inf_nan=False)] | None = None

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("empty list (give at least one seed)")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate seed in {list(v)}")
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        path = (Path((info.context or {}).get("base_dir", ".")) / v).resolve()
        if path.is_dir():  # a checkpoint directory (wan-diffusers)
            return str(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"expected a .safetensors file or a checkpoint directory, got {v!r}")
        if not path.is_file():
            raise ValueError(f"no such file: {path}")
        return str(path)


# -- the study --------------------------------------------------------------------------------


def _default_objectives() -> tuple[Objective, ...]:
    return (
        Objective(name="latency_ms", direction="minimize"),
        Objective(name="rel_l2", direction="minimize"),
    )


class StudySpec(Frozen):
    name: Annotated[str, Field(min_length=1, max_length=200, pattern=_NAME_PATTERN)]
    model: ModelSpec
    kernel_space: KernelSpace
    schedule_space: ScheduleSpace
    objectives: tuple[Objective, ...] = Field(default_factory=_default_objectives)
    constraints: tuple[Constraint, ...] = ()
    sampler: SamplerSpec = SamplerSpec()
    trials: TrialBudget
    calibration: CalibrationSpec = CalibrationSpec()
    latency: LatencySpec = LatencySpec()
    end_to_end: EndToEndSpec | None = None

    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> str:
        return str(self._source) if self._source is not None else "<study>"

    @property
    def metric_names(self) -> list[str]:
        """For ``study.set_metric_names`` (schedule stage)."""
        return [o.name for o in self.objectives]

    @property
    def directions(self) -> list[Direction]:
        return [o.direction for o in self.objectives]

    def study_name(self, stage: Stage, bucket_key: str | None = None) -> str:
        """``<name>:schedule`` or ``<name>:kernel:<bucket key>``."""
        if stage == "schedule":
            return f"{self.name}:schedule"
        if not bucket_key:
            raise ValueError("a kernel-stage study name needs the bucket key")
        return f"{self.name}:kernel:{bucket_key}"

    def constraint_values(self, metrics: dict[str, float]) -> dict[str, float]:
        """``{name: violation}`` for ``trial.set_constraint`` (feasible when every value <= 0)."""
        return {c.name: c.violation(metrics[c.name]) for c in self.constraints}

    # -- validation -------------------------------------------------------------------------

    @field_validator("kernel_space", "schedule_space", mode="before")
    @classmethod
    def _load_space(cls, v: Any, info: ValidationInfo) -> Any:
        """A path (relative to the study file) is loaded and validated here; errors in it name
        the space file. A mapping is validated in place, as part of the study."""
        if isinstance(v, KernelSpace | ScheduleSpace):
            return v
        if isinstance(v, str):
            base = Path((info.context or {}).get("base_dir", "."))
            kind: Literal["kernel", "schedule"] = (
                "kernel" if info.field_name == "kernel_space" else "schedule"
            )
            path = os.path.normpath(base / v)
            # A reference that cannot name a file is the study's fault (its field); what is
            # wrong inside, or a file that is missing, is said of the space file's path.
            if not v.strip() or Path(path).is_dir():
                raise ValueError(f"expected a path to a search space file, got {show(v)}")
            return load_space(path, kind=kind)
        if not isinstance(v, dict):
            raise ValueError(f"expected a path to a search space file or a mapping, got {show(v)}")
        return v

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: tuple[Objective, ...]) -> tuple[Objective, ...]:
        if not v:
            raise ValueError("empty list (give at least one objective)")
        _unique_names(v)
        return v

    @field_validator("constraints")
    @classmethod
    def _constraints(cls, v: tuple[Constraint, ...]) -> tuple[Constraint, ...]:
        _unique_names(v)
        return v

    @model_validator(mode="after")
    def _fits_together(self, info: ValidationInfo) -> StudySpec:
        from fpstune.models import adapters

        file = (info.context or {}).get("file", "<study>")
        model = self.model
        cal = self.calibration
        for field, idx, n in (
            ("steps", cal.steps, model.steps),
            ("layers", cal.layers, model.layers),
        ):
            if idx != "all" and idx[-1] >= n:
                raise at(
                    f"calibration.{field}", f"index {idx[-1]} is outside the model's {n} {field}"
                )
        if self.end_to_end is not None and not adapters.get(model.adapter).end_to_end:
            able = [n for n in adapters.names() if adapters.get(n).end_to_end]
            raise at(
                "end_to_end",
                f"adapter {model.adapter} does not run end-to-end quality (adapters that do: "
                f"{', '.join(able) or 'none'}); for a real checkpoint, capture a calibration set "
                "with `fpstune capture`",
            )
        from_record = self.end_to_end is not None and getattr(
            adapters.get(model.adapter), "end_to_end_from_record", False
        )
        if from_record:
            _check_record_e2e(self)
        elif (w := self.end_to_end and self.end_to_end.weights) and Path(w).is_dir():
            raise at("end_to_end.weights", "expected a .safetensors file, got a directory")
        produced = registry.measured(self)
        named: tuple[tuple[str, Sequence[Objective | Constraint]], ...] = (
            ("objectives", self.objectives),
            ("constraints", self.constraints),
        )
        for kind, items in named:
            for i, item in enumerate(items):
                if item.name not in produced:
                    raise at(f"{kind}.{i}.name", registry.not_measured(self, item.name))
        kfile, kprefix = _where(self.kernel_space, file, "kernel_space")
        sfile, sprefix = _where(self.schedule_space, file, "schedule_space")
        _check_kernel_space(self.kernel_space, model, file=kfile, prefix=kprefix)
        _check_schedule_space(
            self.schedule_space,
            self.kernel_space,
            model,
            sfile=sfile,
            sprefix=sprefix,
            kfile=kfile,
            kprefix=kprefix,
            # at a latency.target shape the proxy's tiles are not costed (the target's best is)
            check_tiles=self.latency.target is None,
        )
        return self


def _check_record_e2e(spec: StudySpec) -> None:
    """An end-to-end section replayed from a capture: its record, checkpoint and seeds."""
    from fpstune.models.capture import RECORD_KEY, record_path

    e2e, source = spec.end_to_end, spec.calibration.source
    assert e2e is not None
    record = None if source == SYNTHETIC else record_path(source)
    if record is None or not record.is_file():
        raise at(
            "end_to_end",
            "needs a captured calibration.source with its replay record (fpstune capture); "
            + ("calibration.source is synthetic" if record is None else f"no {record}"),
        )
    if e2e.weights is None or not Path(e2e.weights).is_dir():
        raise at(
            "end_to_end.weights",
            f"adapter {spec.model.adapter} needs the checkpoint directory the calibration "
            "was captured from",
        )
    try:
        from safetensors import safe_open

        with safe_open(str(record), "pt") as f:
            seeds = [int(s) for s in json.loads((f.metadata() or {})[RECORD_KEY])["seeds"]]
    except Exception as e:
        raise at("calibration.source", f"{record}: not a replay record ({one_line(e)})") from None
    missing = [s for s in e2e.seeds if s not in seeds]
    if missing:
        raise at(
            "end_to_end.seeds", f"seed {missing[0]} is not in the replay record's seeds {seeds}"
        )


def _unique_names(items: Sequence[Objective | Constraint]) -> None:
    seen: set[str] = set()
    for i, item in enumerate(items):
        if item.name in seen:
            raise at(f"{i}.name", f"{item.name} is listed twice")
        seen.add(item.name)


def _where(space: KernelSpace | ScheduleSpace, study_file: str, field: str) -> tuple[str, str]:
    """(file, field prefix) to blame for ``space``: its own file, or the study for an inline one."""
    if space._source is not None:
        return space.source, ""
    return study_file, f"{field}."


def _check_kernel_space(space: KernelSpace, model: ModelSpec, *, file: str, prefix: str) -> None:
    from fpstune.stages.kernel_space import bucket_points, kernel_buckets

    for bucket in kernel_buckets(space):
        bucket_points(space, model.head_dim, bucket, file=file, prefix=prefix)


def _check_schedule_space(
    schedule: ScheduleSpace,
    kernel: KernelSpace,
    model: ModelSpec,
    *,
    sfile: str,
    sprefix: str,
    kfile: str,
    kprefix: str,
    check_tiles: bool = True,
) -> None:
    """Everything a schedule can run must be in the latency table the kernel stage fills."""
    from fpstune.kernels import Mode
    from fpstune.stages.kernel_space import feasible_kernel_points

    if schedule.layers.groups > model.layers:
        raise BadInput(
            sfile,
            f"{sprefix}layers.groups",
            f"{schedule.layers.groups} groups but the model has {model.layers} layers",
        )
    modes = schedule.modes()
    missing = sorted(m.value for m in modes if m not in kernel.mode_enums)
    if missing:
        raise BadInput(
            kfile,
            f"{kprefix}modes",
            f"{', '.join(missing)} missing: the schedule space ({sfile}) can run "
            f"{'it' if len(missing) == 1 else 'them'}, so the latency table needs "
            f"{'it' if len(missing) == 1 else 'them'}",
        )
    if Mode.FP8_SPARSE not in modes:
        return
    if check_tiles:
        points = feasible_kernel_points(kernel, model.head_dim, file=kfile)
        sparse_tiles = {p.tile for p in points if p.mode is Mode.FP8_SPARSE}
        for i, tile in enumerate(schedule.sparse.tile):
            if tile not in sparse_tiles:
                raise BadInput(
                    sfile,
                    f"{sprefix}sparse.tile.{i}",
                    f"tile {tile_key(tile)} has no feasible fp8_sparse point in the kernel "
                    f"space ({kfile}), so its latency would be unknown",
                )
    kinds = {p.kind for p in kernel.patterns}
    for i, kind in enumerate(schedule.sparse.pattern):
        if kind not in kinds:
            raise BadInput(
                sfile,
                f"{sprefix}sparse.pattern.{i}",
                f"pattern {kind} is not among the kernel space's patterns ({', '.join(kinds)})",
            )
    lo, hi = min(kernel.sparsities), max(kernel.sparsities)
    a, b = schedule.sparse.sparsity.bounds
    if a < lo - 1e-9 or b > hi + 1e-9:
        raise BadInput(
            sfile,
            f"{sprefix}sparse.sparsity",
            f"{a:g} .. {b:g} reaches outside the kernel space's sparsity buckets {lo:g} .. {hi:g} "
            f"({kfile}); latencies are interpolated between buckets, never extrapolated",
        )


# -- loading ----------------------------------------------------------------------------------


def load_space(
    path: str | Path, *, kind: Literal["kernel", "schedule"] | None = None
) -> KernelSpace | ScheduleSpace:
    """A search-space file, by its ``kind`` (which must equal ``kind`` when given); errors name
    the file and field."""
    data = read_mapping(path)
    models: dict[str, type[KernelSpace | ScheduleSpace]] = {
        "kernel": KernelSpace,
        "schedule": ScheduleSpace,
    }
    if "kind" not in data:
        raise BadInput(path, "kind", "required key is missing (kernel or schedule)")
    found = data["kind"]
    if not isinstance(found, str) or found not in models:
        raise BadInput(path, "kind", f"expected kernel or schedule, got {show(found)}")
    if kind is not None and found != kind:
        raise BadInput(path, "kind", f"expected a {kind} space here, got a {found} space")
    space = validate(models[found], data, file=path)
    space._source = Path(path)
    return space


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study file and the search spaces it names; raises `BadInput`."""
    p = Path(path)
    context = {"file": str(p), "base_dir": str(p.parent)}
    study = validate(StudySpec, read_mapping(p), file=p, context=context)
    study._source = p
    return study


__all__ = [
    "CalibrationSpec",
    "Constraint",
    "EndToEndSpec",
    "LatencySpec",
    "ModelSpec",
    "Objective",
    "SamplerSpec",
    "StudySpec",
    "TargetShape",
    "TrialBudget",
    "load_model",
    "load_space",
    "load_study",
]
