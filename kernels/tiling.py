"""3D tiling: model token order (t, h, w row-major) <-> padded tile-major order.

A grid (T, H, W) is cut into ceil(T/tt) x ceil(H/th) x ceil(W/tw) tiles of tt*th*tw slots each,
tiles in (t, h, w) row-major order and slots inside a tile likewise. Edge tiles that the grid does
not fill keep their empty slots as padding: padded keys are masked out, padded queries are computed
and dropped, so every real token attends exactly as in dense attention when nothing is pruned.

Joint text + video sequences (HunyuanVideo, CogVideoX: one attention call over both): ``text``
tokens sit after the video tokens in model order, or before them with ``text_first``. They are
cut into text tiles of ``tile_tokens`` slots, in their own order, after the video tiles (the last
one padded): tile ids ``0 .. video_tiles - 1`` are video, ``video_tiles .. n_tiles - 1`` text.
So a text tile has an FP8 scale of its own, and a kv list names text tiles like any other.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class TileLayout:
    grid: Grid
    tile: Grid
    text: int = 0  # text tokens in the same sequence (joint attention)
    text_first: bool = False  # text before the video tokens in model order (CogVideoX)

    def __post_init__(self) -> None:
        # Lists (YAML, JSON) must work too: the layout is hashed for the slot-map cache.
        object.__setattr__(self, "grid", tuple(operator.index(g) for g in self.grid))
        object.__setattr__(self, "tile", tuple(operator.index(s) for s in self.tile))
        object.__setattr__(self, "text", operator.index(self.text))
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise ValueError(f"grid must be three positive sizes (T, H, W), got {self.grid}")
        if len(self.tile) != 3 or min(self.tile) < 1:
            raise ValueError(f"tile must be three positive sizes (tt, th, tw), got {self.tile}")
        if self.text < 0:
            raise ValueError(f"text must be >= 0 tokens, got {self.text}")

    @property
    def video(self) -> TileLayout:
        """The same layout without the text tokens."""
        return self if not self.text else TileLayout(self.grid, self.tile)

    @property
    def video_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def tokens(self) -> int:
        return self.video_tokens + self.text

    @property
    def text_start(self) -> int:
        """Where the text tokens begin in model order."""
        return 0 if self.text_first else self.video_tokens

    @property
    def video_tiles(self) -> int:
        return math.prod(self.tiles_per_axis)

    @property
    def text_tiles(self) -> int:
        return -(-self.text // self.tile_tokens)

    @property
    def tiles_per_axis(self) -> Grid:
        t, h, w = (math.ceil(g / s) for g, s in zip(self.grid, self.tile, strict=True))
        return (t, h, w)

    @property
    def n_tiles(self) -> int:
        return self.video_tiles + self.text_tiles

    @property
    def tile_tokens(self) -> int:
        return math.prod(self.tile)

    @property
    def padded_tokens(self) -> int:
        return self.n_tiles * self.tile_tokens

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.tokens / self.padded_tokens

    @cached_property
    def _slot_source(self) -> torch.Tensor:
        """For each padded slot, the model token it holds, or -1 for padding (CPU, int64)."""
        import torch

        (T, H, W), (tt, th, tw) = self.grid, self.tile
        nt, nh, nw = self.tiles_per_axis
        # slot -> (tile_t, tile_h, tile_w, in_t, in_h, in_w)
        ti = torch.arange(nt).view(nt, 1, 1, 1, 1, 1)
        hi = torch.arange(nh).view(1, nh, 1, 1, 1, 1)
        wi = torch.arange(nw).view(1, 1, nw, 1, 1, 1)
        a = torch.arange(tt).view(1, 1, 1, tt, 1, 1)
        b = torch.arange(th).view(1, 1, 1, 1, th, 1)
        c = torch.arange(tw).view(1, 1, 1, 1, 1, tw)
        t, h, w = ti * tt + a, hi * th + b, wi * tw + c
        src = (t * H + h) * W + w + (self.text if self.text_first else 0)
        valid = (t < T) & (h < H) & (w < W)
        video = torch.where(valid, src, torch.full_like(src, -1)).reshape(-1)
        if not self.text:
            return video
        text = torch.full((self.text_tiles * self.tile_tokens,), -1, dtype=video.dtype)
        text[: self.text] = torch.arange(self.text) + self.text_start
        return torch.cat((video, text))

    def slot_source(self, device: torch.device | str = "cpu") -> torch.Tensor:
        import torch

        return _on_device(self, "src", torch.device(device))

    def token_slot(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """For each model token, the padded slot that holds it (int64, length `tokens`)."""
        import torch

        return _on_device(self, "slot", torch.device(device))

    def valid(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool mask over padded slots: True where a real token sits."""
        return self.slot_source(device) >= 0

    def tile_valid_counts(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Real tokens in each tile (int64, length `n_tiles`)."""
        return self.valid(device).view(self.n_tiles, self.tile_tokens).sum(-1)

    def key_valid(
        self, text_mask: torch.Tensor | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Bool (B|1, padded_tokens) on ``device``: the slots a query may attend to.
        ``text_mask`` (B, text) bool, the model's prompt mask: False text tokens are keys no
        query sees."""
        import torch

        valid = self.valid(device).unsqueeze(0)
        if text_mask is None:
            return valid
        start = self.video_tiles * self.tile_tokens
        valid = valid.expand(text_mask.shape[0], -1).clone()
        valid[:, start : start + self.text] &= text_mask.to(device=valid.device, dtype=torch.bool)
        return valid

    def tile_coords(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(video_tiles, 3) video tile coordinates in tile units, row-major like the tile
        order (text tiles have no place in the grid)."""
        import torch

        _nt, nh, nw = self.tiles_per_axis
        idx = torch.arange(self.video_tiles, device=device)
        return torch.stack((idx // (nh * nw), (idx // nw) % nh, idx % nw), dim=-1)

    def to_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """(..., tokens, D) in model order -> (..., padded_tokens, D), zeros in padding slots."""
        self._check_tokens(x)
        out = x.new_zeros((*x.shape[:-2], self.padded_tokens, x.shape[-1]))
        out[..., self.token_slot(x.device), :] = x
        return out

    def from_tiles(self, y: torch.Tensor) -> torch.Tensor:
        """(..., padded_tokens, D) -> (..., tokens, D) in model order; padding slots dropped."""
        if y.shape[-2] != self.padded_tokens:
            raise ValueError(
                f"expected {self.padded_tokens} padded tokens for grid {self.grid} and tile "
                f"{self.tile}, got shape {tuple(y.shape)}"
            )
        return y[..., self.token_slot(y.device), :]

    def _check_tokens(self, x: torch.Tensor) -> None:
        if x.shape[-2] != self.tokens:
            raise ValueError(
                f"grid {self.grid} has {self.tokens} tokens but the input has {x.shape[-2]} "
                f"(shape {tuple(x.shape)})"
            )


def prompt_key_mask(text_mask: torch.Tensor, tokens: int, text_first: bool) -> torch.Tensor:
    """A (batch, text) prompt mask as SDPA's boolean key mask over the whole joint sequence of
    ``tokens``: (batch, 1, 1, tokens), True for every video key."""
    import torch

    b, text = text_mask.shape
    mask = torch.ones(b, tokens, dtype=torch.bool, device=text_mask.device)
    start = 0 if text_first else tokens - text
    mask[:, start : start + text] = text_mask.bool()
    return mask[:, None, None, :]


@lru_cache(maxsize=256)
def _on_device(layout: TileLayout, what: str, device: torch.device) -> torch.Tensor:
    import torch

    src = layout._slot_source
    if what == "src":
        return src.to(device)
    slot = torch.empty(layout.tokens, dtype=torch.int64)
    real = torch.nonzero(src >= 0).squeeze(-1)
    slot[src[real]] = real
    return slot.to(device)


def tile_overhang(grid: Grid, tile: Grid) -> str | None:
    """Why ``tile`` is absurd for ``grid`` (its padding would dwarf the grid), or None.

    A tile may overhang the grid (a quality grid shrunk from the tuned one keeps the tuned tile;
    edge tiles are padded), but the padded layout may hold at most 8x the grid's tokens plus one
    tile, so no tile shape can make attention allocate far more than the inputs.
    """
    layout = TileLayout(grid, tile)
    if layout.padded_tokens <= 8 * layout.tokens + layout.tile_tokens:
        return None
    return (
        f"tile {list(tile)} is far larger than the grid {list(grid)}: it would pad "
        f"{layout.tokens} tokens to {layout.padded_tokens}"
    )
