"""fpstune's command line. Exit status: 0 success, 1 failure, 2 bad input (one line on stderr).

Ctrl-C (SIGINT) and SIGTERM stop every command the same way: 130 after SIGINT, 143 after SIGTERM
(128 + the signal, as a shell reports a command the signal killed), with one line on stderr and
no traceback: ``interrupted`` or, for ``study run``, ``interrupted — re-run the same command to
resume`` (its trials in flight go back to the queue as they were, not counted as failed). Signals
after the first are ignored, so that clean-up is not cut short.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

from fpstune import __version__
from fpstune.errors import BAD_INPUT_ERRORS, BadInput
from fpstune.outputs import check_output

try:  # the tuner's packages: without the [tune] extra, say what to install
    import optuna
    import typer
except ModuleNotFoundError as e:
    print(
        f'error: fpstune\'s command line needs the [tune] extra ({e}): pip install "fpstune[tune]"',
        file=sys.stderr,
    )
    sys.exit(2)

from fpstune.cli.baselines import baselines_cmd
from fpstune.cli.capture import capture_cmd
from fpstune.cli.model import model_app
from fpstune.cli.study_init import study_init_cmd, study_validate_cmd


def _help_without_command(ctx: typer.Context) -> None:
    """A group given no command prints its help on stderr, exit status 2 (click's
    ``no_args_is_help`` raises the help as an error that would print on one line)."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help(), err=True)
        raise typer.Exit(2)


# Groups print their help when given no command: `_help_without_command` is their callback.
GROUP: dict[str, Any] = {"invoke_without_command": True, "no_args_is_help": False}
app = typer.Typer(
    **GROUP,
    pretty_exceptions_enable=False,
    add_completion=False,
    # click's plain help: typer's rich help (typer >= 0.2x) labels every flag `<bool>` as if it
    # took a value, cuts long words short when stdout is not a terminal, and keeps the docstrings'
    # line breaks in the command lists.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Tune FP8 + block-sparse attention schedules for video diffusion transformers.",
)
study_app = typer.Typer(
    **GROUP,
    callback=_help_without_command,
    help="Write, check, run, list, inspect and delete tuning studies.",
)
policy_app = typer.Typer(
    **GROUP, callback=_help_without_command, help="Check and show policy YAML files."
)
latency_app = typer.Typer(
    **GROUP,
    callback=_help_without_command,
    help="Export the kernel latencies a study measured, as JSON.",
)
app.add_typer(study_app, name="study")
app.add_typer(policy_app, name="policy")
app.add_typer(latency_app, name="latency")
app.add_typer(
    model_app,
    name="model",
    help="Train the embedded mini model.",
    callback=_help_without_command,
    **GROUP,
)
# Short lines for the command list (click cuts a longer first sentence with "...").
app.command("baselines", short_help="Evaluate the baseline schedules and store them as trials.")(
    baselines_cmd
)
app.command("capture", short_help="Record a Wan checkpoint's Q/K/V as a calibration set.")(
    capture_cmd
)
study_app.command("init", short_help="Write a study YAML from a checkpoint's config.")(
    study_init_cmd
)
study_app.command("validate", short_help="Check a study YAML and the search spaces it names.")(
    study_validate_cmd
)

