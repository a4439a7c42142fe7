"""``fpstune model ...``: train and inspect the embedded mini model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

model_app = typer.Typer(no_args_is_help=True, help="Train and inspect the embedded mini model.")


@model_app.command("train-mini")
def train_mini_cmd(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Where to write the weights (safetensors).")
    ] = Path("mini.safetensors"),
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 6000,
    batch: Annotated[int, typer.Option(min=1, help="Videos per step.")] = 64,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (cosine decay).")] = 3e-4,
    seed: Annotated[int, typer.Option(min=0, help="Seed of weights and data.")] = 0,
    max_minutes: Annotated[
        float | None, typer.Option(min=0.0, help="Stop early after this long (weights kept).")
    ] = None,
    device: Annotated[str, typer.Option(help="Torch device (a GPU: cuda).")] = "cuda",
) -> None:
    """Train the mini Wan model with flow matching on procedural videos (no downloads).

    About 4 minutes on one H100 for the shipped weights; the package loads them from
    fpstune/data/models/mini.safetensors (copy --out there to replace them).
    """
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from fpstune.models.train import train_mini

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA GPU here (training on a CPU: --device cpu, very slow)")
    with Progress(
        TextColumn("train-mini"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps, loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task("train", total=steps, loss=float("nan"))
        result = train_mini(
            out=out,
            steps=steps,
            batch=batch,
            lr=lr,
            seed=seed,
            device=device,
            max_seconds=None if max_minutes is None else max_minutes * 60,
            on_log=lambda i, loss: bar.update(task, completed=i, loss=loss),
        )
    typer.echo(
        f"{result.path}: {result.steps} steps in {result.seconds:.0f} s, "
        f"final loss {result.final_loss:.4f}"
    )
