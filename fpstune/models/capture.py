"""Capture: run a model's denoising loop once (BF16-dense, the reference) and keep what a study
needs from it: Q/K/V per (layer, step) as a calibration set, and a replay record.

Two files, both written atomically (temp file + rename), so a study never sees half a capture:

- ``OUT.safetensors``: the calibration set, exactly the format of
  `fpstune.quality.calibration` (``q/layer{L}/step{S}`` ... plus the ``fpstune`` metadata with
  ``source: captured``); a study uses it as ``calibration.source``. Each cell holds the
  self-attention inputs of the CFG-batched call (batch = 2 x videos with guidance: uncond rows
  first, as the loop batches them). The calibration format keeps q, k and v on one token grid,
  so ``max_tokens`` crops a centred sub-box of the latent-patch grid (same tokens for q, k, v;
  ``grid`` < ``model_grid`` says the set is a smaller proxy, as synthetic sets do) rather than
  subsampling query rows; with no cap the cells are the full attention inputs.
- ``OUT.replay.safetensors``: the replay record: initial latents, prompt and negative
  embeddings, timesteps, the scheduler's class and config, steps, guidance, seeds, and the final
  latents of the captured run. `replay` regenerates from it with the transformer alone (no text
  encoder, no VAE, no scheduler folder) under any router, e.g. a policy's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fpstune.errors import BadInput
from fpstune.kernels.atomic import replacing
from fpstune.quality.calibration import (
    CalibrationMeta,
    CalibrationSet,
    Cell,
    Grid,
    cap_grid,
    read_safetensors,
    save_calibration,
    tensor_name,
)

from .loop import Conditions, Sampling, denoise
from .processor import install, patch_grid
from .router import AttentionRouter

RECORD_VERSION = 1
RECORD_KEY = "fpstune_replay"
RECORD_SUFFIX = ".replay.safetensors"


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
    calibration: CalibrationSet
    record: ReplayRecord


class QKVSampler:
    """Router observer keeping Q/K/V of the chosen (layer, step) cells, on ``tokens`` only."""

    def __init__(self, cells: Sequence[Cell], tokens: torch.Tensor | None, dtype: torch.dtype):
        self.cells = frozenset(cells)
        self.tokens = tokens
        self.dtype = dtype
        self.parts: dict[str, list[torch.Tensor]] = {}

    def __call__(
        self, layer: int, step: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        if (layer, step) not in self.cells:
            return
        for which, x in zip("qkv", (q, k, v), strict=True):
            if self.tokens is not None:
                x = x.index_select(2, self.tokens.to(x.device))
            part = x.detach().to("cpu", self.dtype).contiguous()
            self.parts.setdefault(tensor_name(which, layer, step), []).append(part)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Calls of one cell are stacked along the batch (an unbatched CFG loop calls twice)."""
        missing = sorted(self.cells - {_cell_of(n) for n in self.parts})
        if missing:
            layer, step = missing[0]
            raise RuntimeError(f"no self-attention call reached layer {layer} at step {step}")
        return {name: torch.cat(parts) for name, parts in self.parts.items()}


def crop_tokens(grid: Grid, sub: Grid) -> torch.Tensor:
    """Indices (model order: t, h, w row-major) of the centred ``sub`` box of ``grid``."""
    (gt, gh, gw), (st, sh, sw) = grid, sub
    t = torch.arange(st) + (gt - st) // 2
    h = torch.arange(sh) + (gh - sh) // 2
    w = torch.arange(sw) + (gw - sw) // 2
    return (t[:, None, None] * gh * gw + h[None, :, None] * gw + w[None, None, :]).flatten()


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
    name: str,
    seeds: Sequence[int],
    layers: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    max_tokens: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    on_step: Callable[[int], None] | None = None,
) -> Capture:
    """Run the BF16-dense reference once, sampling Q/K/V at ``layers`` x ``steps`` (all when
    None) on the grid capped at ``max_tokens``; installs fpstune's processor on
    ``transformer``."""
    n_layers = len(transformer.blocks)
    layers = list(range(n_layers)) if layers is None else sorted(set(layers))
    steps = list(range(sampling.steps)) if steps is None else sorted(set(steps))
    for what, idx, n in (("layer", layers, n_layers), ("step", steps, sampling.steps)):
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ValueError(f"{what} {bad[0]} is outside the model's {n} {what}s")
    grid = patch_grid(transformer, conditions.latents)
    sub = cap_grid(grid, max_tokens)
    cells = [(layer, step) for layer in layers for step in steps]
    sampler = QKVSampler(cells, None if sub == grid else crop_tokens(grid, sub), dtype)
    router = AttentionRouter(observer=sampler)
    install(transformer, router)
    start = Conditions(
        conditions.latents.detach().cpu().float().clone(),
        conditions.prompt.detach().cpu().clone(),
        None if conditions.negative is None else conditions.negative.detach().cpu().clone(),
    )
    final = denoise(transformer, router, start, sampling, on_step=on_step).cpu()
    tensors = sampler.tensors()
    batches = {t.shape[0] for t in tensors.values()}
    if len(batches) != 1:
        raise RuntimeError(f"cells hold different batch sizes {sorted(batches)}")
    c = transformer.config
    meta = CalibrationMeta(
        model=name,
        grid=sub,
        model_grid=grid,
        heads=int(c.num_attention_heads),
        head_dim=int(c.attention_head_dim),
        batch=batches.pop(),
        cells=tuple(cells),
        model_layers=n_layers,
        model_steps=sampling.steps,
        seed=int(seeds[0]) if len(seeds) == 1 else None,  # several: the record lists them
        source="captured",
        dtype=str(dtype).removeprefix("torch."),
    )
    meta.validate()
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
    return Capture(CalibrationSet(meta, tensors), record)


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


def write_capture(cap: Capture, out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write the calibration set to ``out`` and the record next to it (each atomically; the
    record first, so a calibration file on disk always has its record)."""
    out = Path(out)
    rec = record_path(out)
    save_record(cap.record, rec)
    save_calibration(cap.calibration, out)
    return out, rec


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


def _cell_of(name: str) -> Cell:
    _, layer, step = name.split("/")
    return (int(layer.removeprefix("layer")), int(step.removeprefix("step")))


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    # Scheduler configs hold tuples and numpy scalars at times; JSON keeps what from_config needs.
    out: dict[str, Any] = json.loads(json.dumps(config, default=_plain))
    return out


def _plain(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


__all__ = [
    "Capture",
    "QKVSampler",
    "ReplayRecord",
    "capture",
    "crop_tokens",
    "initial_latents",
    "load_record",
    "record_path",
    "replay",
    "save_record",
    "write_capture",
]