StorageOpt = Annotated[
    str,
    typer.Option(
        "--storage",
        envvar="FPSTUNE_STORAGE",
        help="SQLAlchemy URL of the study storage: an SQLite file (default) or "
        "postgresql+psycopg://user@host/db for shared studies; the password from PGPASSWORD "
        "or PGPASSFILE (~/.pgpass) keeps it off the command line.",
    ),
]
DEFAULT_STORAGE = "sqlite:///fpstune.db"
StudyArg = Annotated[str, typer.Argument(help="Study name or study YAML.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"fpstune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    _help_without_command(ctx)


@study_app.command("run", short_help="Run (or resume) a study until its budget is complete.")
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
    timeout: Annotated[
        float | None,
        typer.Option(
            help="Start no new trial after this many seconds; trials still running then go "
            "back in the queue for the next run."
        ),
    ] = None,
) -> None:
    """Run (or resume) a study until it has its budget of complete trials."""
    from fpstune.run.runner import run_study

    if timeout is not None and not timeout > 0:
        raise BadInput(f"--timeout: must be more than 0 seconds, got {timeout:g}")
    start = time.monotonic()
    summaries = run_study(
        study_file,
        storage_url=storage,
        workers=workers,
        trials=trials,
        stage=stage,
        ray_address=ray_address,
        progress=progress,
        max_retries=max_retries,
        timeout_s=timeout,
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
    if timeout is not None and time.monotonic() - start >= timeout:
        typer.echo(f"stopped by --timeout {timeout:g} s; run the same command again to continue")


@study_app.command("status")
def study_status(
    study: StudyArg, storage: StorageOpt = DEFAULT_STORAGE, as_json: JsonOpt = False
) -> None:
    """Trials by state, the front and the best values of a study."""
    from fpstune.catalog import study_status as status

    info = status(study, storage_url=storage)
    if as_json:
        _emit(info, as_json)
        return
    front = info.pop("front")
    _emit(info, False)
    typer.echo("Pareto front (feasible trials):")
    _emit(front, False)


@study_app.command("list")
def study_list(storage: StorageOpt = DEFAULT_STORAGE, as_json: JsonOpt = False) -> None:
    """All studies in the storage."""
    from fpstune.catalog import list_studies

    _emit(list_studies(storage_url=storage), as_json)


@study_app.command("trials", short_help="List every trial: state, values, parameters.")
def study_trials(
    study: StudyArg, storage: StorageOpt = DEFAULT_STORAGE, as_json: JsonOpt = False
) -> None:
    """Every trial of a study: number, state, values, feasibility and parameters."""
    from fpstune.catalog import study_trials as trials

    _emit(trials(study, storage_url=storage), as_json)


@study_app.command("best", short_help="The feasible Pareto front, fastest first.")
def study_best(
    study: StudyArg, storage: StorageOpt = DEFAULT_STORAGE, as_json: JsonOpt = False
) -> None:
    """The best trials of a study: its feasible Pareto front, fastest first."""
    from fpstune.catalog import study_trials as trials

    _emit(trials(study, storage_url=storage, best=True), as_json)


@study_app.command("delete", short_help="Delete a study and its trials.")
def study_delete(
    study: StudyArg,
    storage: StorageOpt = DEFAULT_STORAGE,
    yes: Annotated[
        bool,
        typer.Option("--yes", "-y", help="Do not ask (required when stdin is not a terminal)."),
    ] = False,
) -> None:
    """Delete a study and its trials (the latency rows its trials measured are kept)."""
    from fpstune.catalog import delete_study, study_size

    name, n = study_size(study, storage_url=storage)
    if not yes:
        if not sys.stdin.isatty():
            raise BadInput(f"--yes: not deleting study {name} ({n} trials) without --yes")
        if not typer.confirm(f"Delete study {name} and its {n} trials?"):
            typer.echo(f"{name}: kept")
            raise typer.Exit(1)
    delete_study(name, storage_url=storage)
    typer.echo(f"{name}: deleted ({n} trials)")


@app.command("export", short_help="Pick a Pareto trial, re-check it, write its policy.")
def export(
    study: StudyArg,
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
    verify_e2e: Annotated[
        int | None,
        typer.Option(
            "--verify-e2e",
            metavar="N",
            help="Re-generate the first N end_to_end seeds with the pick; refuse to write it if "
            "their PSNR misses the study's bar (--min-quality for a psnr or frame_psnr "
            "objective, else such a constraint's min, else end_to_end.min_psnr).",
        ),
    ] = None,
) -> None:
    """Pick a feasible Pareto trial (knee point unless bounded), re-check it, write its policy."""
    from fpstune.export import export_policy

    check_output(output)
    result = export_policy(
        study,
        storage_url=storage,
        output=output,
        min_quality=min_quality,
        max_latency=max_latency,
        trial_number=trial,
        verify_e2e=verify_e2e,
    )
    typer.echo(result.summary())


@policy_app.command("validate")
def policy_validate(
    file: Annotated[Path, typer.Argument(help="Policy YAML, e.g. one `fpstune export` wrote.")],
    allow_other_gpu: Annotated[
        bool,
        typer.Option(
            "--allow-other-gpu", help="Accept a policy tuned on another GPU type (warns)."
        ),
    ] = False,
    hardware_check: Annotated[
        bool, typer.Option(help="Compare the policy's GPU with this machine's.")
    ] = True,
    study: Annotated[
        Path | None, typer.Option(help="Also check the policy fits this study's model shape.")
    ] = None,
) -> None:
    """Validate a policy file as the runtime would load it: its schema and checksum, its
    kernels, this machine's GPU and, with --study, the study's model shape. Warnings (another
    GPU type allowed, other driver or library versions) go to stderr, one line each."""
    from fpstune.kernels.policy import Policy, PolicyError, PolicyWarning
    from fpstune.spec.study import load_study

    model = load_study(study).model.shape() if study is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PolicyWarning)
        try:
            policy = Policy.load(
                file,
                model=model,
                hardware="auto" if hardware_check else None,
                allow_other_gpu=allow_other_gpu,
            )
        except PolicyError as e:
            raise BadInput(_cli_words(str(e))) from None
    for w in caught:
        typer.echo(f"warning: {_cli_words(str(w.message))}", err=True)
    typer.echo(f"{file}: ok ({policy.model.name}, {len(policy.entries)} entries)")


def _cli_words(message: str) -> str:
    """A message of the Python API as the CLI says it: its flag for the keyword, on one line."""
    return " ".join(message.replace("allow_other_gpu=True", "--allow-other-gpu").split())


@policy_app.command("show")
def policy_show(file: Annotated[Path, typer.Argument(help="Policy YAML.")]) -> None:
    """Print a policy's model, hardware, specs and provenance, then a grid of its modes: one row
    per denoising step, one column per layer, one letter per mode (legend below it)."""
    from fpstune.catalog import describe_policy
    from fpstune.kernels.policy import Policy

    typer.echo(describe_policy(Policy.load(file, hardware=None)))


@latency_app.command("export")
def latency_export(
    output: Annotated[Path, typer.Option("-o", "--output", help="JSON file to write.")],
    storage: StorageOpt = DEFAULT_STORAGE,
) -> None:
    """Write the measured latency table of a storage as JSON (the form shipped in the package)."""
    from fpstune.catalog import measured_latency_table

    check_output(output)
    n = measured_latency_table(storage).export_json(output)
    typer.echo(f"{output}: {n} rows")


@app.command("dashboard", short_help="Open the studies in optuna-dashboard.")
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
            "default: beside an SQLite file, its name without the suffix + '-artifacts' "
            "(fpstune-artifacts/ beside fpstune.db); none for a server database."
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

    # Ctrl-C stops it as every command stops: "interrupted", exit 130 (`main`).
    serve(
        storage,
        host=host,
        port=port,
        artifacts=artifacts,
        annotate_every_s=annotate_every,
        echo=typer.echo,
    )


@app.command("report", short_help="Write a self-contained HTML report of a study.")
def report(
    study: StudyArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="HTML file to write.")],
    storage: StorageOpt = DEFAULT_STORAGE,
) -> None:
    """Write one self-contained HTML page (plotly): Pareto front with baselines, hypervolume
    history, knee-point schedules, the kernel latency table and the hardware fingerprint."""
    from fpstune.dashboard.report import write_report

    check_output(output)
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
    table = Table()
    for key in items[0]:
        table.add_column(key, overflow="fold")  # a narrow terminal wraps a cell, never cuts it
    for r in items:
        table.add_row(*(_cell(v) for v in r.values()))
    # Not a terminal (a pipe, a file): there is no width to fit, so print every column whole.
    Console(width=None if sys.stdout.isatty() else 1 << 16).print(table)


