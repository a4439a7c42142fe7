"""LTX-Video (diffusers' ``LTXVideoTransformer3DModel``): fpstune's self-attention processor, its
`Routing` and the ``ltx-video`` adapter.

`LTXSelfAttention` replaces the processor of every block's self-attention (``attn1``) and
computes what diffusers' ``LTXVideoAttnProcessor`` computes for it: q/k/v projections, RMS norms
of q and k over the whole inner dimension (all heads together), the rotary embedding, the output
projection; the attention itself goes to the `AttentionRouter` with the spec of (layer, current
step). Cross-attention to the text (``attn2``) stays diffusers' own: the text reaches the video
by cross-attention only, so a policy's ``model.text`` is 0.

Rotary embedding: LTX rotates interleaved channel pairs (2i, 2i + 1) exactly as
`fpstune.kernels.rope.rotary` does (cos and sin repeated per pair; checked bit for bit in
``tests/models/test_ltx.py``), but its tables span the *whole inner dimension*, heads x head_dim
channels with ``inner_dim // 6`` frequencies per axis (padding channels first), so every head
rotates by other angles. fpstune's tables are (tokens, head_dim), one for all heads, and cannot
carry that: the processor rotates q and k itself, as diffusers does (fp32 math, cast back to the
input dtype), before splitting the heads, and hands the router no tables. ``fuse_rope`` is
accepted for the `Routing` interface and has no effect here.

The grid: LTX's transformer receives the latents already patchified, (batch, tokens, channels),
plus ``num_frames``, ``height`` and ``width`` keyword arguments (`LTXPipeline` passes the latent
sizes). `LTXRouting.grid` reads them and divides by the transformer's patch sizes
(``patch_size_t``, ``patch_size``); `LTXPipeline._pack_latents` and the rotary embedding's
coordinates both order the tokens frame-major, then height, then width: the order fpstune's tiles
assume.

`LTXVideoAdapter` (``ltx-video``) reads a checkpoint's transformer config, turns it into the
attention shape of a video size (LTX's VAE: 8 x temporally, 32 x spatially, so 161 frames of
512 x 704 are 21 x 16 x 22 latents), loads the transformer and scheduler from a local directory,
and routes a pipeline's self-attention for `fpstune.apply`. Capture, replay, the denoising loop
and end-to-end quality are not built for this family yet (`NoModel`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fpstune.errors import BadInput, one_line
from fpstune.kernels.policy import ModelShape, Task
from fpstune.models import routing
from fpstune.models.family import RoutedAdapter, read_json
from fpstune.models.router import AttentionRouter
from fpstune.models.routing import Dims, Grid, divided, hidden_of

if TYPE_CHECKING:
    pass

#: LTX-Video's VAE: pixels per latent, temporally (after the first frame) and spatially
VAE_TEMPORAL = 8
VAE_SPATIAL = 32
TRANSFORMER = "transformer"
CONFIG = "config.json"
SCHEDULER_CONFIG = ("scheduler", "scheduler_config.json")
CLASS_NAME = "LTXVideoTransformer3DModel"
#: the transformer forward's arguments that give the latent sizes, with their positions
SIZE_ARGS = (("num_frames", 4), ("height", 5), ("width", 6))

Rope = tuple[torch.Tensor, torch.Tensor]


def rotate(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """``x`` (batch, tokens, inner_dim) rotated as LTX does (diffusers' ``apply_rotary_emb``):
    pairs (2i, 2i + 1) of the whole inner dimension, by (batch, tokens, inner_dim) tables, in
    fp32, returned in ``x``'s dtype."""
    cos, sin = rope
    real, imag = x.unflatten(2, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class LTXSelfAttention:
    """Processor for one LTX block's ``attn1``; ``layer`` is the block index. ``fuse_rope`` has
    no effect: LTX's per-head rotary tables are applied here (module docstring)."""

    def __init__(self, router: AttentionRouter, layer: int, fuse_rope: bool = True) -> None:
        self.router = router
        self.layer = layer
        self.fuse_rope = fuse_rope

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Rope | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("fpstune's LTX processor serves self-attention without a mask only")
        q = attn.norm_q(attn.to_q(hidden_states))
        k = attn.norm_k(attn.to_k(hidden_states))
        v = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            q, k = rotate(q, image_rotary_emb), rotate(k, image_rotary_emb)
        # (batch, tokens, heads * dim) -> (batch, heads, tokens, dim), the runtime's layout
        q, k, v = (x.unflatten(2, (attn.heads, -1)).transpose(1, 2) for x in (q, k, v))
        out = _route(self, q, k, v).flatten(2, 3).to(q.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out


@torch.compiler.disable
def _route(
    processor: LTXSelfAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """The router's output as (batch, tokens, heads, dim), contiguous, outside any compiled
    graph (see `fpstune.models.processor._route`: no guards on the layer, step or strides)."""
    return processor.router.run(processor.layer, q, k, v).transpose(1, 2).contiguous()


class LTXRouting:
    """`fpstune.models.routing.Routing` for ``LTXVideoTransformer3DModel``: every block's
    ``attn1``; the grid from the call's ``num_frames`` / ``height`` / ``width``."""

    def modules(self, transformer: Any) -> list[tuple[str, Any]]:
        blocks = getattr(transformer, "transformer_blocks", None)
        if blocks is None:
            raise TypeError(f"{type(transformer).__name__} has no LTX transformer blocks")
        return [(f"transformer_blocks.{i}.attn1", block.attn1) for i, block in enumerate(blocks)]

    def processor(self, router: AttentionRouter, layer: int, *, fuse_rope: bool) -> Any:
        return LTXSelfAttention(router, layer, fuse_rope)

    def original(self) -> Any:
        from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

        return LTXVideoAttnProcessor()

    def grid(self, transformer: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Grid:
        sizes = []
        for name, position in SIZE_ARGS:
            size = kwargs.get(name, args[position] if len(args) > position else None)
            if size is None:
                raise ValueError(
                    f"{type(transformer).__name__} was called without {name}: fpstune reads the "
                    "latent grid from num_frames, height and width, as LTXPipeline passes them"
                )
            sizes.append(int(size))
        c = transformer.config
        patch = (int(c.patch_size_t), int(c.patch_size), int(c.patch_size))
        grid = divided(tuple(sizes), patch, "latent sizes (num_frames, height, width)")
        tokens = hidden_of(args, kwargs).shape[1]
        if grid[0] * grid[1] * grid[2] != tokens:
            raise ValueError(
                f"latent grid {'x'.join(map(str, grid))} does not match the {tokens} video "
                "tokens of hidden_states"
            )
        return grid

    def dims(self, transformer: Any) -> Dims:
        c = transformer.config
        return Dims(int(c.num_attention_heads), int(c.attention_head_dim), int(c.num_layers))

    def task(self, target: Any) -> Task | None:
        """By the pipeline's class: one transformer serves LTX's text- and image-to-video
        pipelines (the image enters as conditioning latents), so a bare one does not say."""
        import diffusers

        if isinstance(target, diffusers.LTXImageToVideoPipeline):
            return "i2v"
        return "t2v" if isinstance(target, diffusers.LTXPipeline) else None


LTX = LTXRouting()


def install(transformer: Any, router: AttentionRouter, fuse_rope: bool = True) -> int:
    """Patch every block's self-attention of an ``LTXVideoTransformer3DModel``; returns the
    number of layers patched. Idempotent: re-installing replaces the router."""
    return routing.install(LTX, transformer, router, fuse_rope)


# -- config and shape ----------------------------------------------------------------------------


def transformer_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``path/transformer/config.json`` (a pipeline directory) or ``path/config.json`` (the
    transformer's own), read without building the model."""
    root = Path(path)
    if not root.is_dir():
        raise BadInput(f"{root}: no such model directory")
    candidates = (root / TRANSFORMER / CONFIG, root / CONFIG)
    file = next((f for f in candidates if f.is_file()), None)
    if file is None:
        raise BadInput(f"{candidates[0]}: no transformer config (nor {candidates[1]})")
    config = read_json(file, what="transformer config")
    name = config.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise BadInput(f"{file}: _class_name: {name!r} is not {CLASS_NAME}")
    for key in ("num_attention_heads", "attention_head_dim", "num_layers"):
        if not isinstance(config.get(key), int) or config[key] < 1:
            raise BadInput(f"{file}: {key}: missing or not a positive integer")
    return config


def model_shape(
    config: Mapping[str, Any],
    *,
    name: str,
    height: int,
    width: int,
    frames: int,
    steps: int,
    cfg: int,
) -> ModelShape:
    """The attention shape of an LTX transformer ``config`` generating ``frames`` x ``height``
    x ``width`` videos in ``steps`` steps with ``cfg`` attention passes per step; BadInput
    naming the option when a size does not fit the VAE and the patch (the pipeline would round
    it silently)."""
    p_t, p = int(config.get("patch_size_t", 1)), int(config.get("patch_size", 1))
    if frames < 1 or (frames - 1) % VAE_TEMPORAL:
        raise BadInput(f"--frames: {frames} is not 1 + a multiple of {VAE_TEMPORAL}")
    for opt, size in (("--height", height), ("--width", width)):
        if size < 1 or size % (VAE_SPATIAL * p):
            raise BadInput(f"{opt}: {size} is not a multiple of {VAE_SPATIAL * p}")
    f = (frames - 1) // VAE_TEMPORAL + 1
    if f % p_t:
        raise BadInput(f"--frames: {f} latent frames are not a multiple of the patch {p_t}")
    return ModelShape(
        name=name,
        heads=int(config["num_attention_heads"]),
        head_dim=int(config["attention_head_dim"]),
        layers=int(config["num_layers"]),
        grid=(f // p_t, height // VAE_SPATIAL // p, width // VAE_SPATIAL // p),
        steps=steps,
        cfg=cfg,
        text=0,
    )


def load_ltx(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    """(transformer in eval mode on ``device``, scheduler) from a local pipeline directory
    (``transformer/``, ``scheduler/``); never downloads."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # local_files_only covers diffusers; this the hub
    import diffusers
    from diffusers import LTXVideoTransformer3DModel, SchedulerMixin

    root = Path(path)
    transformer_config(root)  # a clear error before any loading
    tdir = root / TRANSFORMER
    where = {"subfolder": TRANSFORMER} if (tdir / CONFIG).is_file() else {}
    sfile = root.joinpath(*SCHEDULER_CONFIG)
    sconfig = read_json(sfile, what="scheduler config")
    cls = getattr(diffusers, str(sconfig.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise BadInput(f"{sfile}: _class_name: {sconfig.get('_class_name')!r} is not a scheduler")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = LTXVideoTransformer3DModel.from_pretrained(
                str(root), local_files_only=True, torch_dtype=dtype, **where
            )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        where_dir = tdir if where else root
        raise BadInput(f"{where_dir}: cannot load the LTX transformer: {one_line(e)}") from None
    try:
        scheduler = cls.from_config(sconfig)
    except (ValueError, TypeError, KeyError) as e:
        raise BadInput(f"{sfile}: {one_line(e)}") from None
    return model.to(device=device).eval(), scheduler


class LTXVideoAdapter(RoutedAdapter):
    """``ltx-video``: a diffusers LTX-Video checkpoint (`fpstune.models.ltx`) for `fpstune.apply`,
    and its attention shape (`RoutedAdapter`)."""

    name = "ltx-video"
    routing = LTX
    transformer_class = "LTXVideoTransformer3DModel"
    processor = LTXSelfAttention

    def read_config(self, path: str | os.PathLike[str]) -> Mapping[str, Any]:
        return transformer_config(path)

    def load_checkpoint(
        self, path: str | os.PathLike[str], *, device: torch.device | str, dtype: torch.dtype
    ) -> tuple[Any, Any]:
        return load_ltx(path, device=device, dtype=dtype)

    def shape(
        self,
        config: Mapping[str, Any],
        *,
        name: str,
        height: int,
        width: int,
        frames: int,
        steps: int,
        cfg: int,
    ) -> ModelShape:
        return model_shape(
            config, name=name, height=height, width=width, frames=frames, steps=steps, cfg=cfg
        )


__all__ = [
    "LTX",
    "LTXRouting",
    "LTXSelfAttention",
    "LTXVideoAdapter",
    "install",
    "load_ltx",
    "model_shape",
    "rotate",
    "transformer_config",
]
