"""The diffusers Wan adapter: a user's own checkpoint from a local diffusers-format directory.

``load_wan(dir)`` reads ``dir/transformer`` (``WanTransformer3DModel.from_pretrained``) and
``dir/scheduler/scheduler_config.json`` (the scheduler class named by its ``_class_name``). It
never downloads: ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``. Everything a user can get
wrong (a missing directory, subfolder, config or weight shard, a truncated weight file, a
scheduler class diffusers does not have) is a `BadInput` naming the path: one line, CLI exit 2.

`model_shape` gives the attention shape (`ModelShape`, what studies and policies name) of the
checkpoint at a video size: Wan's VAE turns (frames, height, width) pixels into
((frames - 1) / 4 + 1, height / 8, width / 8) latents, the transformer's patches (1, 2, 2) into
the latent-patch grid, e.g. 480 x 832 x 81 -> 21 x 30 x 52. Wan 2.2's VAE (TI2V-5B: z_dim 48,
its own 2 x 2 patchify) compresses 16 x spatially: `checkpoint_config` carries the checkpoint's VAE
scale into the config (``vae_scale_factor_temporal`` / ``_spatial``, the names `WanPipeline`
gives them) so that `model_shape` of that config gives the pipeline's grid.

`task_of` says what a pipeline generates: ``t2v`` (text to video) or ``i2v`` (image to video:
2.1's CLIP image tokens in cross-attention, 2.2's conditioning latents); a policy's
``model.task`` records it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fpstune.errors import BadInput, one_line
from fpstune.kernels.policy import ModelShape, Task
from fpstune.models.family import read_json

TRANSFORMER = "transformer"
SCHEDULER = "scheduler"
SCHEDULER_CONFIG = "scheduler_config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
#: the keys `checkpoint_config` adds for the VAE's compression (as `WanPipeline` names them)
VAE_SCALE_KEYS = ("vae_scale_factor_temporal", "vae_scale_factor_spatial")


@dataclass(frozen=True)
class VaeScale:
    """Pixels per latent: ``temporal`` frames (after the first) and ``spatial`` pixels."""

    temporal: int = 4
    spatial: int = 8


def load_wan(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    """(transformer in eval mode on ``device``, scheduler) from a local checkpoint directory."""
    root = Path(path)
    check_checkpoint(root)
    transformer = load_transformer(root, device=device, dtype=dtype)
    return transformer, load_scheduler(root)


def check_checkpoint(root: Path) -> None:
    """Every file `load_wan` reads is there and readable (so loading fails before any work)."""
    if not root.is_dir():
        raise BadInput(f"{root}: no such model directory")
    if _is_two_expert(root):
        raise BadInput(
            f"{root / 'model_index.json'}: transformer_2: two-expert Wan 2.2 checkpoints are not "
            "supported (one transformer per checkpoint)"
        )
    tdir = root / TRANSFORMER
    transformer_config(root)
    for shard in _weight_files(tdir):
        _check_safetensors(shard)
    _scheduler_config(root)


def transformer_config(root: Path) -> dict[str, Any]:
    """``root/transformer/config.json`` (read without building the model)."""
    tdir = root / TRANSFORMER
    if not tdir.is_dir():
        raise BadInput(f"{tdir}: no transformer subfolder (expected a diffusers Wan checkpoint)")
    config = read_json(tdir / "config.json", what="transformer config")
    keys = ("patch_size", "in_channels", "num_attention_heads", "attention_head_dim")
    for key in (*keys, "num_layers", "text_dim"):
        if key not in config:
            raise BadInput(f"{tdir / 'config.json'}: {key}: missing (not a Wan transformer?)")
    return config


def checkpoint_config(root: Path) -> dict[str, Any]:
    """`transformer_config` plus the VAE's compression (`VAE_SCALE_KEYS`) when ``root`` has a
    ``vae/``: the config `model_shape` turns into the pipeline's own latent grid."""
    config = transformer_config(root)
    if has_vae(root):
        scale = vae_scale(root)
        config |= dict(zip(VAE_SCALE_KEYS, (scale.temporal, scale.spatial), strict=True))
    return config


def config_scale(config: Mapping[str, Any]) -> VaeScale:
    """The VAE scale `checkpoint_config` put in ``config``; Wan 2.1's (4, 8) without it."""
    temporal, spatial = (config.get(k) for k in VAE_SCALE_KEYS)
    return VaeScale(int(temporal or 4), int(spatial or 8))


