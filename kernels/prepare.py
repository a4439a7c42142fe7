"""Host-side preparation shared by the attention kernels: the fused pre-pass and the kv lists.

Both kernels (`triton_attention`, `gluon_attention`) read what `prepare` returns; neither imports
the other, and `dispatch` picks which one runs.

1. ``_vamax_kernel`` (fp8 only): V's per-(batch, head, channel) amax over all tokens, as an
   ``atomic_max`` on the fp32 bit patterns (|x| >= 0, so integer order is float order and NaN wins).
2. ``_prepass_kernel``: one program per (tile, batch*head, q|k|v) gathers the tile's rows from
   model order, takes the tile's amax, writes e4m3 codes (bf16 for ``bf16_sparse``), the per-tile
   Q/K scale and, for data-dependent patterns, the tile sums whose means rank the kv tiles.
   K and V are written in padded tile-major order; V transposed (channel-major) for fp8, because
   Hopper's fp8 wgmma needs its B operand K-major. Q is tile-major for sparse modes (a program's
   rows must share one q tile, whose kv list they use) and stays in model order for dense ones,
   joint text + video included: no padded query rows are computed (`tile_of_rows` gives each
   row its tile's FP8 scale).
3. The block index (`patterns`): static patterns (dense, window) are built once per layout and
   cached on the device; topk/cdf come from the pooled tile means. Either way the kv tiles of each
   q tile are reordered full-tiles-first, so that only the few tiles with padded slots pay for
   the mask. A prompt mask (``text_mask``) adds its masked text slots to the padding: the
   tiles that hold them pay the mask too.

The ``@triton.jit`` helpers here (`scale_from_bits`, `tile_of_rows`, `to_e4m3`) are also
called by the attention kernels (Gluon calls them with its own layouts).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .patterns import (
    BlockIndex,
    KvList,
    ascending,
    block_index,
    full_first,
    ranked_blocks,
    with_text,
)
from .rope import Rope, tables, with_identity
from .spec import AttentionSpec, Pattern
from .tiling import TileLayout

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _abs_bits(x):
    # |x| as int32 bits: for non-negative floats integer order is float order, and NaN
    # (0x7fc00000) sorts above inf, so integer max propagates NaN where float max may not.
    return tl.abs(x).to(tl.int32, bitcast=True)


@triton.jit
def scale_from_bits(amax_bits):
    # reference.py: scale = amax / 448 (e4m3's largest value), at least 1e-20 (all-zero tiles).
    s = amax_bits.to(tl.float32, bitcast=True) / 448.0
    # `where` rather than `maximum`: a NaN amax must stay NaN.
    return tl.where(s < 1e-20, 1e-20, s)


@triton.jit
def to_e4m3(x, EXACT: tl.constexpr):
    """fp32 -> e4m3 (round to nearest even, saturating at 448, NaN kept).

    The GPU cast does exactly that. Triton's CPU interpreter drops the carry into the exponent
    (126.97 -> 64), so with EXACT the value is first rounded onto the e4m3 grid in fp32 and the
    cast only has to copy it.
    """
    if EXACT:
        a = tl.abs(x)
        bits = a.to(tl.int32, bitcast=True)
        # Normal range: keep 3 mantissa bits, ties to even.
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 == 0xFFF00000
        normal = bits.to(tl.float32, bitcast=True)
        # Subnormals (|x| < 2^-6) sit on a fixed 2^-9 grid: 24576 has that ulp in fp32.
        sub = (a + 24576.0) - 24576.0
        r = tl.where(a < 0.015625, sub, normal)
        r = tl.where(r > 448.0, 448.0, r)
        x = tl.where(x < 0, -r, r)
    return x.to(tl.float8e4nv)


@triton.jit
def launch_order(p0, p1, n0, n1, FIRST):
    """(q block, batch * head) of program (``p0``, ``p1``) of an (``n0``, ``n1``) grid. The GPU
    starts programs in the order p1 * n0 + p0; the last ``FIRST`` q blocks of every row (the
    text tiles of a sparse joint call, whose queries attend densely, ~10x a video block at 90 %)
    are given the first ids, so they start before the video blocks instead of finishing last.
    ``FIRST`` 0: the grid's own order."""
    lin = p1 * n0 + p0
    if lin < n1 * FIRST:
        bh = lin // FIRST
        pid = n0 - FIRST + lin % FIRST
    else:
        lin -= n1 * FIRST
        bh = lin // (n0 - FIRST)
        pid = lin % (n0 - FIRST)
    return pid, bh


