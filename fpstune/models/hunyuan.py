"""HunyuanVideo 1.0 and 1.5 through fpstune: the joint text + video self-attention of diffusers'
``HunyuanVideoTransformer3DModel`` and ``HunyuanVideo15Transformer3DModel``, their
`fpstune.models.routing.Routing` and their adapters.

Every block of HunyuanVideo attends to the video and the prompt in one call, so every block is
routed. 1.0: the routed layer index counts the dual-stream blocks first
(``transformer_blocks[i]``, layers ``0 .. num_layers - 1``), then the single-stream blocks
(``single_transformer_blocks[i]``, layers ``num_layers ..``). 1.5 has dual-stream blocks only
(layer ``i`` is ``transformer_blocks[i]``). `HunyuanVideoJointAttention` serves both: it computes
what diffusers' ``HunyuanVideoAttnProcessor2_0`` / ``HunyuanVideo15AttnProcessor2_0`` compute
and hands the attention itself to the router:

- dual-stream (``attn.add_q_proj`` set): q/k/v of the video from ``to_q/k/v`` and of the text
  from ``add_q/k/v_proj``, each with its own RMS norms; the text tokens after the video;
  ``to_out`` on the video's output, ``to_add_out`` on the text's.
- single-stream (1.0, no added projections): the video and the text concatenated, one
  ``to_q/k/v`` and one pair of norms; no output projection (the block's ``proj_out`` follows).
- RoPE rotates the video tokens only. It is the rotation `fpstune.kernels.rope.rotary` applies
  (diffusers' ``apply_rotary_emb`` with ``use_real``: interleaved pairs, tables repeated per
  pair), so with ``fuse_rope`` (the default) the tables go to the router, which rotates the
  video part (fused into the kernels' pre-pass on the GPU); without it the processor rotates as
  diffusers does.
- the mask. 1.0's transformer builds a (batch, 1, 1, tokens) boolean key mask that keeps every
  video token and the first ``encoder_attention_mask.sum()`` text tokens (the prompt, padding
  after it); 1.5's hands the processor the (batch, text) mask of its reordered text (valid
  image, glyph and prompt tokens first, padding after them). The processor gives the router the
  text part as the prompt mask (`fpstune.models.router.Text`, ``first=False``). 1.5's processor
  also masks padded text tokens as *queries* (a symmetric mask): the router masks keys only, so
  a padded text token's own output differs, but it never reaches a kept token (it is a masked
  key in every later block and is dropped at the end): the video's output is the same, and an
  all-BF16 policy reproduces either model bit for bit (the tests check both).

The token refiner's text-only self-attention (``context_embedder``) is not routed. 1.0's
token-replace variant (``image_condition_type="token_replace"``, image to video) has the same
attention and is routed the same way.

Two adapters, one per transformer class (a `Routing`'s ``original`` processor is per class):
`HunyuanVideoAdapter` (``hunyuanvideo``) and `HunyuanVideo15Adapter` (``hunyuanvideo-1.5``).
Both give `fpstune.apply` the routing and read a checkpoint's config and attention shape
(`Family`: the VAE's compression and the text length differ); capture, replay and the
denoising loop for this family are not built yet (`fpstune.models.adapters.NoModel`).
Known gap (outside this module): `fpstune.apply` takes the pipeline's task from
`fpstune.models.wan.task_of`, which reads ``in_channels`` > ``out_channels`` as image to video;
1.5's text-to-video transformer has conditioning channels too (65 in, 32 out), so a ``t2v``
policy is refused on it until `task_of` asks the adapter (1.5: the config's ``task_type``).
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Family:
    """What differs between HunyuanVideo 1.0 and 1.5 outside the attention processor."""

    label: str
    #: the diffusers transformer class and its own attention processor (class, module)
    transformer: str
    processor: str
    processor_module: str
    #: the config keys `checkpoint_config` requires
    required: tuple[str, ...]
    #: whether the model has single-stream blocks (routed after the dual-stream ones)
    single: bool
    #: the VAE's compression (frames after the first per latent frame; pixels per latent)
    temporal: int
    spatial: int
    #: the text tokens every joint call attends to with the pipeline's defaults
    text: int


_KEYS: tuple[str, ...] = ("num_attention_heads", "attention_head_dim", "num_layers")
_KEYS += ("patch_size", "patch_size_t", "in_channels")
_DIFFUSERS = "diffusers.models.transformers."
#: HunyuanVideo 1.0: the prompt padded to the pipeline's ``max_sequence_length`` (256)
V1 = Family(
    label="HunyuanVideo",
    transformer="HunyuanVideoTransformer3DModel",
    processor="HunyuanVideoAttnProcessor2_0",
    processor_module=_DIFFUSERS + "transformer_hunyuan_video",
    required=(*_KEYS, "num_single_layers"),
    single=True,
    temporal=4,
    spatial=8,
    text=256,
)
#: HunyuanVideo 1.5: the Qwen prompt (1000 tokens), the ByT5 glyph prompt (256) and the SigLIP
#: image tokens (729, zeros and masked for text to video), as its pipelines pad them
V15 = Family(
    label="HunyuanVideo 1.5",
    transformer="HunyuanVideo15Transformer3DModel",
    processor="HunyuanVideo15AttnProcessor2_0",
    processor_module=_DIFFUSERS + "transformer_hunyuan_video15",
    required=(*_KEYS, "text_embed_2_dim", "image_embed_dim"),
    single=False,
    temporal=4,
    spatial=16,
    text=1000 + 256 + 729,
)
#: HunyuanVideo 1.0's text tokens (the pipeline's default ``max_sequence_length``)
TEXT_TOKENS = V1.text


class HunyuanVideoJointAttention:
    """Processor for one HunyuanVideo block's ``attn`` (dual- or single-stream, told apart by
    ``attn.add_q_proj``); ``layer`` is the routed layer. ``fuse_rope``: hand the rotary tables
    to the router instead of rotating here as diffusers does."""

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
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("fpstune's HunyuanVideo processor serves joint text + video attention")
        n_text = encoder_hidden_states.shape[1]
        dual = attn.add_q_proj is not None
        # 1. q/k/v as (batch, tokens, heads, dim), video tokens first, then the text's
        x = hidden_states if dual else torch.cat([hidden_states, encoder_hidden_states], dim=1)
        q = attn.to_q(x).unflatten(2, (attn.heads, -1))
        k = attn.to_k(x).unflatten(2, (attn.heads, -1))
        v = attn.to_v(x).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        rope = None
        if image_rotary_emb is not None and self.fuse_rope:
            rope = image_rotary_emb
        elif image_rotary_emb is not None:
            q, k = _rotate_video(q, k, image_rotary_emb, 0 if dual else n_text)
        if dual:
            eq = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            ek = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            q, k, v = (
                torch.cat([q, eq], dim=1),
                torch.cat([k, ek], dim=1),
                torch.cat([v, ev], dim=1),
            )
        # 2. attention, (batch, heads, tokens, dim) as the router takes it
        text = Text(n_text, first=False, mask=prompt_mask(attention_mask, n_text))
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = _route(self, qt, kt, vt, rope, text).flatten(2, 3).to(q.dtype)
        # 3. output projections
        video, prompt = out[:, :-n_text], out[:, -n_text:]
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            prompt = attn.to_add_out(prompt)
        return video, prompt


def _rotate_video(
    q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], n_text: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k (batch, tokens, heads, dim) with their first tokens (all but the last ``n_text``)
    rotated by diffusers' own ``apply_rotary_emb``, as its processor does."""
    from diffusers.models.embeddings import apply_rotary_emb

    rotate: Any = apply_rotary_emb  # diffusers types it as returning a pair; it returns one
    if not n_text:
        return rotate(q, rope, sequence_dim=1), rotate(k, rope, sequence_dim=1)
    q = torch.cat([rotate(q[:, :-n_text], rope, sequence_dim=1), q[:, -n_text:]], dim=1)
    k = torch.cat([rotate(k[:, :-n_text], rope, sequence_dim=1), k[:, -n_text:]], dim=1)
    return q, k


