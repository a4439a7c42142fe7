"""``fpstune capture``: a user's Wan checkpoint -> a calibration set + replay record."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fpstune.errors import BadInput
from fpstune.outputs import check_output

if TYPE_CHECKING:
    import torch

_QKV_DTYPES = ("bfloat16", "float32")


def capture_cmd(
    model_dir: Annotated[
        Path, typer.Argument(help="Local diffusers Wan checkpoint (transformer/, scheduler/).")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Calibration set to write (.safetensors; the replay record "
            "goes next to it as NAME.replay.safetensors).",
        ),
    ],
    prompt_embeds: Annotated[
        Path | None,
        typer.Option(help="safetensors with prompt_embeds (+ negative_prompt_embeds for CFG)."),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(help="Prompt text, encoded by the checkpoint's own text encoder."),
    ] = None,
    negative_prompt: Annotated[
        str, typer.Option(help="Negative prompt text (with --prompt).")
    ] = "",
    height: Annotated[int, typer.Option(help="Video height in pixels.")] = 480,
    width: Annotated[int, typer.Option(help="Video width in pixels.")] = 832,
    frames: Annotated[int, typer.Option(help="Video frames (1 + a multiple of 4).")] = 81,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 50,
    guidance: Annotated[float, typer.Option(min=0.0, help="CFG scale (1: no CFG).")] = 5.0,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds, one video each.")] = "0",
    layers: Annotated[
        str | None, typer.Option(help="Comma-separated layers to sample (default: all).")
    ] = None,
    sample_steps: Annotated[
        str | None, typer.Option(help="Comma-separated steps to sample (default: all).")
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Store q for at most this many query rows per cell (at least one box): a seeded "
            "sample of whole --query-box boxes; k and v always keep every token, so the probe "
            "scores those rows exactly. Default: every row.",
        ),
    ] = None,
    query_box: Annotated[
        str,
        typer.Option(
            help="T,H,W of the boxes --max-tokens samples, aligned to the grid origin; a spec "
            "is scored only if its tile divides it."
        ),
    ] = "6,16,16",
    name: Annotated[
        str | None, typer.Option(help="Model name in the set (default: the directory name).")
    ] = None,
    device: Annotated[str, typer.Option(help="Torch device; auto: cuda if present.")] = "auto",
    qkv_dtype: Annotated[str, typer.Option(help="Stored Q/K/V dtype.")] = "bfloat16",
) -> None:
    """Run a Wan checkpoint's denoising loop once (BF16-dense reference) and record the Q/K/V of
    its self-attention per (layer, step) as a calibration set for `calibration.source`, plus
    what replays the run with the transformer alone. Nothing is downloaded."""
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from fpstune.models import capture as cap_mod
    from fpstune.models import prompts, wan
    from fpstune.models.loop import Conditions, Sampling

    if out.suffix != ".safetensors":
        raise BadInput(f"--out: {out}: expected a .safetensors file")
    for path in (out, cap_mod.record_path(out)):  # before the run, which takes minutes
        check_output(path, option="--out")
    if qkv_dtype not in _QKV_DTYPES:
        raise BadInput(f"--qkv-dtype: {qkv_dtype!r} is not one of {', '.join(_QKV_DTYPES)}")
    if (prompt is None) == (prompt_embeds is None):
        raise BadInput(
            "--prompt-embeds: give exactly one of --prompt-embeds FILE.safetensors or --prompt "
            "TEXT (the latter needs the checkpoint's text encoder)"
        )
    box = _ints("--query-box", query_box)
    if len(box) != 3 or min(box) < 1:
        raise BadInput(f"--query-box: {query_box!r}: expected three positive sizes T,H,W")
    seed_list = _ints("--seeds", seeds)
    if not seed_list:
        raise BadInput("--seeds: no seeds given")
    wan.check_checkpoint(model_dir)
    config = wan.transformer_config(model_dir)
    scheduler = wan.load_scheduler(model_dir)
    scale = wan.vae_scale(model_dir)
    latent = wan.latent_shape(config, height=height, width=width, frames=frames, scale=scale)
    layer_list = _indices("--layers", layers, int(config["num_layers"]), "layers")
    step_list = _indices("--sample-steps", sample_steps, steps, "steps")
    sampling = Sampling(scheduler, steps, guidance)
    try:
        sampling.fresh_scheduler()
    except ValueError as e:
        raise BadInput(f"--steps: {' '.join(str(e).split())}") from None
    guided = guidance != 1.0
    dev = _device(device)
    model_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    text_dim, videos = int(config["text_dim"]), len(seed_list)
    if prompt_embeds is not None:
        pos, neg = prompts.load_prompt_embeds(
            prompt_embeds, text_dim=text_dim, videos=videos, guided=guided
        )
    else:
        assert prompt is not None
        pos, neg = prompts.encode_prompts(
            model_dir,
            prompt,
            negative_prompt,
            videos=videos,
            guided=guided,
            device=dev,
            dtype=model_dtype,
        )
    model_name = name or model_dir.resolve().name
    shape = wan.model_shape(
        config,
        name=model_name,
        height=height,
        width=width,
        frames=frames,
        steps=steps,
        cfg=2 if guided else 1,
        scale=scale,
    )
    transformer = wan.load_transformer(model_dir, device=dev, dtype=model_dtype)
    conditions = Conditions(cap_mod.initial_latents(seed_list, latent), pos, neg)
    start = time.perf_counter()
    with Progress(
        TextColumn("capture"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task("capture", total=steps)
        result = cap_mod.capture(
            transformer,
            sampling,
            conditions,
            out=out,
            name=model_name,
            seeds=seed_list,
            layers=layer_list,
            steps=step_list,
            max_tokens=max_tokens,
            query_box=box,
            dtype=getattr(torch, qkv_dtype),
            on_step=lambda i: bar.update(task, completed=i + 1),
        )
    seconds = time.perf_counter() - start
    meta = result.meta
    typer.echo(
        f"{result.path}: {len(meta.cells)} cells (layers x steps), q {list(meta.q_shape)}, "
        f"k/v {list(meta.tensor_shape)} on grid {list(meta.grid)}, {seconds:.1f} s on {dev}"
    )
    typer.echo(
        f"{result.record_path}: replay record ({videos} video(s), {steps} steps, "
        f"guidance {guidance})"
    )
    typer.echo(
        f"model: {{name: {shape.name}, heads: {shape.heads}, head_dim: {shape.head_dim}, "
        f"layers: {shape.layers}, grid: {list(shape.grid)}, steps: {shape.steps}, "
        f"cfg: {shape.cfg}}}"
    )


def _device(text: str) -> torch.device:
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise BadInput(f"--device: {text!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device: {text}: no CUDA GPU here")
    return dev


def _ints(option: str, text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise BadInput(f"{option}: {text!r} is not a comma-separated list of integers") from None
    if any(v < 0 for v in values):
        raise BadInput(f"{option}: {text!r}: values must be >= 0")
    return values


def _indices(option: str, text: str | None, n: int, what: str) -> list[int] | None:
    if text is None:
        return None
    values = _ints(option, text)
    if not values:
        raise BadInput(f"{option}: empty list (leave it out for all {what})")
    bad = [v for v in values if v >= n]
    if bad:
        raise BadInput(f"{option}: {bad[0]} is outside the model's {n} {what}")
    return sorted(set(values))
