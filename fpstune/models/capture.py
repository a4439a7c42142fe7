"""Capture: run a model's denoising loop once (BF16-dense, the reference) and keep what a study
needs from it: Q/K/V per (layer, step) as a calibration set, and a replay record.

Each file is written atomically (temp file + rename), the record first and the calibration
index last, so a study never sees half a capture:

- ``OUT.safetensors``: the calibration set, in the format of `fpstune.quality.calibration`
  (the ``fpstune`` metadata with ``source: captured``), sharded: each (layer, step) cell goes to
  its own file in ``OUT.cells-XXXX/`` as soon as the loop has produced it (moved to the CPU,
  written, dropped: memory holds one cell), and ``OUT.safetensors`` is written last as the index.
  Each cell holds the self-attention inputs of the CFG-batched call (batch = 2 x videos with
  guidance: uncond rows first, as the loop batches them). k and v keep every token of the grid;
  with ``max_tokens``, q keeps only the rows of a seeded sample of whole ``query_box`` boxes
  (`query_rows`, recorded as ``query_index``), which the probe scores exactly against the full
  k and v for any spec whose tile divides the box.
- ``OUT.replay.safetensors``: the replay record: initial latents, prompt and negative
  embeddings, timesteps, the scheduler's class and config, steps, guidance, seeds, and the final
  latents of the captured run. `replay` regenerates from it with the transformer alone (no text
  encoder, no VAE, no scheduler folder) under any router, e.g. a policy's.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fpstune.errors import BadInput
from fpstune.kernels.atomic import replacing
from fpstune.models.loop import Conditions, Sampling, denoise
from fpstune.models.processor import install, patch_grid
from fpstune.models.router import AttentionRouter
from fpstune.quality.calibration import (
    CalibrationMeta,
    Cell,
    CellWriter,
    Grid,
    query_rows,
    read_safetensors,
)

RECORD_VERSION = 1
RECORD_KEY = "fpstune_replay"
RECORD_SUFFIX = ".replay.safetensors"
# Query rows are sampled in whole boxes of this shape (t, h, w), aligned to the grid origin:
# every tile of the schedule search space and the default tile of Wan's 480p/720p grids divides
# it ((1,16,8), (2,8,8), (3,16,8), (6,8,8), (1,8,16), (2,16,4)), so a sampled box is whole tiles.
QUERY_BOX: Grid = (6, 16, 16)


@dataclass(frozen=True)
class ReplayRecord:
    """What regenerates a captured run: conditions and sampling, plus its final latents."""

    model: str
    conditions: Conditions
    scheduler_class: str
    scheduler_config: dict[str, Any]
    steps: int
    guidance: float
    seeds: tuple[int, ...]
    timesteps: torch.Tensor
    final: torch.Tensor

    def sampling(self) -> Sampling:
        import diffusers

        cls = getattr(diffusers, self.scheduler_class)
        return Sampling(cls.from_config(self.scheduler_config), self.steps, self.guidance)


@dataclass(frozen=True)
class Capture:
    """What `capture` wrote: the set's metadata and record, and their paths."""

    meta: CalibrationMeta
    record: ReplayRecord
    path: Path
    record_path: Path


