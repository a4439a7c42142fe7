"""Constants of the tiny random-config Wan checkpoint the tests in this folder build."""

from __future__ import annotations

import torch

from fpstune.kernels import AttentionSpec, Mode, ModelShape, Policy, PolicyEntry
from fpstune.kernels.fingerprint import current_fingerprint

#: 2 layers, 2 heads x 16, text_dim 16; 48 x 64 pixels x 9 frames -> latents (4, 3, 6, 8),
#: latent-patch grid 3 x 3 x 4 = 36 tokens.
TEXT_DIM = 16
CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": TEXT_DIM,
    "freq_dim": 16,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 32,
}
HEIGHT, WIDTH, FRAMES = 48, 64, 9
LATENT = (4, 3, 6, 8)
GRID = (3, 3, 4)
STEPS = 4
TEXT_TOKENS = 5
BF16 = AttentionSpec(mode=Mode.BF16_DENSE)


def cell_policy(model: ModelShape, cells: dict[tuple[int, int], AttentionSpec]) -> Policy:
    """A policy for ``model`` on this machine: one entry per (step, layer) cell, BF16 elsewhere."""
    entries = [
        PolicyEntry(steps=(step, step + 1), layers=(layer, layer + 1), spec=spec)
        for (step, layer), spec in cells.items()
    ]
    return Policy(
        model=model,
        hardware=current_fingerprint(torch.device("cpu")),
        default=BF16,
        entries=entries,
    )
