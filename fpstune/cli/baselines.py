"""``fpstune baselines``: the hand-set schedules the front must beat, stored beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def baselines_cmd(
    study_file: Annotated[Path, typer.Argument(help="Study YAML, e.g. studies/mini-e2e.yaml.")],
    storage: Annotated[
        str,
        typer.Option(
            "--storage", envvar="FPSTUNE_STORAGE", help="SQLAlchemy URL of the study storage."
        ),
    ] = "sqlite:///fpstune.db",
    threshold: Annotated[
        float,
        typer.Option(
            min=0.0, help="DiTFastAttn greedy plan: largest attention rel-L2 allowed per cell."
        ),
    ] = 0.05,
    device: Annotated[
        str, typer.Option(help="Torch device for the evaluation (default: cuda if present).")
    ] = "auto",
) -> None:
    """Evaluate four baselines with the study's own evaluator (same latency accounting and
    quality probes) and store them as trials marked `baseline` in its schedule study:
    fp8_dense_all, fpsattention_3phase, sta_window, ditfastattn_greedy. Re-running skips
    baselines already stored; they do not count toward the search budget."""
    import torch

    from fpstune.baselines import run_baselines

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    results = run_baselines(study_file, storage_url=storage, threshold=threshold, device=dev)
    for name, values in results.items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        typer.echo(f"{name}: {shown}")
