"""CogVideoX (diffusers' ``CogVideoXTransformer3DModel``, 1.0 and 1.5) through fpstune.

Every block's ``attn1`` is *joint* self-attention: diffusers' ``CogVideoXAttnProcessor2_0``
concatenates the prompt's tokens (226 by default, ``max_text_seq_length``; no mask) *before*
the video tokens, projects q, k and v, LayerNorms q and k per head, rotates the video part of
q and k where the model has rotary embeddings (``image_rotary_emb``: the 5B models and 1.5; 2B
has none), attends, projects the output and splits it back into (video, text) outputs.
`CogVideoXSelfAttention` computes all of that as diffusers does and hands the attention alone to
the `AttentionRouter` with ``Text(tokens, first=True)``.

Rotary embedding: diffusers' ``apply_rotary_emb`` (``use_real_unbind_dim=-1``) rotates
interleaved channel pairs, ``x * cos + rotate_pairs(x) * sin`` in fp32, with tables whose two
entries of a pair are equal (``repeat_interleave(2)``); that is the operation
`fpstune.kernels.rope.rotary` computes (pair i reads ``cos[2i]`` and ``sin[2i + 1]``), bit for
bit (tests/models/test_cogvideox.py checks it on the pipelines' own tables). With ``fuse_rope``
(the default) the tables go to the router, which rotates the video tokens only; without it the
processor rotates with diffusers' own function.

The grid: the pipeline hands the transformer latents as (batch, frames, channels, height, width)
(frame-major, unlike Wan); patches are ``patch_size`` x ``patch_size`` spatially and, in 1.5,
``patch_size_t`` latent frames (the pipeline pads the latent frames to a multiple of it).

`CogVideoXAdapter` (``cogvideox``) routes a pipeline's transformer for `fpstune.apply` and
gives the attention shape of a checkpoint (`model_shape`); capture and replay of this family
are not built yet (`NoModel`).
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
from fpstune.models.router import AttentionRouter, Text
from fpstune.models.routing import Dims, Grid, divided, hidden_of

if TYPE_CHECKING:
    pass

#: CogVideoX's VAE (``AutoencoderKLCogVideoX``): 4 frames per latent after the first, 8 x 8 pixels
VAE_TEMPORAL = 4
VAE_SPATIAL = 8
#: the prompt length the pipelines pad to (``max_sequence_length``), where a config lacks it
TEXT_TOKENS = 226
TRANSFORMER = "transformer"
CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
#: keys a transformer config must have for `model_shape`
_KEYS = ("num_attention_heads", "attention_head_dim", "num_layers", "patch_size")


class CogVideoXSelfAttention:
    """Processor for one CogVideoX block's ``attn1``; ``layer`` is the block index. Returns
    (video output, text output) as diffusers' ``CogVideoXAttnProcessor2_0`` does. ``fuse_rope``:
    hand the rotary tables to the router instead of rotating here as diffusers does."""

    def __init__(self, router: AttentionRouter, layer: int, fuse_rope: bool = True) -> None:
        self.router = router
        self.layer = layer
        self.fuse_rope = fuse_rope

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None or getattr(attn, "is_cross_attention", False):
            raise ValueError(
                "fpstune's CogVideoX processor serves joint self-attention without a mask only"
            )
        n_text = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = k.shape[-1] // attn.heads
        # (batch, tokens, heads * dim) -> (batch, heads, tokens, dim), as diffusers lays them out
        q = q.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        k = k.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        v = v.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        rope = None
        if image_rotary_emb is not None and self.fuse_rope:
            rope = image_rotary_emb
        elif image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            freqs: Any = image_rotary_emb  # diffusers annotates (cos, sin) as tuple[Tensor]
            q[:, :, n_text:] = apply_rotary_emb(q[:, :, n_text:], freqs)
            k[:, :, n_text:] = apply_rotary_emb(k[:, :, n_text:], freqs)
        out = _route(self, q, k, v, rope, Text(n_text, first=True))
        out = out.flatten(2, 3).type_as(q)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        text_out, video_out = out.split([n_text, out.size(1) - n_text], dim=1)
        return video_out, text_out


@torch.compiler.disable
def _route(
    processor: CogVideoXSelfAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    text: Text,
) -> torch.Tensor:
    """The router's output as (batch, tokens, heads, dim), contiguous whatever path ran it;
    outside any torch.compile graph (see `fpstune.models.processor._route`)."""
    out = processor.router.run(processor.layer, q, k, v, rope=rope, text=text)
    return out.transpose(1, 2).contiguous()


class CogVideoXRouting:
    """`fpstune.models.routing.Routing` for ``CogVideoXTransformer3DModel``: every block's
    ``attn1`` (joint text + video self-attention)."""

    def modules(self, transformer: Any) -> list[tuple[str, Any]]:
        blocks = getattr(transformer, "transformer_blocks", None)
        if blocks is None:
            raise TypeError(f"{type(transformer).__name__} has no CogVideoX transformer blocks")
        return [(f"transformer_blocks.{i}.attn1", block.attn1) for i, block in enumerate(blocks)]

    def processor(self, router: AttentionRouter, layer: int, *, fuse_rope: bool) -> Any:
        return CogVideoXSelfAttention(router, layer, fuse_rope)

    def original(self) -> Any:
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

        return CogVideoXAttnProcessor2_0()

    def grid(self, transformer: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Grid:
        return patch_grid(transformer, hidden_of(args, kwargs))

    def dims(self, transformer: Any) -> Dims:
        c = transformer.config
        return Dims(int(c.num_attention_heads), int(c.attention_head_dim), int(c.num_layers))

    def task(self, target: Any) -> Task | None:
        return config_task(routing.config_of(target))


COGVIDEOX = CogVideoXRouting()


def config_task(config: Mapping[str, Any]) -> Task:
    """Image to video where the transformer takes conditioning channels (the I2V checkpoints'
    ``in_channels`` is twice ``out_channels``), else text to video."""
    have, out = config.get("in_channels"), config.get("out_channels")
    return "i2v" if have is not None and out is not None and int(have) != int(out) else "t2v"


def patch_grid(transformer: Any, latents: torch.Tensor) -> Grid:
    """The (T, H, W) latent-patch grid of ``latents`` (batch, frames, channels, height, width)."""
    c = transformer.config
    patch = (int(c.patch_size_t or 1), int(c.patch_size), int(c.patch_size))
    _, frames, _, height, width = latents.shape
    sizes = (int(frames), int(height), int(width))
    return divided(sizes, patch, f"latents {tuple(latents.shape)}: frames, height, width")


def install(transformer: Any, router: AttentionRouter, fuse_rope: bool = True) -> int:
    """Route every block's self-attention of a ``CogVideoXTransformer3DModel``; returns the
    number of layers. Idempotent: installing again replaces the router."""
    return routing.install(COGVIDEOX, transformer, router, fuse_rope)


# -- shapes and checkpoints -----------------------------------------------------------------


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
    """The attention shape of a CogVideoX transformer ``config`` generating ``frames`` x
    ``height`` x ``width`` videos: latents of ((frames - 1) / 4 + 1) x height / 8 x width / 8,
    the latent frames padded up to a multiple of ``patch_size_t`` (1.5) as the pipeline pads
    them, then patched. ``text`` is the config's ``max_text_seq_length`` (the prompt length the
    pipelines pad to); ``task`` is i2v where the transformer takes conditioning channels."""
    missing = [k for k in _KEYS if config.get(k) is None]
    if missing:
        raise BadInput(f"config: {missing[0]}: missing (not a CogVideoX transformer config?)")
    p = int(config["patch_size"])
    p_t = int(config.get("patch_size_t") or 1)
    if frames < 1 or (frames - 1) % VAE_TEMPORAL:
        raise BadInput(f"--frames: {frames} is not 1 + a multiple of {VAE_TEMPORAL}")
    for opt, size in (("--height", height), ("--width", width)):
        if size < 1 or size % (VAE_SPATIAL * p):
            raise BadInput(f"{opt}: {size} is not a multiple of {VAE_SPATIAL * p}")
    latent_frames = (frames - 1) // VAE_TEMPORAL + 1
    latent_frames += -latent_frames % p_t  # the pipeline's padding (CogVideoX 1.5)
    return ModelShape(
        name=name,
        heads=int(config["num_attention_heads"]),
        head_dim=int(config["attention_head_dim"]),
        layers=int(config["num_layers"]),
        grid=(latent_frames // p_t, height // (VAE_SPATIAL * p), width // (VAE_SPATIAL * p)),
        steps=steps,
        cfg=cfg,
        task=config_task(config),
        text=int(config.get("max_text_seq_length") or TEXT_TOKENS),
    )


def transformer_dir(path: str | os.PathLike[str]) -> Path:
    """The folder holding the transformer's ``config.json``: ``path/transformer`` (a pipeline
    checkpoint) or ``path`` itself (a transformer folder)."""
    root = Path(path)
    if not root.is_dir():
        raise BadInput(f"{root}: no such model directory")
    if (root / TRANSFORMER / CONFIG).is_file():
        return root / TRANSFORMER
    if (root / CONFIG).is_file():
        return root
    raise BadInput(f"{root / TRANSFORMER / CONFIG}: no transformer config (nor {root / CONFIG})")


def transformer_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The transformer's config (`transformer_dir`), read without building the model."""
    file = transformer_dir(path) / CONFIG
    config = read_json(file, what="transformer config")
    for key in _KEYS:
        if key not in config:
            raise BadInput(f"{file}: {key}: missing (not a CogVideoX transformer?)")
    return config


