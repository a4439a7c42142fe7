"""fpstune's command line. Exit status: 0 success, 1 failure, 2 bad input (one line on stderr)."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_baselines import baselines_cmd
from .cli_capture import capture_cmd
from .cli_model import model_app
from .errors import BAD_INPUT_ERRORS

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Tune FP8 + block-sparse attention schedules for video diffusion transformers.",
)
study_app = typer.Typer(no_args_is_help=True, help="Run and inspect tuning studies.")
policy_app = typer.Typer(no_args_is_help=True, help="Check and show policy YAML files.")
latency_app = typer.Typer(no_args_is_help=True, help="Move kernel latency tables in and out.")
app.add_typer(study_app, name="study")
app.add_typer(policy_app, name="policy")
app.add_typer(latency_app, name="latency")
app.add_typer(model_app, name="model")
app.command("baselines")(baselines_cmd)
app.command("capture")(capture_cmd)

StorageOpt = Annotated[
    str,
    typer.Option(
        "--storage",
        envvar="FPSTUNE_STORAGE",
        help="SQLAlchemy URL of the study storage: an SQLite file (default) or "
        "postgresql+psycopg://user:pass@host/db for shared studies.",
    ),
]
DEFAULT_STORAGE = "sqlite:///fpstune.db"


@study_app.command("run")
def study_run(
    study_file: Annotated[Path, typer.Argument(help="Study YAML, e.g. studies/mini.yaml.")],
    storage: StorageOpt = DEFAULT_STORAGE,
    workers: Annotated[
        int, typer.Option(min=1, help="Ray workers: one per GPU, or CPU actors.")
    ] = 1,
    trials: Annotated[
        int | None,
        typer.Option(min=1, help="Budget of COMPLETE trials (study total; overrides the file)."),
    ] = None,
    stage: Annotated[
        str, typer.Option(help="kernel: measure kernel latencies (GPU); schedule: search policies.")
    ] = "schedule",
    ray_address: Annotated[
        str | None, typer.Option(help="Address of an existing Ray cluster (default: local Ray).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    max_retries: Annotated[
        int,
        typer.Option(
            min=0, help="Re-runs of a trial whose worker or controller died (same parameters)."
        ),
    ] = 2,
) -> None:
    """Run (or resume) a study until it has its budget of complete trials."""
    from .runner import run_study

    summaries = run_study(
        study_file,
        storage_url=storage,
        workers=workers,
        trials=trials,
        stage=stage,
        ray_address=ray_address,
        progress=progress,
        max_retries=max_retries,
    )
    for s in summaries:
        typer.echo(
            f"{s.study_name}: {s.complete}/{s.budget} complete, {s.failed} failed, "
            f"front {s.front_size}, {s.elapsed_s:.1f} s, "
            f"controller overhead {s.overhead_ms_per_trial:.1f} ms/trial "
            f"({s.overhead_cpu_ms_per_trial:.1f} ms CPU), "
            f"sampler {s.sampler_ms_per_trial:.1f} ms/trial "
            f"({s.sampler_cpu_ms_per_trial:.1f} ms CPU)"
        )


@study_app.command("status")
def study_status(
    study: Annotated[str, typer.Argument(help="Study name or study YAML.")],
    storage: StorageOpt = DEFAULT_STORAGE,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Trials by state, the front and the best values of a study."""
    from .catalog import study_status as status

    info = status(study, storage_url=storage)
    if as_json:
        _emit(info, as_json)
        return
    front = info.pop("front")
    _emit(info, False)
    typer.echo("Pareto front (feasible trials):")
    _emit(front, False)


