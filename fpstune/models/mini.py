"""The embedded default model ``mini``: diffusers' Wan transformer with a small config.

Videos are 5 frames of 24 x 32 RGB pixels in [-1, 1], modelled directly (no VAE); with Wan's
(1, 2, 2) patches that is a 5 x 12 x 16 latent-patch grid, 960 tokens, 4 heads of 64, 4 layers:
the attention shape of ``studies/mini*.yaml``. Text conditioning is the procedural prompt of
`videos.PromptTable` (kind, colour, direction). `fpstune model train-mini` trains it on a GPU
(`train.py`); the weights ship as safetensors in ``fpstune/data/models/mini.safetensors``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from fpstune.models.loop import Conditions, Sampling
from fpstune.models.videos import PromptTable, random_prompts

FRAMES, HEIGHT, WIDTH = 5, 24, 32
GRID = (5, 12, 16)
STEPS = 10
GUIDANCE = 5.0
FLOW_SHIFT = 3.0
TEXT_DIM = 32
MINI_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "in_channels": 3,
    "out_channels": 3,
    "text_dim": TEXT_DIM,
    "freq_dim": 64,
    "ffn_dim": 768,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 64,
}
WEIGHTS_FILE = "mini.safetensors"


class MissingWeights(FileNotFoundError):
    """The mini model's weights are not where they should be."""


def packaged_weights() -> Path:
    return Path(str(resources.files("fpstune.data.models").joinpath(WEIGHTS_FILE)))


def build_mini(
    *,
    weights: str | Path | None = None,
    random_init: bool = False,
    device: torch.device | str = "cpu",
) -> Any:
    """The mini transformer in float32, eval mode (the loop runs it under bf16 autocast on a
    GPU). ``weights``: a safetensors file (default: the packaged one); ``random_init`` skips
    loading (the untrained model, or the start of training)."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    model: Any = WanTransformer3DModel(**MINI_CONFIG)
    if not random_init:
        path = Path(weights) if weights is not None else packaged_weights()
        if not path.is_file():
            raise MissingWeights(
                f"{path}: mini model weights not found (train them with `fpstune model "
                "train-mini` on a GPU, or reinstall fpstune)"
            )
        from fpstune.safetensors_check import check_safetensors

        check_safetensors(path, what="mini model weights", error=ValueError)
        state = load_file(str(path))
        missing, unexpected = model.load_state_dict(
            {k: v.float() for k, v in state.items()}, strict=False
        )
        if missing or unexpected:
            raise ValueError(
                f"{path}: not mini model weights (missing {len(missing)} tensors, e.g. "
                f"{(missing or unexpected)[0]!r})"
            )
    return model.to(device=device).eval()


def weights_metadata(path: str | Path | None = None) -> dict[str, Any]:
    """The training facts stored in the weights file (steps, final loss, fingerprint)."""
    from safetensors import safe_open

    p = Path(path) if path is not None else packaged_weights()
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("fpstune", "{}"))


def prompt_table() -> PromptTable:
    return PromptTable(TEXT_DIM)


def conditions(seeds: Sequence[int], *, guidance: bool = True) -> Conditions:
    """Initial noise and prompts for ``seeds`` (one video each); the same on every machine."""
    table = prompt_table()
    latents, prompts = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        prompts.append(random_prompts(1, generator=gen).ids)
        latents.append(torch.randn(1, 3, FRAMES, HEIGHT, WIDTH, generator=gen))
    from fpstune.models.videos import Prompts

    ids = Prompts(torch.cat(prompts))
    emb = table.embed(ids, device="cpu")
    return Conditions(
        torch.cat(latents), emb, table.negative(len(ids), device="cpu") if guidance else None
    )


def sampling(steps: int = STEPS, guidance: float = GUIDANCE) -> Sampling:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return Sampling(FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT), steps, guidance)


__all__ = [
    "FRAMES",
    "GRID",
    "HEIGHT",
    "MINI_CONFIG",
    "WIDTH",
    "MissingWeights",
    "build_mini",
    "conditions",
    "packaged_weights",
    "prompt_table",
    "sampling",
    "weights_metadata",
]
