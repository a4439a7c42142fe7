"""Prompt embeddings for a capture: from a safetensors file, or from the checkpoint's own text
encoder through diffusers' `WanPipeline.encode_prompt` (offline, when the directory holds one).

A file holds ``prompt_embeds`` (batch, tokens, text_dim) and, for classifier-free guidance,
``negative_prompt_embeds`` of the same shape; a batch of 1 is used for every seed, a batch of n
pairs prompt i with seed i. Everything wrong is a `BadInput` naming the file (or option) and field.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from fpstune.errors import BadInput

PROMPT = "prompt_embeds"
NEGATIVE = "negative_prompt_embeds"
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default


def load_prompt_embeds(
    path: str | os.PathLike[str], *, text_dim: int, videos: int, guided: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt, negative or None) from ``path``, each with batch ``videos``."""
    from safetensors import SafetensorError, safe_open

    from fpstune.safetensors_check import check_safetensors

    where = str(path)
    if not Path(path).is_file():
        raise BadInput(f"{where}: no such prompt embeddings file")
    # the header from the bytes first: dtypes, declared sizes (the library would allocate them)
    check_safetensors(path, what="prompt embeddings file", error=BadInput, cap=2**30)
    try:
        with safe_open(where, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise BadInput(f"{where}: not a safetensors file: {' '.join(str(e).split())}") from None
    if PROMPT not in tensors:
        raise BadInput(f"{where}: {PROMPT}: missing (tensors: {sorted(tensors) or 'none'})")
    if guided and NEGATIVE not in tensors:
        raise BadInput(
            f"{where}: {NEGATIVE}: missing (needed for classifier-free guidance; or --guidance 1)"
        )
    prompt = _check(tensors[PROMPT], where, PROMPT, text_dim=text_dim, videos=videos)
    if not guided:
        return prompt, None
    negative = _check(tensors[NEGATIVE], where, NEGATIVE, text_dim=text_dim, videos=videos)
    return prompt, negative


def encode_prompts(
    root: Path,
    prompt: str,
    negative: str,
    *,
    videos: int,
    guided: bool,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode with the checkpoint's text encoder (``text_encoder/`` + ``tokenizer/``, named by
    ``model_index.json``) via `WanPipeline.encode_prompt`; no transformer or VAE is loaded."""
    for sub in ("model_index.json", "text_encoder", "tokenizer"):
        if not (root / sub).exists():
            raise BadInput(
                f"{root / sub}: --prompt needs the checkpoint's text encoder (a full WanPipeline "
                "directory); pass --prompt-embeds instead"
            )
    try:
        import transformers  # noqa: F401  (WanPipeline's text encoder and tokenizer)
    except ImportError:
        raise BadInput(
            "--prompt: encoding text needs the transformers package (pip install "
            "transformers); or pass --prompt-embeds"
        ) from None
    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers import WanPipeline

    try:
        with warnings.catch_warnings():  # torch_dtype is "dtype" in newer diffusers only
            warnings.simplefilter("ignore", FutureWarning)
            pipe: Any = WanPipeline.from_pretrained(
                str(root), transformer=None, vae=None, local_files_only=True, torch_dtype=dtype
            )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise BadInput(
            f"{root}: cannot load the text encoder: {' '.join(str(e).split())}"
        ) from None
    pipe.text_encoder.to(device)
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(
            [prompt] * videos,
            [negative] * videos,
            do_classifier_free_guidance=guided,
            max_sequence_length=max_sequence_length,
            device=torch.device(device),
            dtype=dtype,
        )
    return pos.cpu(), (neg.cpu() if guided else None)


def _check(t: torch.Tensor, where: str, name: str, *, text_dim: int, videos: int) -> torch.Tensor:
    if t.dim() != 3:
        raise BadInput(f"{where}: {name}: shape {list(t.shape)}, expected (batch, tokens, dim)")
    if t.shape[-1] != text_dim:
        raise BadInput(f"{where}: {name}: dim {t.shape[-1]}, the model's text_dim is {text_dim}")
    if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
        raise BadInput(f"{where}: {name}: not finite floating-point values")
    if t.shape[0] == 1:
        return t.expand(videos, -1, -1).contiguous()
    if t.shape[0] != videos:
        raise BadInput(
            f"{where}: {name}: batch {t.shape[0]}, expected 1 or {videos} (one per seed)"
        )
    return t


__all__ = ["MAX_SEQUENCE_LENGTH", "encode_prompts", "load_prompt_embeds"]