def prompt_mask(attention_mask: torch.Tensor | None, n_text: int) -> torch.Tensor | None:
    """The (batch, text) prompt mask: the text part of 1.0's key mask (batch, 1, 1, tokens),
    whose video part keeps every token (as ``HunyuanVideoTransformer3DModel`` builds it), or
    1.5's (batch, text) mask as it is; None without a mask. A float (additive) mask is
    refused."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool:
        raise ValueError(
            f"fpstune's HunyuanVideo processor takes a boolean key mask, got {attention_mask.dtype}"
        )
    if attention_mask.dim() == 4 and attention_mask.shape[1:3] == (1, 1):
        attention_mask = attention_mask[:, 0, 0]
    if attention_mask.dim() != 2:
        raise ValueError(
            f"fpstune's HunyuanVideo processor takes a (batch, 1, 1, tokens) key mask, got "
            f"{tuple(attention_mask.shape)}"
        )
    return attention_mask[:, -n_text:]


@torch.compiler.disable
def _route(
    processor: HunyuanVideoJointAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    text: Text,
) -> torch.Tensor:
    """The router's output as (batch, tokens, heads, dim), contiguous; outside any compiled
    graph for the reasons `fpstune.models.processor._route` gives."""
    out = processor.router.run(processor.layer, q, k, v, rope=rope, text=text)
    return out.transpose(1, 2).contiguous()


class HunyuanVideoRouting:
    """`fpstune.models.routing.Routing` for ``HunyuanVideoTransformer3DModel`` (``family`` `V1`:
    every dual-stream block's ``attn``, then every single-stream block's) or
    ``HunyuanVideo15Transformer3DModel`` (`V15`: every block's ``attn``)."""

    def __init__(self, family: Family = V1) -> None:
        self.family = family

    def modules(self, transformer: Any) -> list[tuple[str, Any]]:
        dual = getattr(transformer, "transformer_blocks", None)
        single = (
            getattr(transformer, "single_transformer_blocks", None) if self.family.single else ()
        )
        if dual is None or single is None:
            raise TypeError(
                f"{type(transformer).__name__} has no {self.family.label} transformer blocks"
            )
        return [(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(dual)] + [
            (f"single_transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(single)
        ]

    def processor(self, router: AttentionRouter, layer: int, *, fuse_rope: bool) -> Any:
        return HunyuanVideoJointAttention(router, layer, fuse_rope)

    def original(self) -> Any:
        module = importlib.import_module(self.family.processor_module)
        return getattr(module, self.family.processor)()

    def grid(self, transformer: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Grid:
        latents = hidden_of(args, kwargs)
        c = transformer.config
        patch = (int(c.patch_size_t), int(c.patch_size), int(c.patch_size))
        return divided(tuple(latents.shape[2:]), patch, f"latents {tuple(latents.shape)}: sizes")

    def dims(self, transformer: Any) -> Dims:
        c = transformer.config
        layers = int(c.num_layers) + (int(c.num_single_layers) if self.family.single else 0)
        return Dims(int(c.num_attention_heads), int(c.attention_head_dim), layers)

    def task(self, target: Any) -> Task | None:
        return config_task(routing.config_of(target), self.family)


def config_task(config: Mapping[str, Any], family: Family) -> Task:
    """1.0 is image to video with an ``image_condition_type``; 1.5 as its ``task_type`` says
    (diffusers' default: i2v)."""
    if family.single:
        return "i2v" if config.get("image_condition_type") else "t2v"
    return "i2v" if config.get("task_type", "i2v") == "i2v" else "t2v"


HUNYUAN_VIDEO = HunyuanVideoRouting(V1)
HUNYUAN_VIDEO_15 = HunyuanVideoRouting(V15)


def install(transformer: Any, router: AttentionRouter, fuse_rope: bool = True) -> int:
    """Route every block's joint attention of a ``HunyuanVideoTransformer3DModel`` or a
    ``HunyuanVideo15Transformer3DModel``; returns the number of layers. Idempotent
    (re-installing replaces the router)."""
    return routing.install(routing_of(transformer), transformer, router, fuse_rope)


def routing_of(transformer: Any) -> HunyuanVideoRouting:
    """The routing of a HunyuanVideo 1.0 or 1.5 transformer (by its class name)."""
    name = type(transformer).__name__
    for r in (HUNYUAN_VIDEO, HUNYUAN_VIDEO_15):
        if name == r.family.transformer:
            return r
    raise TypeError(f"{name} is not a HunyuanVideo 1.0 or 1.5 transformer")


# -- checkpoint config and shape ---------------------------------------------------------------


def checkpoint_config(path: str | os.PathLike[str], family: Family = V1) -> dict[str, Any]:
    """``<path>/transformer/config.json`` (a pipeline folder) or ``<path>/config.json`` (the
    transformer's own folder), read without building the model; with a ``vae/config.json``
    beside the transformer, its compression ratios as ``vae_scale_factor_temporal`` /
    ``vae_scale_factor_spatial``."""
    root = Path(path)
    if not root.is_dir():
        raise BadInput(f"{root}: no such model directory")
    file = root / "transformer" / "config.json"
    if not file.is_file():
        file = root / "config.json"
    if not file.is_file():
        raise BadInput(
            f"{root / 'transformer' / 'config.json'}: no transformer config (nor {file})"
        )
    config = read_json(file, what="transformer config")
    for key in family.required:
        if key not in config:
            raise BadInput(f"{file}: {key}: missing (not a {family.label} transformer?)")
    vae = file.parent.parent / "vae" / "config.json"
    if vae.is_file():
        cfg = read_json(vae, what="VAE config")
        temporal = cfg.get("temporal_compression_ratio", family.temporal)
        spatial = cfg.get("spatial_compression_ratio", family.spatial)
        config["vae_scale_factor_temporal"], config["vae_scale_factor_spatial"] = temporal, spatial
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
    text: int | None = None,
    family: Family = V1,
) -> ModelShape:
    """The attention shape of a HunyuanVideo transformer ``config`` generating ``frames`` x
    ``height`` x ``width`` videos in ``steps`` steps, ``cfg`` passes per step (1 for 1.0's
    guidance-distilled model, 2 with true CFG or 1.5's CFG), the joint calls attending to
    ``text`` tokens (default: the family's pipeline defaults). The VAE's compression is the one
    `checkpoint_config` recorded, else the family's. The task: 1.0 is image to video with an
    ``image_condition_type``, 1.5 as its ``task_type`` says."""
    from fpstune.models.wan import VaeScale, latent_shape

    try:
        p, p_t = int(config["patch_size"]), int(config["patch_size_t"])
        scale = VaeScale(
            int(config.get("vae_scale_factor_temporal") or family.temporal),
            int(config.get("vae_scale_factor_spatial") or family.spatial),
        )
        as_wan = {"patch_size": (p_t, p, p), "in_channels": int(config["in_channels"])}
        heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
        layers = int(config["num_layers"])
        layers += int(config["num_single_layers"]) if family.single else 0
    except KeyError as e:
        raise BadInput(f"{family.label} transformer config: {e.args[0]}: missing") from None
    except (TypeError, ValueError) as e:
        raise BadInput(f"{family.label} transformer config: {one_line(e)}") from None
    _, f, h, w = latent_shape(as_wan, height=height, width=width, frames=frames, scale=scale)
    return ModelShape(
        name=name,
        heads=heads,
        head_dim=head_dim,
        layers=layers,
        grid=(f // p_t, h // p, w // p),
        steps=steps,
        cfg=cfg,
        task=config_task(config, family),
        text=family.text if text is None else text,
    )


def load(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    family: Family = V1,
) -> tuple[Any, Any]:
    """(transformer in eval mode on ``device``, scheduler) from a local pipeline folder (its
    ``transformer/`` and ``scheduler/``), never downloading."""
    from fpstune.models.wan import load_scheduler

    os.environ["HF_HUB_OFFLINE"] = "1"
    import diffusers

    root = Path(path)
    checkpoint_config(root, family)
    sub = "transformer" if (root / "transformer" / "config.json").is_file() else None
    tdir = root / sub if sub else root
    cls = getattr(diffusers, family.transformer)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = cls.from_pretrained(
                str(root), subfolder=sub, local_files_only=True, torch_dtype=dtype
            )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise BadInput(
            f"{tdir}: cannot load the {family.label} transformer: {one_line(e)}"
        ) from None
    scheduler_root = root if sub else root.parent
    if not (scheduler_root / "scheduler").is_dir():
        raise BadInput(
            f"{scheduler_root / 'scheduler'}: no scheduler subfolder (expected a diffusers "
            f"{family.label} pipeline folder)"
        )
    return model.to(device=device).eval(), load_scheduler(scheduler_root)


class HunyuanVideoAdapter(RoutedAdapter):
    """HunyuanVideo 1.0 (``HunyuanVideoTransformer3DModel``) for `fpstune.apply`, its config and
    shape (`RoutedAdapter`)."""

    name = "hunyuanvideo"
    routing: HunyuanVideoRouting = HUNYUAN_VIDEO
    transformer_class = V1.transformer
    processor = HunyuanVideoJointAttention

    def read_config(self, path: str | os.PathLike[str]) -> Mapping[str, Any]:
        return checkpoint_config(path, self.routing.family)

    def load_checkpoint(
        self, path: str | os.PathLike[str], *, device: torch.device | str, dtype: torch.dtype
    ) -> tuple[Any, Any]:
        return load(path, device=device, dtype=dtype, family=self.routing.family)

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
        text: int | None = None,
    ) -> ModelShape:
        """`model_shape`; ``text`` defaults to the family's pipeline default (1.0: 256)."""
        return model_shape(
            config,
            name=name,
            height=height,
            width=width,
            frames=frames,
            steps=steps,
            cfg=cfg,
            text=text,
            family=self.routing.family,
        )


class HunyuanVideo15Adapter(HunyuanVideoAdapter):
    """HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``), as `HunyuanVideoAdapter`; its
    shape's text defaults to 1985 tokens (`V15`), its task is the config's ``task_type``."""

    name = "hunyuanvideo-1.5"
    routing = HUNYUAN_VIDEO_15
    transformer_class = V15.transformer


__all__ = [
    "HUNYUAN_VIDEO",
    "HUNYUAN_VIDEO_15",
    "TEXT_TOKENS",
    "V1",
    "V15",
    "Family",
    "HunyuanVideo15Adapter",
    "HunyuanVideoAdapter",
    "HunyuanVideoJointAttention",
    "HunyuanVideoRouting",
    "checkpoint_config",
    "install",
    "load",
    "model_shape",
    "prompt_mask",
    "routing_of",
]