def _cell(value: Any) -> str:
    """A table cell: floats to 4 significant digits (--json keeps them all), mappings as k=v."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return " ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return "-" if value is None else str(value)


#: The first SIGINT or SIGTERM received (later ones are ignored).
_signals: list[int] = []
INTERRUPTED = "interrupted"
INTERRUPTED_RESUMABLE = "interrupted — re-run the same command to resume"


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """SIGINT and SIGTERM both stop a command as Ctrl-C does, with a KeyboardInterrupt (so that
    ``study run`` puts its trials in flight back in the queue); only the first one raises."""
    if not _signals:
        _signals.append(signum)
        raise KeyboardInterrupt


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    try:
        code, error = _run_app()
    except BaseException as e:
        # After a signal, whatever the stop raised on its way out is the interruption.
        if not (_signals or isinstance(e, KeyboardInterrupt)):
            raise
        code, error = 130, None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # Ray shuts down at exit: no traceback from there
    if _signals or code == 130:  # typer *returns* 130 for a KeyboardInterrupt it caught
        resumable = sys.argv[1:3] == ["study", "run"]
        print(INTERRUPTED_RESUMABLE if resumable else INTERRUPTED, file=sys.stderr)
        sys.exit(128 + (_signals[0] if _signals else signal.SIGINT))
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
    sys.exit(code)


def _storage_arg(argv: list[str]) -> str:
    """The storage a command was given (``--storage``, else ``FPSTUNE_STORAGE``, else the
    default), to name it in an error that reached the top without it."""
    for i, arg in enumerate(argv):
        if arg == "--storage" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--storage="):
            return arg.split("=", 1)[1]
    return os.environ.get("FPSTUNE_STORAGE", DEFAULT_STORAGE)


def _raised_by(module: str, name: str) -> type | tuple[()]:
    """The exception class ``module.name`` if the command imported ``module``, else ``()``
    (which no exception is an instance of): checking for it imports nothing."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name) if loaded is not None else ()