def load_cogvideox(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    """(transformer in eval mode on ``device``, scheduler) from a local directory, never
    downloading. The scheduler is ``scheduler/`` beside the transformer folder."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers import CogVideoXTransformer3DModel

    tdir = transformer_dir(path)
    transformer_config(path)
    scheduler = _load_scheduler(tdir.parent / "scheduler")
    try:
        with warnings.catch_warnings():  # torch_dtype is "dtype" in newer diffusers only
            warnings.simplefilter("ignore", FutureWarning)
            model = CogVideoXTransformer3DModel.from_pretrained(
                str(tdir), local_files_only=True, torch_dtype=dtype
            )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise BadInput(f"{tdir}: cannot load the CogVideoX transformer: {one_line(e)}") from None
    return model.to(device=device).eval(), scheduler


def _load_scheduler(sdir: Path) -> Any:
    import diffusers
    from diffusers import SchedulerMixin

    file = sdir / SCHEDULER_CONFIG
    config = read_json(file, what="scheduler config")
    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise BadInput(f"{file}: _class_name: {name!r} is not a diffusers scheduler")
    try:
        return cls.from_config(config)
    except (ValueError, TypeError, KeyError) as e:
        raise BadInput(f"{file}: {one_line(e)}") from None


class CogVideoXAdapter(RoutedAdapter):
    """`fpstune.models.adapters.ModelAdapter` ``cogvideox``: diffusers' CogVideoX transformers
    (1.0: 2B, 5B; 1.5) for `fpstune.apply`, and their attention shape (`RoutedAdapter`)."""

    name = "cogvideox"
    routing = COGVIDEOX
    transformer_class = "CogVideoXTransformer3DModel"
    processor = CogVideoXSelfAttention

    def read_config(self, path: str | os.PathLike[str]) -> Mapping[str, Any]:
        return transformer_config(path)

    def load_checkpoint(
        self, path: str | os.PathLike[str], *, device: torch.device | str, dtype: torch.dtype
    ) -> tuple[Any, Any]:
        return load_cogvideox(path, device=device, dtype=dtype)

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
    "COGVIDEOX",
    "CogVideoXAdapter",
    "CogVideoXRouting",
    "CogVideoXSelfAttention",
    "install",
    "load_cogvideox",
    "model_shape",
    "patch_grid",
    "transformer_config",
    "transformer_dir",
]