@triton.jit
def tile_of_rows(rows, N, N_TILES, TEXT_START, TEXT, GRID_H, GRID_W, TILES_H, TILES_W, TILE_T,
                 TILE_H, TILE_W, TILE_TOKENS: tl.constexpr):  # fmt: skip
    """The tile of each model-order row, for its Q scale (0 for rows past N): a video row's 3D
    tile; of a joint sequence's ``TEXT`` tokens from row ``TEXT_START``, a text row's text tile
    (`TileLayout`: the text tiles follow the video tiles)."""
    in_text = (rows >= TEXT_START) & (rows < TEXT_START + TEXT)
    video = tl.where(rows >= TEXT_START + TEXT, rows - TEXT, rows)
    t = video // (GRID_H * GRID_W)
    hh = (video // GRID_W) % GRID_H
    w = video % GRID_W
    tile = ((t // TILE_T) * TILES_H + hh // TILE_H) * TILES_W + w // TILE_W
    text_tiles = (TEXT + TILE_TOKENS - 1) // TILE_TOKENS
    tile = tl.where(in_text, N_TILES - text_tiles + (rows - TEXT_START) // TILE_TOKENS, tile)
    return tl.where(rows < N, tile, 0)


@triton.jit
def _load_rows(X, base, src, offs_d, stride_n, stride_d):
    """Rows ``src`` (model token ids, -1 = padding -> zeros) of one (batch, head), as fp32."""
    ptrs = X + base + src[:, None].to(tl.int64) * stride_n + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=src[:, None] >= 0, other=0.0).to(tl.float32)


@triton.jit
def _load_qk(X, base, src, offs_d, stride_n, stride_d, COS, SIN, ROPE: tl.constexpr,
             HEAD_DIM: tl.constexpr):  # fmt: skip
    """`_load_rows` of q or k, rotated by the rope tables if ``ROPE`` (`rope.rotary`'s
    arithmetic: each channel times its pair's cos, plus its partner times -sin or +sin)."""
    x = _load_rows(X, base, src, offs_d, stride_n, stride_d)
    if ROPE:
        partner = _load_rows(X, base, src, offs_d ^ 1, stride_n, stride_d)
        row = src[:, None].to(tl.int64) * HEAD_DIM
        real = src[:, None] >= 0
        c = tl.load(COS + row + (offs_d & ~1)[None, :], mask=real, other=0.0)
        s = tl.load(SIN + row + (offs_d | 1)[None, :], mask=real, other=0.0)
        s = tl.where((offs_d % 2 == 0)[None, :], -s, s)
        x = x * c + partner * s
    return x


@triton.jit
def _store_rows(
    XC, y, src, slots, offs_d, bh64, N, N_PAD, TILE_MAJOR: tl.constexpr, HEAD_DIM: tl.constexpr
):
    if TILE_MAJOR:
        # Padded slots are written too (as zeros): padded keys must be finite.
        tl.store(XC + bh64 * N_PAD * HEAD_DIM + slots[:, None] * HEAD_DIM + offs_d[None, :], y)
    else:
        ptrs = XC + bh64 * N * HEAD_DIM + src[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
        tl.store(ptrs, y, mask=src[:, None] >= 0)


@triton.jit
def _prep_qk(
    X,
    x_base,
    stride_n,
    stride_d,
    XC,
    XS,
    XSUM,
    SLOT_SRC,
    COS,
    SIN,
    tile,
    bh,
    N,
    N_PAD,
    N_TILES,
    FP8: tl.constexpr,
    POOL: tl.constexpr,
    TILE_MAJOR: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TILE_TOKENS: tl.constexpr,
    CHUNK: tl.constexpr,
    EXACT: tl.constexpr,
    ROPE: tl.constexpr,
):
    """Quantise (or copy) one tile of Q or K, rotated first if ``ROPE``; write its scale and,
    if POOL, its row sum."""
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    slot0 = tile * TILE_TOKENS
    bh64 = bh.to(tl.int64)
    if CHUNK == TILE_TOKENS:
        # The whole tile fits: one read, amax and quantise from registers.
        src = tl.load(SLOT_SRC + slot0 + offs_c)
        x = _load_qk(X, x_base, src, offs_d, stride_n, stride_d, COS, SIN, ROPE, HEAD_DIM)
        if POOL:
            tl.store(XSUM + (bh64 * N_TILES + tile) * HEAD_DIM + offs_d, tl.sum(x, axis=0))
        if FP8:
            scale = scale_from_bits(tl.max(tl.max(_abs_bits(x), axis=1), axis=0))
            tl.store(XS + bh64 * N_TILES + tile, scale)
        y = to_e4m3(tl.math.div_rn(x, scale), EXACT) if FP8 else x.to(XC.dtype.element_ty)
        _store_rows(XC, y, src, slot0 + offs_c, offs_d, bh64, N, N_PAD, TILE_MAJOR, HEAD_DIM)
    else:
        if FP8 or POOL:
            amax = tl.zeros([HEAD_DIM], dtype=tl.int32)
            total = tl.zeros([HEAD_DIM], dtype=tl.float32)
            for c0 in range(0, TILE_TOKENS, CHUNK):
                src = tl.load(SLOT_SRC + slot0 + c0 + offs_c)
                x = _load_qk(X, x_base, src, offs_d, stride_n, stride_d, COS, SIN, ROPE, HEAD_DIM)
                if FP8:
                    amax = tl.maximum(amax, tl.max(_abs_bits(x), axis=0))
                if POOL:
                    total += tl.sum(x, axis=0)
            if POOL:
                tl.store(XSUM + (bh64 * N_TILES + tile) * HEAD_DIM + offs_d, total)
        if FP8:
            scale = scale_from_bits(tl.max(amax, axis=0))
            tl.store(XS + bh64 * N_TILES + tile, scale)
        # Second sweep re-reads the tile (from L2: it was just read).
        for c0 in range(0, TILE_TOKENS, CHUNK):
            src = tl.load(SLOT_SRC + slot0 + c0 + offs_c)
            x = _load_qk(X, x_base, src, offs_d, stride_n, stride_d, COS, SIN, ROPE, HEAD_DIM)
            y = to_e4m3(tl.math.div_rn(x, scale), EXACT) if FP8 else x.to(XC.dtype.element_ty)
            slots = slot0 + c0 + offs_c
            _store_rows(XC, y, src, slots, offs_d, bh64, N, N_PAD, TILE_MAJOR, HEAD_DIM)


def wgmma_keys(impl: str) -> bool:
    """Whether kernel ``impl`` reads fp8 V's keys in `wgmma_key_order` (the Gluon kernels)."""
    return impl != "triton"


@triton.jit
def wgmma_key_order(y, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """V's rows (keys) in the order the Gluon kernels' P operand has them
    (`gluon_attention._p_operand`): within each 32 keys, key 16h + 8q + 2t + b moves to row
    16h + 4t + 2q + b, so P never leaves the thread that computed it. Reordered in registers,
    so the store stays contiguous."""
    tl.static_assert(CHUNK % 32 == 0, "the pre-pass chunk must hold whole groups of 32 keys")
    y = tl.reshape(y, (CHUNK // 32, 2, 2, 4, 2, HEAD_DIM))
    return tl.reshape(tl.permute(y, (0, 1, 3, 2, 4, 5)), (CHUNK, HEAD_DIM))


@triton.jit
def _prep_v(
    X,
    x_base,
    stride_n,
    stride_d,
    XC,
    VAMAX,
    SLOT_SRC,
    tile,
    bh,
    N_PAD,
    FP8: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TILE_TOKENS: tl.constexpr,
    CHUNK: tl.constexpr,
    EXACT: tl.constexpr,
    WGMMA_KEYS: tl.constexpr,
):
    """Quantise (or copy) one tile of V with its per-channel scales; fp8 codes go channel-major,
    with ``WGMMA_KEYS`` in `wgmma_key_order`."""
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    slot0 = tile * TILE_TOKENS
    bh64 = bh.to(tl.int64)
    if FP8:
        vs = scale_from_bits(tl.load(VAMAX + bh64 * HEAD_DIM + offs_d))
    for c0 in range(0, TILE_TOKENS, CHUNK):
        src = tl.load(SLOT_SRC + slot0 + c0 + offs_c)
        x = _load_rows(X, x_base, src, offs_d, stride_n, stride_d)
        slots = slot0 + c0 + offs_c
        if FP8:
            y = to_e4m3(tl.math.div_rn(x, vs[None, :]), EXACT)
            if WGMMA_KEYS:
                y = wgmma_key_order(y, CHUNK, HEAD_DIM)
            ptrs = XC + bh64 * HEAD_DIM * N_PAD + offs_d[None, :] * N_PAD + slots[:, None]
        else:
            y = x.to(XC.dtype.element_ty)
            ptrs = XC + bh64 * N_PAD * HEAD_DIM + slots[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(ptrs, y)


# --------------------------------------------------------------------------------------------
# pre-pass kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _vamax_kernel(
    V,
    VAMAX,
    H,
    N,
    stride_b,
    stride_h,
    stride_n,
    stride_d,
    HEAD_DIM: tl.constexpr,
    ROWS: tl.constexpr,
):
    """VAMAX[b*H + h, d] = max over tokens of |v[b, h, :, d]| (int32 bits, zero-initialised)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    ptrs = V + base + rows[:, None].to(tl.int64) * stride_n + offs_d[None, :] * stride_d
    x = tl.load(ptrs, mask=rows[:, None] < N, other=0.0).to(tl.float32)
    tl.atomic_max(VAMAX + bh.to(tl.int64) * HEAD_DIM + offs_d, tl.max(_abs_bits(x), axis=0))


@triton.jit
def _prepass_kernel(
    Q,
    K,
    V,
    QC,
    KC,
    VC,
    QS,
    KS,
    VAMAX,
    QSUM,
    KSUM,
    SLOT_SRC,
    COS,
    SIN,
    H,
    N,
    N_PAD,
    N_TILES,
    sqb,
    sqh,
    sqn,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    FP8: tl.constexpr,
    POOL: tl.constexpr,
    Q_TILE_MAJOR: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TILE_TOKENS: tl.constexpr,
    CHUNK: tl.constexpr,
    EXACT: tl.constexpr,
    WGMMA_KEYS: tl.constexpr,
    ROPE: tl.constexpr,
):
    """Grid (n_tiles, batch*heads, 3), axis 2 picking q, k or v. ``ROPE``: q and k are rotated by
    the (tokens, head_dim) tables ``COS`` / ``SIN`` as they are loaded, and the grid is
    (batch*heads, n_tiles, 3) so that a tile's heads run side by side and read its tables
    from L2 (measured faster with RoPE; without it the tile-first order is faster)."""
    if ROPE:
        bh = tl.program_id(0)
        tile = tl.program_id(1)
    else:
        tile = tl.program_id(0)
        bh = tl.program_id(1)
    which = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if which == 0:
        _prep_qk(
            Q, b * sqb + h * sqh, sqn, sqd, QC, QS, QSUM, SLOT_SRC, COS, SIN, tile, bh, N, N_PAD,
            N_TILES, FP8, POOL, Q_TILE_MAJOR, HEAD_DIM, TILE_TOKENS, CHUNK, EXACT, ROPE,
        )  # fmt: skip
    elif which == 1:
        _prep_qk(
            K, b * skb + h * skh, skn, skd, KC, KS, KSUM, SLOT_SRC, COS, SIN, tile, bh, N, N_PAD,
            N_TILES, FP8, POOL, True, HEAD_DIM, TILE_TOKENS, CHUNK, EXACT, ROPE,
        )  # fmt: skip
    else:
        _prep_v(
            V, b * svb + h * svh, svn, svd, VC, VAMAX, SLOT_SRC, tile, bh, N_PAD,
            FP8, HEAD_DIM, TILE_TOKENS, CHUNK, EXACT, WGMMA_KEYS,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """The pre-pass's output: what the attention kernel reads, plus the blocks it chose."""

    q: torch.Tensor  # sparse: (B*H, N_PAD, D) tile-major; dense: (B*H, N, D) model order
    k: torch.Tensor  # (B*H, N_PAD, D)
    v: torch.Tensor  # fp8: (B*H, D, N_PAD) channel-major; bf16: (B*H, N_PAD, D)
    q_scale: torch.Tensor | None  # (B*H, n_tiles) fp32
    k_scale: torch.Tensor | None  # (B*H, n_tiles) fp32
    v_amax: torch.Tensor | None  # (B*H, D) int32 bit patterns of the channel amax
    blocks: BlockIndex | None  # as the pattern chose them (None for dense)
    kv: KvList
    layout: TileLayout
    spec: AttentionSpec
    shape: tuple[int, int, int, int]  # (B, H, N, D)
    kv_bias: torch.Tensor  # (N_PAD,) fp32: 0 for keys a query may see, -inf for the rest
    impl: str = "triton"  # the kernel whose V key order this is (`wgmma_key_order` for Gluon)

    @property
    def q_tile_major(self) -> bool:
        """Whether Q was written tile-major, each q tile with its own kv list (the kernels'
        ``SPARSE`` path): sparse modes and joint text + video layouts."""
        return q_tile_major(self.spec, self.layout)


def q_tile_major(spec: AttentionSpec, layout: TileLayout) -> bool:
    """Sparse modes only: a dense call, joint or not, keeps Q in model order, so the padded
    rows of edge tiles are never computed (`tile_of_rows` finds each row's scale)."""
    return spec.mode.sparse


@dataclass(frozen=True)
class _Static:
    slot_source: torch.Tensor  # (N_PAD,) int32, -1 for padding
    kv_bias: torch.Tensor  # (N_PAD,) fp32, 0 for real slots, -inf for padding
    partial: torch.Tensor  # (n_tiles,) bool: tile has padded slots
    valid_counts: torch.Tensor  # (n_tiles,) fp32
    every: BlockIndex  # each q tile keeps every kv tile
    dense: KvList


@lru_cache(maxsize=64)
def _static(layout: TileLayout, device: torch.device) -> _Static:
    src = layout.slot_source(device).to(torch.int32).contiguous()
    valid = src >= 0
    bias = torch.zeros(layout.padded_tokens, dtype=torch.float32, device=device)
    bias.masked_fill_(~valid, float("-inf"))
    counts = valid.view(layout.n_tiles, layout.tile_tokens).sum(-1)
    partial = counts < layout.tile_tokens
    every = torch.arange(layout.n_tiles, dtype=torch.int32, device=device).view(1, 1, 1, -1)
    n = torch.full((1, 1, 1), layout.n_tiles, dtype=torch.int32, device=device)
    dense = full_first(BlockIndex(every, n), partial)
    return _Static(src, bias, partial, counts.float(), BlockIndex(every, n), dense)


@lru_cache(maxsize=64)
def _window_list(
    layout: TileLayout, pattern: Pattern, sparsity: float, device: torch.device
) -> tuple[BlockIndex, KvList]:
    cpu = block_index(layout, pattern, sparsity)
    blocks = BlockIndex(cpu.kv_index.to(device), cpu.kv_count.to(device))
    return blocks, full_first(blocks, _static(layout, device).partial)


def _chunk_rows(tile_tokens: int, head_dim: int) -> int:
    """Rows per pre-pass step: a power of two dividing the tile, <= 16K elements per step
    (a 128-token tile of head_dim 128 is read once and quantised from registers)."""
    cap = max(16, 16384 // head_dim)
    chunk = tile_tokens & -tile_tokens  # largest power of two dividing it
    return min(chunk, cap)


def prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: TileLayout,
    spec: AttentionSpec,
    blocks: BlockIndex | None = None,
    impl: str = "triton",
    rope: Rope | None = None,
    text_mask: torch.Tensor | None = None,
) -> Prepared:
    """Run the pre-pass and build the kv lists. ``blocks`` overrides the pattern's choice;
    ``impl`` is the kernel that will read it (the Gluon kernels take V's keys reordered);
    ``rope`` (cos, sin) over the video tokens: q and k are rotated as Wan does (`rope.rotary`)
    inside the pre-pass, in fp32, before their tiles are scaled (text tokens are not rotated).
    ``text_mask`` (layout.text,) bool: one prompt mask for every batch element (the kernels'
    padding bias has no batch dimension; `dispatch.fused_attention` calls once per element when
    the masks differ)."""
    B, H, N, D = q.shape
    dev = q.device
    cos, sin = (None, None) if rope is None else tables(rope, layout.video_tokens, D, dev)
    if cos is not None and sin is not None and layout.text:
        cos, sin = with_identity(cos, sin, layout.text, first=layout.text_first)
    fp8, sparse = spec.mode.fp8, spec.mode.sparse
    tile_major = q_tile_major(spec, layout)
    st = _static(layout, dev)
    n_tiles, n_pad, tt = layout.n_tiles, layout.padded_tokens, layout.tile_tokens
    code_dtype = torch.float8_e4m3fn if fp8 else q.dtype
    pool = sparse and blocks is None and spec.pattern is not None and spec.pattern.kind != "window"
    kv_bias, partial = st.kv_bias, st.partial
    if text_mask is not None and not bool(text_mask.all()):
        kv_bias, partial = _masked(layout, st, text_mask.to(dev).reshape(-1))

    qc = torch.empty((B * H, n_pad if tile_major else N, D), dtype=code_dtype, device=dev)
    kc = torch.empty((B * H, n_pad, D), dtype=code_dtype, device=dev)
    vc = torch.empty((B * H, D, n_pad) if fp8 else (B * H, n_pad, D), dtype=code_dtype, device=dev)
    qs = torch.empty((B * H, n_tiles), dtype=torch.float32, device=dev) if fp8 else None
    ks = torch.empty((B * H, n_tiles), dtype=torch.float32, device=dev) if fp8 else None
    vamax = torch.zeros((B * H, D), dtype=torch.int32, device=dev) if fp8 else None
    qsum = torch.empty((B, H, n_tiles, D), dtype=torch.float32, device=dev) if pool else None
    ksum = torch.empty((B, H, n_tiles, D), dtype=torch.float32, device=dev) if pool else None

    if fp8:
        assert vamax is not None
        rows = max(16, 16384 // D)
        _vamax_kernel[(triton.cdiv(N, rows), B * H)](
            v, vamax, H, N, *v.stride(), HEAD_DIM=D, ROWS=rows, num_warps=4
        )
    dummy = qc  # stands in for buffers a variant does not use
    _prepass_kernel[(B * H, n_tiles, 3) if rope is not None else (n_tiles, B * H, 3)](
        q, k, v, qc, kc, vc,
        dummy if qs is None else qs, dummy if ks is None else ks,
        dummy if vamax is None else vamax,
        dummy if qsum is None else qsum, dummy if ksum is None else ksum,
        st.slot_source, dummy if cos is None else cos, dummy if sin is None else sin,
        H, N, n_pad, n_tiles, *q.stride(), *k.stride(), *v.stride(),
        FP8=fp8, POOL=pool, Q_TILE_MAJOR=tile_major, HEAD_DIM=D, TILE_TOKENS=tt,
        CHUNK=_chunk_rows(tt, D), EXACT=not q.is_cuda, WGMMA_KEYS=fp8 and wgmma_keys(impl),
        ROPE=rope is not None, num_warps=8,
    )  # fmt: skip

    if not sparse:
        kv = st.dense if partial is st.partial else full_first(st.every, partial)
    elif blocks is not None:
        kv = full_first(blocks, partial)
    elif pool:
        assert spec.pattern is not None and qsum is not None and ksum is not None
        vt = layout.video_tiles
        counts = st.valid_counts[:vt].view(1, 1, -1, 1)
        q_mean, k_mean = qsum[..., :vt, :] / counts, ksum[..., :vt, :] / counts
        ranked = with_text(
            ranked_blocks(spec.pattern, spec.sparsity, q_mean, k_mean), layout.text_tiles
        )
        kv = full_first(ranked, partial)
        blocks = ascending(ranked)
    else:
        assert spec.pattern is not None
        blocks, kv = _window_list(layout, spec.pattern, spec.sparsity, dev)
        kv = kv if partial is st.partial else full_first(blocks, partial)
    shape = (B, H, N, D)
    return Prepared(qc, kc, vc, qs, ks, vamax, blocks, kv, layout, spec, shape, kv_bias, impl)


def _masked(
    layout: TileLayout, st: _Static, text_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The padding bias and the partial-tile flags with the masked text slots added."""
    if text_mask.shape != (layout.text,):
        raise ValueError(f"text_mask must hold {layout.text} values, got {tuple(text_mask.shape)}")
    bias = st.kv_bias.clone()
    start = layout.video_tiles * layout.tile_tokens
    bias[start : start + layout.text].masked_fill_(~text_mask.bool(), float("-inf"))
    partial = (bias != 0).view(layout.n_tiles, layout.tile_tokens).any(-1)
    return bias, partial


def _list_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(b, h, q) strides of a (B|1, H|1, nq|1, ...) tensor; 0 where the dim broadcasts."""
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(3))  # type: ignore[return-value]


def launch_args(
    prep: Prepared, *, block_m: int, scale: float, out: torch.Tensor
) -> tuple[tuple[int, int], tuple[object, ...]]:
    """The grid, and what every attention kernel takes after its Q/K/V and scale operands: the
    kv lists, the output, sizes and strides."""
    B, H, N, _ = prep.shape
    layout, kv = prep.layout, prep.kv
    st = _static(layout, prep.q.device)
    n_rows = layout.padded_tokens if prep.q_tile_major else N
    grid = (triton.cdiv(n_rows, block_m), B * H)
    # a sparse call's text q blocks attend densely: launched first (`launch_order`)
    first = layout.text_tiles * layout.tile_tokens // block_m if prep.spec.mode.sparse else 0
    rest = (
        prep.kv_bias, kv.index, kv.count, kv.full, st.slot_source, out,
        scale * LOG2E, H, N, layout.padded_tokens, layout.n_tiles, first, layout.text_start,
        layout.text,
        layout.grid[1], layout.grid[2], layout.tiles_per_axis[1], layout.tiles_per_axis[2],
        *layout.tile, *_list_strides(kv.index), *_list_strides(kv.count), *out.stride()[:3],
    )  # fmt: skip
    return grid, rest