def _run_app() -> tuple[int, str | None]:
    """Run the command: its exit status, and the one-line error to print if it failed.

    Under ``standalone_mode=False`` typer (0.29) raises errors instead of printing them, and
    returns, not raises, an exit status: a command's ``typer.Exit(n)``, and 130 for a
    KeyboardInterrupt raised inside a command (which it catches)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        code = app(standalone_mode=False)
    except BAD_INPUT_ERRORS as e:
        return 2, str(e)
    except typer.Abort:
        return 130, None
    except Exception as e:
        import click

        from fpstune.storage import StorageUnavailable, db_error_line

        if isinstance(e, StorageUnavailable):
            return 1, e.naming(_storage_arg(sys.argv[1:]))
        # The run side's errors: read from the modules only if the command imported them
        # (`--help` and bad input need no Ray and no torch).
        run_side = (
            _raised_by("fpstune.run.pool", "WorkerStartError"),
            _raised_by("fpstune.run.controller", "TooManyFailures"),
        )
        if isinstance(e, run_side):
            return 1, str(e)
        if isinstance(e, click.exceptions.Exit | typer.Exit):
            return e.exit_code, None
        # click's errors, or those of the click that typer vendors: one line naming the option
        # (usage errors exit 2, like bad input).
        exit_code = getattr(e, "exit_code", None)
        if hasattr(e, "format_message") and isinstance(exit_code, int):
            return exit_code, " ".join(e.format_message().split())
        line = db_error_line(e, _storage_arg(sys.argv[1:]))  # outside the storage layer, masked
        if line is not None:
            return 1, line
        raise
    return (code if isinstance(code, int) else 0), None
