"""Joint text + video attention: the reference's semantics, checked against SDPA with the
equivalent boolean mask in fp64, and `attention()`'s handling of the text arguments.

The mask is built here from first principles (a token's 3D tile from its coordinates, text
tokens in tiles of their own after the video tiles), not from `TileLayout` or `with_text`.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from fpstune.kernels import AttentionSpec, TileLayout, attention
from fpstune.kernels.patterns import block_index, tile_means
from fpstune.kernels.reference import reference_attention, tile_scales
from fpstune.kernels.rope import rotate_qk
from fpstune.kernels.spec import Pattern

F64 = torch.float64
DENSE = AttentionSpec.from_dict({"mode": "bf16_dense"})


def _tile_of_tokens(grid, tile, text: int, text_first: bool) -> torch.Tensor:
    """Each model-order token's tile id: video tiles row-major, then text tiles."""
    T, H, W = grid
    nt, nh, nw = (math.ceil(g / s) for g, s in zip(grid, tile, strict=True))
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    video = ((t // tile[0]) * nh + h // tile[1]) * nw + w // tile[2]
    text_ids = nt * nh * nw + torch.arange(text) // math.prod(tile)
    parts = (text_ids, video.reshape(-1)) if text_first else (video.reshape(-1), text_ids)
    return torch.cat(parts)


def _oracle(q, k, v, grid, tile, text, text_first, text_mask, video_keep):
    """SDPA (fp64) with the token-level mask the joint semantics define. ``video_keep``:
    (B|1, H|1, video tiles, video tiles) bool, the pattern's choice among video tiles."""
    n_video_tiles = video_keep.shape[-1]
    tile_of = _tile_of_tokens(grid, tile, text, text_first)
    is_text = tile_of >= n_video_tiles
    b, h = q.shape[:2]
    keep = torch.zeros(b, h, q.shape[2], q.shape[2], dtype=torch.bool)
    vq, vk = ~is_text, ~is_text
    vt = tile_of.clamp(max=n_video_tiles - 1)
    tile_keep = video_keep.expand(b, h, -1, -1)[..., vt, :][..., :, vt]
    keep |= tile_keep & vq[:, None] & vk[None, :]
    keep |= is_text[None, :].expand_as(keep[0, 0])  # every query sees the text keys...
    keep |= is_text[:, None].expand_as(keep[0, 0])  # ...and text queries see everything
    if text_mask is not None:
        key_ok = torch.ones(b, q.shape[2], dtype=torch.bool)
        key_ok[:, is_text] = text_mask
        keep &= key_ok[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


CASES = [  # grid, tile, text, text_first
    ((3, 5, 7), (1, 2, 4), 11, False),
    ((3, 5, 7), (2, 2, 2), 11, True),
    ((2, 7, 9), (1, 4, 4), 37, False),
    ((1, 3, 5), (1, 2, 2), 1, True),
]


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "prompt-mask"])
@pytest.mark.parametrize(("grid", "tile", "text", "text_first"), CASES)
@pytest.mark.parametrize(
    "pattern", [("window", 0.6), ("topk", 0.5), ("cdf", 0.7), (None, 0.0)], ids=str
)
def test_reference_equals_sdpa_with_the_equivalent_mask(
    pattern, grid, tile, text, text_first, masked
):
    kind, sparsity = pattern
    gen = torch.Generator().manual_seed(hash((grid, tile, text, kind, masked)) % 2**31)
    n = math.prod(grid) + text
    q, k, v = (torch.randn(2, 3, n, 16, generator=gen, dtype=F64) for _ in range(3))
    text_mask = None
    if masked:  # batch element 0 keeps a prefix, 1 a scattered set: any boolean mask works
        text_mask = torch.rand(2, text, generator=gen) < 0.6
        text_mask[0] = torch.arange(text) < max(1, text // 2)
    video = TileLayout(grid, tile)
    if kind is None:
        spec = AttentionSpec.from_dict({"mode": "bf16_sparse", "tile": tile, "sparsity": 0.0,
                                        "pattern": {"kind": "window"}})  # fmt: skip
        video_keep = torch.ones(1, 1, video.n_tiles, video.n_tiles, dtype=torch.bool)
    else:
        pat = {"kind": kind, **({"mass": 0.8} if kind == "cdf" else {})}
        spec = AttentionSpec.from_dict(
            {"mode": "bf16_sparse", "tile": tile, "pattern": pat, "sparsity": sparsity}
        )
        # The pattern ranks video tiles by the means of the video tokens alone.
        start = text if text_first else 0
        vq, vk = (x[:, :, start : start + video.tokens] for x in (q, k))
        pooled = {
            "q_pooled": tile_means(video.to_tiles(vq), video),
            "k_pooled": tile_means(video.to_tiles(vk), video),
        }
        video_keep = block_index(video, Pattern(**pat), sparsity, **pooled).dense_mask(
            video.n_tiles
        )
        if sparsity:
            assert not video_keep.all(), "the case must prune something"
    got = reference_attention(
        q, k, v, grid=grid, spec=spec, tile=tile, dtype=F64, text=text, text_first=text_first,
        text_mask=text_mask,
    )  # fmt: skip
    want = _oracle(q, k, v, grid, tile, text, text_first, text_mask, video_keep)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("text_first", [False, True])
def test_bf16_dense_with_text_is_sdpa_with_the_prompt_mask(text_first):
    gen = torch.Generator().manual_seed(3)
    grid, text = (2, 3, 5), 9
    q, k, v = (torch.randn(2, 2, 39, 8, generator=gen) for _ in range(3))
    mask = torch.arange(text).unsqueeze(0) < torch.tensor([[4], [9]])
    got = attention(
        q, k, v, grid=grid, spec=DENSE, text=text, text_first=text_first,
        text_mask=mask,
    )  # fmt: skip
    key_ok = torch.ones(2, 39, dtype=torch.bool)
    key_ok[:, slice(0, text) if text_first else slice(30, 39)] = mask
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=key_ok[:, None, None, :])
    torch.testing.assert_close(got, want)
    # The masked keys matter: without the mask the result differs.
    assert not torch.allclose(got, attention(q, k, v, grid=grid, spec=DENSE, text=9,
                                             text_first=text_first))  # fmt: skip


def test_text_tiles_get_fp8_scales_of_their_own():
    """A text tile's scale comes from text tokens alone: loud text keys leave the video tiles'
    scales (and so their rounding) exactly as without text."""
    gen = torch.Generator().manual_seed(4)
    grid, tile, text = (2, 4, 4), (1, 4, 4), 20
    video = torch.randn(1, 2, 32, 16, generator=gen)
    loud = 1000.0 * torch.randn(1, 2, text, 16, generator=gen)
    joint = TileLayout(grid, tile, text)
    scales = tile_scales(joint.to_tiles(torch.cat((video, loud), 2)), joint)
    alone = TileLayout(grid, tile)
    torch.testing.assert_close(scales[..., :2], tile_scales(alone.to_tiles(video), alone))
    assert joint.text_tiles == 2 and (scales[..., 2:] > 1.0).all()


def test_fp8_joint_is_close_to_exact_joint_attention():
    gen = torch.Generator().manual_seed(5)
    grid, tile, text = (3, 5, 7), (1, 4, 4), 13
    q, k, v = (torch.randn(1, 2, 105 + text, 64, generator=gen) for _ in range(3))
    spec = AttentionSpec.from_dict({"mode": "fp8_dense", "tile": tile})
    got = attention(q, k, v, grid=grid, spec=spec, text=text)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    rel = ((got.double() - want).norm() / want.norm()).item()
    assert 0 < rel < 0.1, rel


def test_rope_rotates_the_video_tokens_only():
    gen = torch.Generator().manual_seed(6)
    q, k = (torch.randn(1, 2, 30 + 7, 8, generator=gen) for _ in range(2))
    angle = (torch.rand(1, 30, 1, 4, generator=gen) * 6).repeat_interleave(2, -1)
    for first in (False, True):
        rq, rk = rotate_qk(q, k, (angle.cos(), angle.sin()), text=7, text_first=first)
        text = slice(0, 7) if first else slice(30, 37)
        vid = slice(7, 37) if first else slice(0, 30)
        assert torch.equal(rq[:, :, text], q[:, :, text]) and torch.equal(
            rk[:, :, text], k[:, :, text]
        )
        plain, _ = rotate_qk(q[:, :, vid], k[:, :, vid], (angle.cos(), angle.sin()))
        assert torch.equal(rq[:, :, vid], plain)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": 5}, "has 30 tokens + 5 text; inputs have 37"),
        ({"text": -1}, "text must be a token count >= 0"),
        ({"text": 7, "text_mask": torch.ones(2, 6, dtype=torch.bool)}, "text_mask must be"),
    ],
)
def test_bad_text_arguments_are_refused_in_one_line(kwargs, message):
    q = torch.randn(2, 1, 37, 8)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        attention(q, q, q, grid=(2, 3, 5), spec=DENSE, **kwargs)
    assert "\n" not in str(e.value)