@study_app.command("list")
def study_list(
    storage: StorageOpt = DEFAULT_STORAGE,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """All studies in the storage."""
    from .catalog import list_studies

    _emit(list_studies(storage_url=storage), as_json)


@app.command("export")
def export(
    study: Annotated[str, typer.Argument(help="Study name or study YAML.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Policy YAML to write.")],
    storage: StorageOpt = DEFAULT_STORAGE,
    min_quality: Annotated[
        float | None,
        typer.Option(
            help="Worst acceptable quality: an upper bound for error objectives "
            "(rel_l2), a lower bound for score objectives (psnr)."
        ),
    ] = None,
    max_latency: Annotated[float | None, typer.Option(help="Latency bound in ms.")] = None,
    trial: Annotated[int | None, typer.Option(help="Export this trial number instead.")] = None,
) -> None:
    """Pick a feasible Pareto trial (knee point unless bounded), re-check it, write its policy."""
    from .export import export_policy

    result = export_policy(
        study,
        storage_url=storage,
        output=output,
        min_quality=min_quality,
        max_latency=max_latency,
        trial_number=trial,
    )
    typer.echo(result.summary())


@policy_app.command("validate")
def policy_validate(
    file: Path,
    allow_other_gpu: Annotated[
        bool, typer.Option(help="Accept a policy tuned on another GPU type (warns).")
    ] = False,
    hardware_check: Annotated[
        bool, typer.Option(help="Compare the policy's GPU with this machine's.")
    ] = True,
    study: Annotated[
        Path | None, typer.Option(help="Also check the policy fits this study's model shape.")
    ] = None,
) -> None:
    """Validate a policy file as the runtime would load it."""
    from fpstune.kernels.policy import Policy

    from .spec.study import load_study

    model = load_study(study).model.shape() if study is not None else None
    policy = Policy.load(
        file,
        model=model,
        hardware="auto" if hardware_check else None,
        allow_other_gpu=allow_other_gpu,
    )
    typer.echo(f"{file}: ok ({policy.model.name}, {len(policy.entries)} entries)")


@policy_app.command("show")
def policy_show(file: Path) -> None:
    """Print a policy's model, hardware, provenance and its step x layer modes."""
    from fpstune.kernels.policy import Policy

    from .catalog import describe_policy

    typer.echo(describe_policy(Policy.load(file, hardware=None)))


@latency_app.command("export")
def latency_export(
    output: Annotated[Path, typer.Option("-o", "--output", help="JSON file to write.")],
    storage: StorageOpt = DEFAULT_STORAGE,
) -> None:
    """Write the measured latency table of a storage as JSON (the form shipped in the package)."""
    from .latency.table import LatencyTable

    table = LatencyTable.from_url(storage)
    n = table.export_json(output)
    typer.echo(f"{output}: {n} rows")


@app.command("dashboard")
def dashboard(
    storage: StorageOpt = DEFAULT_STORAGE,
    host: Annotated[
        str, typer.Option(help="Address to bind; loopback by default (the dashboard has no login).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port; 0 picks a free one.")] = 8080,
    artifacts: Annotated[
        Path | None,
        typer.Option(
            help="Artifact folder (schedule heatmaps, latency splits, policy previews); "
            "default <db>-artifacts beside an SQLite file, none for a server database."
        ),
    ] = None,
    annotate_every: Annotated[
        float,
        typer.Option(help="Seconds between attaching notes and artifacts to new trials; 0: once."),
    ] = 30.0,
) -> None:
    """Open the studies in optuna-dashboard: named axes, feasibility, baselines, per-trial notes
    and artifacts. Missing notes and artifacts are attached to complete trials first."""
    from fpstune.dashboard.server import serve

    try:
        serve(
            storage,
            host=host,
            port=port,
            artifacts=artifacts,
            annotate_every_s=annotate_every,
            echo=typer.echo,
        )
    except KeyboardInterrupt:
        typer.echo("dashboard stopped")


@app.command("report")
def report(
    study: Annotated[str, typer.Argument(help="Study name or study YAML.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="HTML file to write.")],
    storage: StorageOpt = DEFAULT_STORAGE,
) -> None:
    """Write one self-contained HTML page (plotly): Pareto front with baselines, hypervolume
    history, knee-point schedules, the kernel latency table and the hardware fingerprint."""
    from fpstune.dashboard.report import write_report

    info = write_report(study, storage_url=storage, output=output)
    typer.echo(
        f"{output}: {info.study}, {len(info.front.points)} complete trials, "
        f"front of {len(info.front.front)}"
    )


def _emit(rows: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    items = rows if isinstance(rows, list) else [rows]
    if not items:
        typer.echo("(none)")
        return
    table = Table(*items[0].keys())
    for r in items:
        table.add_row(*(str(v) for v in r.values()))
    Console().print(table)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from .controller import TooManyFailures
    from .pool import WorkerStartError
    from .storage import StorageUnavailable, db_error_line

    try:
        app(standalone_mode=False)
    except BAD_INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (WorkerStartError, TooManyFailures, StorageUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        import click

        if isinstance(e, click.exceptions.Exit | typer.Exit):
            sys.exit(e.exit_code)
        # click's errors, or those of the click that typer vendors: one line naming the option
        # (usage errors exit 2, like bad input).
        code = getattr(e, "exit_code", None)
        if hasattr(e, "format_message") and isinstance(code, int):
            print(f"error: {' '.join(e.format_message().split())}", file=sys.stderr)
            sys.exit(code)
        line = db_error_line(e)  # a database error outside the storage layer, password masked
        if line is not None:
            print(f"error: {line}", file=sys.stderr)
            sys.exit(1)
        raise