def task_of(pipe: Any) -> Task | None:
    """``"i2v"`` or ``"t2v"``: what ``pipe`` (a diffusers pipeline or a bare Wan transformer)
    generates, or None when a bare transformer does not say (Wan 2.1 T2V and TI2V-5B, which does
    both, have the same shape). A pipeline says by its class; a transformer is image-to-video when
    it takes CLIP image tokens (``image_dim``, 2.1) or conditioning channels (``in_channels`` >
    ``out_channels``, 2.1 / 2.2 I2V)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    if isinstance(pipe, WanImageToVideoPipeline):
        return "i2v"
    if isinstance(pipe, WanPipeline):
        return "t2v"
    for name in ("transformer", "transformer_2", None):
        module = pipe if name is None else getattr(pipe, name, None)
        module = getattr(module, "_orig_mod", module)
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "get"):
            continue
        if config.get("image_dim") is not None:
            return "i2v"
        have, out = config.get("in_channels"), config.get("out_channels")
        if have is not None and out is not None and int(have) != int(out):
            return "i2v"
    return None


def load_transformer(
    root: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """The transformer alone (all replay needs); `check_checkpoint` first for clear errors."""
    _offline()
    from diffusers import WanTransformer3DModel

    tdir = root / TRANSFORMER
    if not tdir.is_dir():
        raise BadInput(f"{tdir}: no transformer subfolder (expected a diffusers Wan checkpoint)")
    try:
        with warnings.catch_warnings():  # torch_dtype is "dtype" in newer diffusers only
            warnings.simplefilter("ignore", FutureWarning)
            model = WanTransformer3DModel.from_pretrained(
                str(root), subfolder=TRANSFORMER, local_files_only=True, torch_dtype=dtype
            )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise BadInput(f"{tdir}: cannot load the Wan transformer: {one_line(e)}") from None
    return model.to(device=device).eval()


def has_vae(root: Path) -> bool:
    """Whether ``root`` holds a VAE (``vae/config.json``), so generated latents can be decoded."""
    return (root / "vae" / "config.json").is_file()


def load_vae(
    root: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """The checkpoint's ``AutoencoderKLWan`` (eval mode), for decoding final latents to frames."""
    _offline()
    from diffusers import AutoencoderKLWan

    vdir = root / "vae"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            vae = AutoencoderKLWan.from_pretrained(
                str(root), subfolder="vae", local_files_only=True, torch_dtype=dtype
            )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise BadInput(f"{vdir}: cannot load the Wan VAE: {one_line(e)}") from None
    return vae.to(device=device).eval()


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Frames (n, 3, F, H, W), about [-1, 1], of (n, C, T, h, w) latents, one video at a time,
    as `WanPipeline.__call__` decodes them (un-normalised by the VAE's latents mean and std)."""
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)
    param = next(vae.parameters())
    videos = []
    with torch.no_grad():
        for z in latents.split(1):
            z = z.to(param) * std.to(param) + mean.to(param)
            videos.append(vae.decode(z, return_dict=False)[0].float())
    return torch.cat(videos)


def load_scheduler(root: Path) -> Any:
    """The scheduler of ``root/scheduler`` (class from its config's ``_class_name``)."""
    import diffusers
    from diffusers import SchedulerMixin

    file, config = _scheduler_config(root)
    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise BadInput(f"{file}: _class_name: {name!r} is not a diffusers scheduler")
    try:
        return cls.from_config(config)
    except (ValueError, TypeError, KeyError) as e:
        raise BadInput(f"{file}: {one_line(e)}") from None


def vae_scale(root: Path) -> VaeScale:
    """The VAE's compression from ``root/vae/config.json`` when there is one, else Wan's (4, 8)."""
    file = root / "vae" / "config.json"
    if not file.is_file():
        return VaeScale()
    cfg = read_json(file, what="VAE config")
    down = cfg.get("temperal_downsample")  # sic: diffusers' spelling
    temporal = cfg.get("scale_factor_temporal") or (2 ** sum(map(bool, down)) if down else 4)
    # Wan 2.2's VAE patchifies 2 x 2 before its downsampling stages (16 x in all)
    patch = int(cfg.get("patch_size") or 1)
    spatial = cfg.get("scale_factor_spatial") or (2 ** len(down) * patch if down else 8 * patch)
    return VaeScale(int(temporal), int(spatial))


