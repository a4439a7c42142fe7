"""Procedural training videos for the embedded mini model: textured shapes that move and bounce.

Everything is generated from a seed on the device (no downloads, no files). A video is a
(3, frames, height, width) tensor in [-1, 1]: a smooth two-colour background gradient and one
shape (disc, square or ring; striped or checkered texture) moving at constant velocity and
bouncing off the frame's edges. Its *prompt* is the tuple (shape kind, colour, direction of
motion), embedded as a short token sequence by a fixed seeded table (`PromptTable`), so the model
learns real text conditioning and classifier-free guidance has something to amplify.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("disc", "square", "ring")
PALETTE = (
    (0.95, 0.25, 0.2),
    (0.2, 0.75, 0.3),
    (0.25, 0.4, 0.95),
    (0.95, 0.85, 0.2),
    (0.85, 0.3, 0.85),
    (0.2, 0.85, 0.9),
)
DIRECTIONS = 8  # motion direction classes (45 degrees apart)
PROMPT_TOKENS = 3  # kind, colour, direction


@dataclass(frozen=True)
class Prompts:
    """Integer prompt attributes, one row per video: (kind, colour, direction)."""

    ids: torch.Tensor  # (n, 3) int64

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class PromptTable:
    """Fixed, seeded embedding of prompt attributes into (n, PROMPT_TOKENS, dim) token sequences.

    The negative (unconditional) prompt is all zeros, as in training's condition dropout.
    """

    def __init__(self, dim: int, *, seed: int = 1234) -> None:
        gen = torch.Generator().manual_seed(seed)
        sizes = (len(KINDS), len(PALETTE), DIRECTIONS)
        self.tables = [torch.randn(n, dim, generator=gen) for n in sizes]
        self.dim = dim

    def embed(self, prompts: Prompts, *, device: torch.device | str) -> torch.Tensor:
        cols = [t.to(device)[prompts.ids[:, i].to(device)] for i, t in enumerate(self.tables)]
        return torch.stack(cols, dim=1)

    def negative(self, n: int, *, device: torch.device | str) -> torch.Tensor:
        return torch.zeros(n, PROMPT_TOKENS, self.dim, device=device)


def random_prompts(n: int, *, generator: torch.Generator) -> Prompts:
    kind = torch.randint(len(KINDS), (n,), generator=generator)
    colour = torch.randint(len(PALETTE), (n,), generator=generator)
    direction = torch.randint(DIRECTIONS, (n,), generator=generator)
    return Prompts(torch.stack((kind, colour, direction), dim=1))


def render(
    prompts: Prompts,
    *,
    frames: int,
    height: int,
    width: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Videos for ``prompts``: (n, 3, frames, height, width) in [-1, 1]. The prompt fixes kind,
    colour and direction; size, start, speed, texture and background are drawn from
    ``generator`` (a CPU generator, so the same seed gives the same videos on any device)."""
    n = len(prompts)
    ids = prompts.ids

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, *shape, generator=generator)).to(device)

    radius = u(0.16, 0.3) * min(height, width)  # (n,)
    speed = u(1.5, 3.5)  # pixels per frame
    angle = ids[:, 2].to(device).float() * (2 * math.pi / DIRECTIONS) + u(-0.2, 0.2)
    start_y, start_x = u(0, 1) * height, u(0, 1) * width
    stripe_freq, stripe_angle = u(0.6, 1.4), u(0, math.pi)
    checker = (torch.rand(n, generator=generator) < 0.5).to(device)
    bg_a, bg_b, bg_dir = u(-0.6, 0.2, 3), u(-0.6, 0.2, 3), u(0, 2 * math.pi)

    t = torch.arange(frames, device=device).float().view(1, frames, 1, 1)
    ys = torch.arange(height, device=device).float().view(1, 1, height, 1) + 0.5
    xs = torch.arange(width, device=device).float().view(1, 1, 1, width) + 0.5

    def col(x: torch.Tensor) -> torch.Tensor:
        return x.view(n, 1, 1, 1)

    cy = _bounce(col(start_y) + col(speed * torch.sin(angle)) * t, col(radius), height)
    cx = _bounce(col(start_x) + col(speed * torch.cos(angle)) * t, col(radius), width)
    dy, dx = ys - cy, xs - cx
    r = col(radius)
    kind = col(ids[:, 0].to(device))
    dist = torch.sqrt(dy.square() + dx.square())
    cheb = torch.maximum(dy.abs(), dx.abs())
    inside = torch.where(kind == 1, r - cheb, r - dist)  # > 0 inside (soft edge below)
    inside = torch.where(kind == 2, torch.minimum(r - dist, dist - 0.5 * r), inside)
    mask = torch.sigmoid(inside * 2.0)  # (n, frames, h, w)

    along = dx * torch.cos(col(stripe_angle)) + dy * torch.sin(col(stripe_angle))
    stripes = torch.sin(along * col(stripe_freq) * 1.6)
    checks = torch.sin(dx * col(stripe_freq) * 1.6) * torch.sin(dy * col(stripe_freq) * 1.6)
    texture = 0.75 + 0.25 * torch.sign(torch.where(col(checker), checks, stripes))

    palette = torch.tensor(PALETTE, device=device)
    colour = palette[ids[:, 1].to(device)] * 2 - 1  # (n, 3) in [-1, 1]
    shape_rgb = colour.view(n, 3, 1, 1, 1) * texture.unsqueeze(1)

    ramp = (xs / width * torch.cos(col(bg_dir)) + ys / height * torch.sin(col(bg_dir))).clamp(
        -1, 1
    ) * 0.5 + 0.5  # (n, 1, h, w)
    ramp = ramp.unsqueeze(1)
    bg = bg_a.view(n, 3, 1, 1, 1) * (1 - ramp) + bg_b.view(n, 3, 1, 1, 1) * ramp
    video = bg * (1 - mask.unsqueeze(1)) + shape_rgb * mask.unsqueeze(1)
    return video.clamp(-1, 1)


def _bounce(pos: torch.Tensor, radius: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect positions into [radius, size - radius] (a triangle wave), i.e. bounce."""
    lo, span = radius, (size - 2 * radius).clamp(min=1e-3)
    x = torch.remainder(pos - lo, 2 * span)
    return lo + torch.where(x > span, 2 * span - x, x)


__all__ = ["KINDS", "PALETTE", "PromptTable", "Prompts", "random_prompts", "render"]