class QKVSampler:
    """Router observer writing Q/K/V of the chosen (layer, step) cells to ``writer`` as they
    come: k and v whole, q on ``rows`` only (None: all). A cell's calls are stacked along the
    batch and written when a call for another cell arrives (or at `close`)."""

    def __init__(
        self,
        cells: Sequence[Cell],
        rows: torch.Tensor | None,
        dtype: torch.dtype,
        writer: CellWriter,
    ):
        self.cells = frozenset(cells)
        self.rows = rows
        self.dtype = dtype
        self.writer = writer
        self.batches: dict[Cell, int] = {}
        self._cell: Cell | None = None
        self._parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(
        self, layer: int, step: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        cell = (layer, step)
        if cell not in self.cells:
            return
        if cell != self._cell:
            self._flush()
            if cell in self.batches:
                raise RuntimeError(
                    f"layer {layer} at step {step} was called again after other cells: "
                    "capture needs the loop to batch a cell's calls (CFG) together"
                )
            self._cell = cell
        if self.rows is not None:
            q = q.index_select(2, self.rows.to(q.device))
        q, k, v = (x.detach().to("cpu", self.dtype) for x in (q, k, v))
        self._parts.append((q, k, v))

    def _flush(self) -> None:
        if self._cell is None:
            return
        q, k, v = (torch.cat(xs).contiguous() for xs in zip(*self._parts, strict=True))
        self.writer.write(*self._cell, q, k, v)
        self.batches[self._cell] = k.shape[0]
        self._cell, self._parts = None, []

    def close(self) -> int:
        """Write the last cell; the batch every cell holds."""
        self._flush()
        missing = sorted(self.cells - self.batches.keys())
        if missing:
            layer, step = missing[0]
            raise RuntimeError(f"no self-attention call reached layer {layer} at step {step}")
        batches = set(self.batches.values())
        if len(batches) != 1:
            raise RuntimeError(f"cells hold different batch sizes {sorted(batches)}")
        return batches.pop()


def initial_latents(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """One video's noise per seed, from a CPU generator (as WanPipeline does with one)."""
    return torch.cat(
        [torch.randn(1, *shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


def capture(
    transformer: Any,
    sampling: Sampling,
    conditions: Conditions,
    *,
    out: str | os.PathLike[str] | None = None,
    name: str,
    seeds: Sequence[int],
    layers: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    max_tokens: int | None = None,
    query_box: Sequence[int] = QUERY_BOX,
    dtype: torch.dtype = torch.bfloat16,
    on_step: Callable[[int], None] | None = None,
) -> Capture:
    """Run the BF16-dense reference once, streaming Q/K/V at ``layers`` x ``steps`` (all when
    None) to the calibration set ``out`` (q on at most ``max_tokens`` sampled rows, whole
    ``query_box`` boxes) and writing the replay record next to it; installs fpstune's processor
    on ``transformer``. Nothing is left at ``out`` if the run fails. ``out`` None: a new
    temporary folder's ``capture.safetensors`` (the caller removes it)."""
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="fpstune-capture-")) / "capture.safetensors"
    n_layers = len(transformer.blocks)
    layers = list(range(n_layers)) if layers is None else sorted(set(layers))
    steps = list(range(sampling.steps)) if steps is None else sorted(set(steps))
    for what, idx, n in (("layer", layers, n_layers), ("step", steps, sampling.steps)):
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ValueError(f"{what} {bad[0]} is outside the model's {n} {what}s")
    grid = patch_grid(transformer, conditions.latents)
    rows = query_rows(grid, query_box, max_tokens)
    sampled = rows.numel() < math.prod(grid)
    cells = [(layer, step) for layer in layers for step in steps]
    writer = CellWriter(out)
    try:
        sampler = QKVSampler(cells, rows if sampled else None, dtype, writer)
        router = AttentionRouter(observer=sampler)
        install(transformer, router)
        start = Conditions(
            conditions.latents.detach().cpu().float().clone(),
            conditions.prompt.detach().cpu().clone(),
            None if conditions.negative is None else conditions.negative.detach().cpu().clone(),
        )
        final = denoise(transformer, router, start, sampling, on_step=on_step).cpu()
        batch = sampler.close()
        c = transformer.config
        meta = CalibrationMeta(
            model=name,
            grid=grid,
            model_grid=grid,
            heads=int(c.num_attention_heads),
            head_dim=int(c.attention_head_dim),
            batch=batch,
            cells=tuple(cells),
            model_layers=n_layers,
            model_steps=sampling.steps,
            seed=int(seeds[0]) if len(seeds) == 1 else None,  # several: the record lists them
            source="captured",
            dtype=str(dtype).removeprefix("torch."),
            queries=rows.numel() if sampled else None,
            query_box=_box(query_box) if sampled else None,
        )
        scheduler = sampling.fresh_scheduler()
        record = ReplayRecord(
            model=name,
            conditions=start,
            scheduler_class=type(scheduler).__name__,
            scheduler_config=_jsonable(dict(scheduler.config)),
            steps=sampling.steps,
            guidance=float(sampling.guidance),
            seeds=tuple(int(s) for s in seeds),
            timesteps=scheduler.timesteps.detach().cpu(),
            final=final,
        )
        save_record(record, record_path(out))  # the record first: an index always has one
        writer.finish(meta, rows if sampled else None)
    except BaseException:
        writer.abort()
        raise
    return Capture(meta, record, Path(out), record_path(out))


@torch.no_grad()
def replay(
    transformer: Any, record: ReplayRecord, router: AttentionRouter | None = None
) -> torch.Tensor:
    """Regenerate ``record``'s run with ``transformer`` under ``router`` (None: BF16-dense);
    returns the final latents (float32, on the transformer's device)."""
    c = transformer.config
    latents, prompt = record.conditions.latents, record.conditions.prompt
    if int(c.in_channels) != latents.shape[1] or int(c.text_dim) != prompt.shape[-1]:
        raise ValueError(
            f"record of {record.model} has {latents.shape[1]} latent channels and text dim "
            f"{prompt.shape[-1]}; this transformer takes {c.in_channels} and {c.text_dim}"
        )
    sampling = record.sampling()
    timesteps = sampling.fresh_scheduler().timesteps.detach().cpu()
    if not torch.equal(timesteps, record.timesteps):
        raise ValueError(f"the recorded scheduler now gives other timesteps: {timesteps.tolist()}")
    router = AttentionRouter() if router is None else router
    router.reset()
    install(transformer, router)
    return denoise(transformer, router, record.conditions, sampling)


# -- files --------------------------------------------------------------------------------------


def record_path(calibration: str | os.PathLike[str]) -> Path:
    """``calib.safetensors`` -> ``calib.replay.safetensors`` (next to it)."""
    p = Path(calibration)
    return p.with_name(p.name.removesuffix(".safetensors") + RECORD_SUFFIX)


def save_record(record: ReplayRecord, path: str | os.PathLike[str]) -> None:
    from safetensors.torch import save_file

    cond = record.conditions
    tensors = {
        "latents": cond.latents,
        "prompt_embeds": cond.prompt,
        "timesteps": record.timesteps,
        "final_latents": record.final,
    }
    if cond.negative is not None:
        tensors["negative_prompt_embeds"] = cond.negative
    meta = {
        "format_version": RECORD_VERSION,
        "model": record.model,
        "scheduler": {"class": record.scheduler_class, "config": record.scheduler_config},
        "steps": record.steps,
        "guidance": record.guidance,
        "seeds": list(record.seeds),
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with replacing(p) as tmp:
        save_file(
            {n: t.detach().cpu().contiguous() for n, t in tensors.items()},
            str(tmp),
            metadata={RECORD_KEY: json.dumps(meta, sort_keys=True)},
        )


def load_record(path: str | os.PathLike[str]) -> ReplayRecord:
    """Read a replay record; `BadInput` (one line naming the file) when it is not one."""
    where = str(path)
    header, t = read_safetensors(path, what="replay record", error=BadInput)
    try:
        meta = json.loads(header[RECORD_KEY])
        if meta.get("format_version") != RECORD_VERSION:
            raise ValueError(f"format_version {meta.get('format_version')!r} is not supported")
        import diffusers

        cls = str(meta["scheduler"]["class"])
        if not hasattr(diffusers, cls):
            raise ValueError(f"scheduler class {cls!r} is not in diffusers")
        return ReplayRecord(
            model=str(meta["model"]),
            conditions=Conditions(
                t["latents"], t["prompt_embeds"], t.get("negative_prompt_embeds")
            ),
            scheduler_class=cls,
            scheduler_config=dict(meta["scheduler"]["config"]),
            steps=int(meta["steps"]),
            guidance=float(meta["guidance"]),
            seeds=tuple(int(s) for s in meta["seeds"]),
            timesteps=t["timesteps"],
            final=t["final_latents"],
        )
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise BadInput(f"{where}: not a replay record: {what}") from None


def _box(box: Sequence[int]) -> Grid:
    t, h, w = (int(x) for x in box)
    return (t, h, w)


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    # Scheduler configs hold tuples and numpy scalars at times; JSON keeps what from_config needs.
    out: dict[str, Any] = json.loads(json.dumps(config, default=_plain))
    return out


def _plain(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


__all__ = [
    "QUERY_BOX",
    "Capture",
    "QKVSampler",
    "ReplayRecord",
    "capture",
    "initial_latents",
    "load_record",
    "record_path",
    "replay",
    "save_record",
]