def latent_shape(
    config: Mapping[str, Any],
    *,
    height: int,
    width: int,
    frames: int,
    scale: VaeScale = VaeScale(),
) -> tuple[int, int, int, int]:
    """(channels, frames, height, width) of one video's latents for a transformer ``config``
    (``transformer.config`` or `transformer_config`); BadInput naming the option when a size
    does not fit the VAE and the patch size (the pipeline would round it silently)."""
    p_t, p_h, p_w = config["patch_size"]
    if frames < 1 or (frames - 1) % scale.temporal:
        raise BadInput(f"--frames: {frames} is not 1 + a multiple of {scale.temporal}")
    for opt, size, patch in (("--height", height, p_h), ("--width", width, p_w)):
        if size < 1 or size % (scale.spatial * patch):
            raise BadInput(f"{opt}: {size} is not a multiple of {scale.spatial * patch}")
    f = (frames - 1) // scale.temporal + 1
    if f % p_t:
        raise BadInput(f"--frames: {f} latent frames are not a multiple of the patch {p_t}")
    channels = int(config["in_channels"])
    return (channels, f, height // scale.spatial, width // scale.spatial)


def model_shape(
    config: Mapping[str, Any],
    *,
    name: str,
    height: int,
    width: int,
    frames: int,
    steps: int,
    cfg: int,
    scale: VaeScale | None = None,
    task: Task = "t2v",
) -> ModelShape:
    """The attention shape of a transformer ``config`` generating ``frames`` x ``height`` x
    ``width`` videos in ``steps`` steps with ``cfg`` attention passes per step. ``scale``: the
    VAE's compression, by default the one `checkpoint_config` recorded (else Wan 2.1's)."""
    if scale is None:
        scale = config_scale(config)
    _, f, h, w = latent_shape(config, height=height, width=width, frames=frames, scale=scale)
    p_t, p_h, p_w = config["patch_size"]
    return ModelShape(
        name=name,
        heads=int(config["num_attention_heads"]),
        head_dim=int(config["attention_head_dim"]),
        layers=int(config["num_layers"]),
        grid=(f // p_t, h // p_h, w // p_w),
        steps=steps,
        cfg=cfg,
        task=task,
    )


# -- helpers ---------------------------------------------------------------------------------


def _offline() -> None:
    # Belt and braces: local_files_only already keeps diffusers off the network; this also
    # covers huggingface_hub calls made on our behalf.
    os.environ["HF_HUB_OFFLINE"] = "1"


def _is_two_expert(root: Path) -> bool:
    file = root / "model_index.json"
    if not file.is_file():
        return False
    index = read_json(file, what="pipeline index")
    second = index.get("transformer_2")
    return isinstance(second, list) and any(x is not None for x in second)


def _weight_files(tdir: Path) -> list[Path]:
    index = tdir / WEIGHTS_INDEX
    if index.is_file():
        data = read_json(index, what="weight index")
        shards = data.get("weight_map")
        if not isinstance(shards, dict) or not shards:
            raise BadInput(f"{index}: weight_map: missing or empty")
        files = [tdir / str(s) for s in sorted(set(shards.values()))]
        for f in files:
            if not f.is_file():
                raise BadInput(f"{f}: weight shard listed in {index.name} is missing")
        return files
    single = tdir / WEIGHTS
    if not single.is_file():
        raise BadInput(f"{single}: no transformer weights (nor {WEIGHTS_INDEX})")
    return [single]


def _check_safetensors(file: Path) -> None:
    # Reads the header only; catches truncated or foreign files before a long load starts.
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise BadInput(f"{file}: unreadable weights: {one_line(e)}") from None


def _scheduler_config(root: Path) -> tuple[Path, dict[str, Any]]:
    sdir = root / SCHEDULER
    if not sdir.is_dir():
        raise BadInput(f"{sdir}: no scheduler subfolder (expected a diffusers Wan checkpoint)")
    file = sdir / SCHEDULER_CONFIG
    return file, read_json(file, what="scheduler config")


__all__ = [
    "VAE_SCALE_KEYS",
    "VaeScale",
    "check_checkpoint",
    "checkpoint_config",
    "config_scale",
    "decode",
    "has_vae",
    "latent_shape",
    "load_scheduler",
    "load_transformer",
    "load_vae",
    "load_wan",
    "model_shape",
    "task_of",
    "transformer_config",
    "vae_scale",
]
