"""Triton kernels for the FP8 / block-sparse modes: a fused pre-pass and one attention kernel.

Reads top-down: jit helpers, the pre-pass kernels, the attention kernel, the launcher.
What every mode computes is defined by `reference.py`; this file must agree with it (tests check
that against an fp64 truth, FlashAttention's way) and never imports it.

Data flow of one call (all of it is the timed op):

1. ``_vamax_kernel`` (fp8 only): V's per-(batch, head, channel) amax over all tokens, as an
   ``atomic_max`` on the fp32 bit patterns (|x| >= 0, so integer order is float order and NaN wins).
2. ``_prepass_kernel``: one program per (tile, batch*head, q|k|v) gathers the tile's rows from
   model order, takes the tile's amax, writes e4m3 codes (bf16 for ``bf16_sparse``), the per-tile
   Q/K scale and, for data-dependent patterns, the tile sums whose means rank the kv tiles.
   K and V are written in padded tile-major order; V transposed (channel-major) for fp8, because
   Hopper's fp8 wgmma needs its B operand K-major. Q is tile-major for sparse modes (a program's
   rows must share one q tile) and stays in model order for dense ones (no padded query rows).
3. The block index: static patterns (dense, window) are built once per layout and cached on the
   device; topk/cdf come from the pooled tile means. Either way the kv tiles of each q tile are
   reordered full-tiles-first, so that only the few tiles with padded slots pay for the mask.
4. ``_attn_kernel``: FlashAttention-2 style online softmax in exp2 with the softmax scale and the
   Q/K dequant factors folded into one per-row factor; for fp8 the numerator is produced directly
   as P·448 (log2 448 folded into the row max), rounded to e4m3 for an fp8 P·V dot, and V's
   per-channel scale is applied once at the end. The output is written back in model order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .patterns import BlockIndex, block_index, keep_count
from .rope import Rope, tables
from .spec import AttentionSpec, KernelConfig, Pattern
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
def _scale_from_bits(amax_bits):
    # reference.py: scale = amax / 448 (e4m3's largest value), at least 1e-20 (all-zero tiles).
    s = amax_bits.to(tl.float32, bitcast=True) / 448.0
    # `where` rather than `maximum`: a NaN amax must stay NaN.
    return tl.where(s < 1e-20, 1e-20, s)


@triton.jit
def _to_e4m3(x, EXACT: tl.constexpr):
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
def _exp2_f16(x, EXACT: tl.constexpr):
    """exp2 of fp32 ``x`` as fp16: ``x`` rounded to fp16 pairs, then ``ex2.approx.f16x2`` (two
    scalar MUFU ops on sm_90). Off the GPU (EXACT) the same roundings in fp32 arithmetic."""
    if EXACT:
        return tl.math.exp2(x.to(tl.float16).to(tl.float32)).to(tl.float16)
    else:
        return tl.inline_asm_elementwise(
            asm="{ .reg .b32 t; cvt.rn.f16x2.f32 t, $2, $1; ex2.approx.f16x2 $0, t; }",
            constraints="=r,r,r",
            args=[x],
            dtype=tl.float16,
            is_pure=True,
            pack=2,
        )


@triton.jit
def _tile_of_rows(rows, N, GRID_H, GRID_W, TILES_H, TILES_W, TILE_T, TILE_H, TILE_W):
    """The 3D tile of each model-order row (0 for rows past N), for its Q scale."""
    t = rows // (GRID_H * GRID_W)
    hh = (rows // GRID_W) % GRID_H
    w = rows % GRID_W
    tile = ((t // TILE_T) * TILES_H + hh // TILE_H) * TILES_W + w // TILE_W
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
            scale = _scale_from_bits(tl.max(tl.max(_abs_bits(x), axis=1), axis=0))
            tl.store(XS + bh64 * N_TILES + tile, scale)
        y = _to_e4m3(tl.math.div_rn(x, scale), EXACT) if FP8 else x.to(XC.dtype.element_ty)
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
            scale = _scale_from_bits(tl.max(amax, axis=0))
            tl.store(XS + bh64 * N_TILES + tile, scale)
        # Second sweep re-reads the tile (from L2: it was just read).
        for c0 in range(0, TILE_TOKENS, CHUNK):
            src = tl.load(SLOT_SRC + slot0 + c0 + offs_c)
            x = _load_qk(X, x_base, src, offs_d, stride_n, stride_d, COS, SIN, ROPE, HEAD_DIM)
            y = _to_e4m3(tl.math.div_rn(x, scale), EXACT) if FP8 else x.to(XC.dtype.element_ty)
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
        vs = _scale_from_bits(tl.load(VAMAX + bh64 * HEAD_DIM + offs_d))
    for c0 in range(0, TILE_TOKENS, CHUNK):
        src = tl.load(SLOT_SRC + slot0 + c0 + offs_c)
        x = _load_rows(X, x_base, src, offs_d, stride_n, stride_d)
        slots = slot0 + c0 + offs_c
        if FP8:
            y = _to_e4m3(tl.math.div_rn(x, vs[None, :]), EXACT)
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
    from L2 (the order measured with RoPE; without it the tile-first order measured faster,
    docs/kernel_notes.md v15)."""
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
# attention kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _attn_inner(
    acc,
    l_i,
    m_i,
    q,
    c_q,
    KC,
    VC,
    KS,
    KV_BIAS,
    idx_ptr,
    bh,
    lo,
    hi,
    N_PAD,
    N_TILES,
    FP8: tl.constexpr,
    MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILE_TOKENS: tl.constexpr,
    EXACT: tl.constexpr,
    EXP16: tl.constexpr,
):
    """Online softmax over the kv blocks of list entries [lo, hi); MASKED adds the padding bias."""
    NB: tl.constexpr = TILE_TOKENS // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    bh64 = bh.to(tl.int64)
    k_base = KC + bh64 * N_PAD * HEAD_DIM
    v_base = VC + bh64 * N_PAD * HEAD_DIM
    for it in range(lo * NB, hi * NB):
        kv_tile = tl.load(idx_ptr + it // NB)
        start = kv_tile * TILE_TOKENS + (it % NB) * BLOCK_N
        # K as (HEAD_DIM, BLOCK_N), head_dim contiguous: the K-major B operand wgmma wants.
        k = tl.load(k_base + (start + offs_n)[None, :] * HEAD_DIM + offs_d[:, None])
        qk = tl.dot(q, k)
        c = c_q * tl.load(KS + bh64 * N_TILES + kv_tile) if FP8 else c_q
        if MASKED:
            qk = qk * c[:, None] + tl.load(KV_BIAS + start + offs_n)[None, :]
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * c)
        # fp8: exp2(s - m + log2 448) = 448 * P, ready for e4m3 without another multiply.
        shift = m_ij - 8.807354922057604 if FP8 else m_ij
        x = qk - shift[:, None] if MASKED else qk * c[:, None] - shift[:, None]
        if EXP16:
            p16 = _exp2_f16(x, EXACT)
            p = p16.to(tl.float32)
        else:
            p = tl.math.exp2(x)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if FP8:
            # V^T storage (HEAD_DIM, N_PAD): loaded as (BLOCK_N, HEAD_DIM) with tokens contiguous.
            v = tl.load(v_base + offs_d[None, :] * N_PAD + (start + offs_n)[:, None])
        else:
            v = tl.load(v_base + (start + offs_n)[:, None] * HEAD_DIM + offs_d[None, :])
        # P·V accumulates inside the tensor core; accumulating each block's product in fp32
        # registers instead measured no more accurate at 75,600 keys, and slower.
        if EXP16 and not EXACT:
            p8 = p16.to(tl.float8e4nv)  # cvt.rn.satfinite.e4m3x2.f16x2: one op per pair
        elif FP8:
            p8 = _to_e4m3(p, EXACT)
        else:
            p8 = p.to(v.dtype)
        acc = tl.dot(p8, v, acc)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_kernel(
    QC,
    KC,
    VC,
    QS,
    KS,
    VAMAX,
    KV_BIAS,
    KV_INDEX,
    KV_COUNT,
    KV_FULL,
    SLOT_SRC,
    OUT,
    qk_scale,
    H,
    N,
    N_PAD,
    N_TILES,
    GRID_H,
    GRID_W,
    TILES_H,
    TILES_W,
    TILE_T,
    TILE_H,
    TILE_W,
    s_ib,
    s_ih,
    s_iq,
    s_cb,
    s_ch,
    s_cq,
    s_ob,
    s_oh,
    s_on,
    FP8: tl.constexpr,
    SPARSE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILE_TOKENS: tl.constexpr,
    EXACT: tl.constexpr,
    EXP16: tl.constexpr,
):
    """Grid (q blocks, batch*heads). Sparse: q rows are padded slots of one q tile, whose kv list
    is KV_INDEX[b, h, q_tile]. Dense: q rows are model tokens and every q block shares list 0."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bh64 = bh.to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    if SPARSE:
        q_tile = (pid * BLOCK_M) // TILE_TOKENS
        q = tl.load(QC + bh64 * N_PAD * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
        row = q_tile
        tile_of_row = tl.zeros([BLOCK_M], dtype=tl.int32) + q_tile
    else:
        in_range = offs_m < N
        q_ptrs = QC + bh64 * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        q = tl.load(q_ptrs, mask=in_range[:, None], other=0.0)
        row = 0
        tile_of_row = _tile_of_rows(
            offs_m, N, GRID_H, GRID_W, TILES_H, TILES_W, TILE_T, TILE_H, TILE_W
        )
    if FP8:
        c_q = tl.load(QS + bh64 * N_TILES + tile_of_row) * qk_scale
    else:
        c_q = tl.zeros([BLOCK_M], dtype=tl.float32) + qk_scale
    list_off = b.to(tl.int64) * s_cb + h.to(tl.int64) * s_ch + row * s_cq
    count = tl.load(KV_COUNT + list_off)
    n_full = tl.load(KV_FULL + list_off)
    idx_ptr = KV_INDEX + b.to(tl.int64) * s_ib + h.to(tl.int64) * s_ih + row * s_iq

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _attn_inner(
        acc, l_i, m_i, q, c_q, KC, VC, KS, KV_BIAS, idx_ptr, bh, 0, n_full, N_PAD, N_TILES,
        FP8, False, HEAD_DIM, BLOCK_N, TILE_TOKENS, EXACT, EXP16,
    )  # fmt: skip
    acc, l_i, m_i = _attn_inner(
        acc, l_i, m_i, q, c_q, KC, VC, KS, KV_BIAS, idx_ptr, bh, n_full, count, N_PAD, N_TILES,
        FP8, True, HEAD_DIM, BLOCK_N, TILE_TOKENS, EXACT, EXP16,
    )  # fmt: skip

    out = acc * (1.0 / l_i)[:, None]
    if FP8:
        out = out * _scale_from_bits(tl.load(VAMAX + bh64 * HEAD_DIM + offs_d))[None, :]
    out_base = OUT + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh
    if SPARSE:
        src = tl.load(SLOT_SRC + offs_m)
        ptrs = out_base + src[:, None].to(tl.int64) * s_on + offs_d[None, :]
        tl.store(ptrs, out.to(OUT.dtype.element_ty), mask=src[:, None] >= 0)
    else:
        ptrs = out_base + offs_m[:, None].to(tl.int64) * s_on + offs_d[None, :]
        tl.store(ptrs, out.to(OUT.dtype.element_ty), mask=in_range[:, None])


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KvList:
    """What the attention kernel walks: per (b|1, h|1, q tile|1) the kv tiles, full ones first.

    ``index[..., :full]`` are kv tiles without padded slots, ``index[..., full:count]`` those
    with padding (masked); each part ascending. int32, contiguous.
    """

    index: torch.Tensor
    count: torch.Tensor
    full: torch.Tensor


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
    impl: str = "triton"  # the kernel whose V key order this is (`wgmma_key_order` for Gluon)


@dataclass(frozen=True)
class _Static:
    slot_source: torch.Tensor  # (N_PAD,) int32, -1 for padding
    kv_bias: torch.Tensor  # (N_PAD,) fp32, 0 for real slots, -inf for padding
    partial: torch.Tensor  # (n_tiles,) bool: tile has padded slots
    valid_counts: torch.Tensor  # (n_tiles,) fp32
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
    dense = _full_first(BlockIndex(every, n), partial)
    return _Static(src, bias, partial, counts.float(), dense)


def _full_first(blocks: BlockIndex, partial: torch.Tensor) -> KvList:
    """Reorder each kv list so tiles without padding come first (only the rest need the mask)."""
    idx = blocks.kv_index.long()
    n = partial.numel()
    used = torch.arange(idx.shape[-1], device=idx.device) < blocks.kv_count.unsqueeze(-1)
    part = partial.long().expand(*idx.shape[:-1], n).gather(-1, idx)  # 1 where padded
    key = torch.where(used, idx + part * n, 2 * n).sort(-1).values
    full = (used & (part == 0)).sum(-1)
    return KvList(
        (key % n).to(torch.int32).contiguous(),
        blocks.kv_count.to(torch.int32).contiguous(),
        full.to(torch.int32).contiguous(),
    )


def _ranked_blocks(
    pattern: Pattern, sparsity: float, q_pooled: torch.Tensor, k_pooled: torch.Tensor
) -> BlockIndex:
    """The kv tiles `patterns.block_index` keeps for ``topk`` / ``cdf``, in rank order.

    Same choice (the tests check it against `block_index`), built with one sort per row
    instead of ``torch.topk``: at Wan 720p sizes (7,560 rows of 630 tiles) torch takes its
    multi-block top-k path, during which the host waits for the GPU (H100, behind a 1.6 ms
    matmul: 1.9 ms of host time per call, against 0.17 ms for this sort).
    """
    n_tiles = q_pooled.shape[-2]
    n_keep = keep_count(n_tiles, sparsity)
    scores = (q_pooled @ k_pooled.transpose(-1, -2)) / math.sqrt(q_pooled.shape[-1])
    ranked = scores.clone()
    ranked.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))  # the own tile always comes first
    order = ranked.argsort(dim=-1, descending=True)[..., :n_keep]
    if pattern.kind == "topk":
        count = torch.full(order.shape[:-1], n_keep, dtype=torch.int32, device=order.device)
    else:
        cum = scores.softmax(-1).gather(-1, order).cumsum(-1)
        count = ((cum < pattern.mass).sum(-1) + 1).clamp(max=n_keep).to(torch.int32)
    return BlockIndex(order, count)


def _ascending(blocks: BlockIndex) -> BlockIndex:
    """A BlockIndex as `patterns` returns it: used entries ascending, then zeros (int32)."""
    idx = blocks.kv_index.long()
    big = torch.iinfo(torch.int64).max
    used = torch.arange(idx.shape[-1], device=idx.device) < blocks.kv_count.unsqueeze(-1)
    idx = torch.where(used, idx, big).sort(-1).values
    return BlockIndex(torch.where(idx == big, 0, idx).to(torch.int32), blocks.kv_count)


@lru_cache(maxsize=64)
def _window_list(
    layout: TileLayout, pattern: Pattern, sparsity: float, device: torch.device
) -> tuple[BlockIndex, KvList]:
    cpu = block_index(layout, pattern, sparsity)
    blocks = BlockIndex(cpu.kv_index.to(device), cpu.kv_count.to(device))
    return blocks, _full_first(blocks, _static(layout, device).partial)


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
) -> Prepared:
    """Run the pre-pass and build the kv lists. ``blocks`` overrides the pattern's choice;
    ``impl`` is the kernel that will read it (the Gluon kernels take V's keys reordered);
    ``rope`` (cos, sin): q and k are rotated as Wan does (`rope.rotary`) inside the pre-pass,
    in fp32, before their tiles are scaled."""
    B, H, N, D = q.shape
    dev = q.device
    cos, sin = (None, None) if rope is None else tables(rope, N, D, dev)
    fp8, sparse = spec.mode.fp8, spec.mode.sparse
    st = _static(layout, dev)
    n_tiles, n_pad, tt = layout.n_tiles, layout.padded_tokens, layout.tile_tokens
    code_dtype = torch.float8_e4m3fn if fp8 else q.dtype
    pool = sparse and blocks is None and spec.pattern is not None and spec.pattern.kind != "window"

    qc = torch.empty((B * H, n_pad if sparse else N, D), dtype=code_dtype, device=dev)
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
        FP8=fp8, POOL=pool, Q_TILE_MAJOR=sparse, HEAD_DIM=D, TILE_TOKENS=tt,
        CHUNK=_chunk_rows(tt, D), EXACT=not q.is_cuda, WGMMA_KEYS=fp8 and wgmma_keys(impl),
        ROPE=rope is not None, num_warps=8,
    )  # fmt: skip

    if not sparse:
        kv = st.dense
    elif blocks is not None:
        kv = _full_first(blocks, st.partial)
    elif pool:
        assert spec.pattern is not None and qsum is not None and ksum is not None
        counts = st.valid_counts.view(1, 1, -1, 1)
        ranked = _ranked_blocks(spec.pattern, spec.sparsity, qsum / counts, ksum / counts)
        kv = _full_first(ranked, st.partial)
        blocks = _ascending(ranked)
    else:
        assert spec.pattern is not None
        blocks, kv = _window_list(layout, spec.pattern, spec.sparsity, dev)
    return Prepared(qc, kc, vc, qs, ks, vamax, blocks, kv, layout, spec, (B, H, N, D), impl)


def _list_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(b, h, q) strides of a (B|1, H|1, nq|1, ...) tensor; 0 where the dim broadcasts."""
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(3))  # type: ignore[return-value]


def attend(
    prep: Prepared,
    *,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    scale: float,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    exp2: str = "f32",
    impl: str = "triton",
) -> torch.Tensor:
    """Run the attention kernel on a `Prepared`; returns (B, H, N, D) in model order.
    ``impl="gluon"`` / ``"gluon_ws"`` (fp8 modes, Hopper) run `gluon_attention`'s kernels."""
    if impl != "triton" and not prep.q.is_cuda:
        raise ValueError(f"kernel impl={impl} runs on a CUDA (sm_90) GPU only")
    if prep.spec.mode.fp8 and wgmma_keys(impl) != wgmma_keys(prep.impl):
        raise ValueError(f"V was prepared for impl={prep.impl}; run prepare(..., impl={impl!r})")
    B, H, N, D = prep.shape
    layout = prep.layout
    fp8, sparse = prep.spec.mode.fp8, prep.spec.mode.sparse
    if out is None:
        out = torch.empty((B, H, N, D), dtype=out_dtype, device=prep.q.device)
    elif out.shape != (B, H, N, D) or out.dtype != out_dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be ({B}, {H}, {N}, {D}) {out_dtype} with unit last stride")
    grid, rest = launch_args(prep, block_m=block_m, scale=scale, out=out)
    if impl != "triton":
        from .gluon_attention import launch

        launch(prep, grid, rest, block_m=block_m, block_n=block_n, num_stages=num_stages,
               warp_specialize=impl == "gluon_ws")  # fmt: skip
        return out
    dummy = prep.q
    _attn_kernel[grid](
        prep.q, prep.k, prep.v,
        dummy if prep.q_scale is None else prep.q_scale,
        dummy if prep.k_scale is None else prep.k_scale,
        dummy if prep.v_amax is None else prep.v_amax,
        *rest, FP8=fp8, SPARSE=sparse, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
        TILE_TOKENS=layout.tile_tokens, EXACT=not prep.q.is_cuda,
        EXP16=fp8 and exp2 == "f16x2", num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def launch_args(
    prep: Prepared, *, block_m: int, scale: float, out: torch.Tensor
) -> tuple[tuple[int, int], tuple[object, ...]]:
    """The grid, and what every attention kernel takes after its Q/K/V and scale operands: the
    kv lists, the output, sizes and strides."""
    B, H, N, _ = prep.shape
    layout, kv = prep.layout, prep.kv
    st = _static(layout, prep.q.device)
    n_rows = layout.padded_tokens if prep.spec.mode.sparse else N
    grid = (triton.cdiv(n_rows, block_m), B * H)
    rest = (
        st.kv_bias, kv.index, kv.count, kv.full, st.slot_source, out,
        scale * LOG2E, H, N, layout.padded_tokens, layout.n_tiles,
        layout.grid[1], layout.grid[2], layout.tiles_per_axis[1], layout.tiles_per_axis[2],
        *layout.tile, *_list_strides(kv.index), *_list_strides(kv.count), *out.stride()[:3],
    )  # fmt: skip
    return grid, rest


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: TileLayout,
    spec: AttentionSpec,
    config: KernelConfig,
    scale: float,
    blocks: BlockIndex | None = None,
    out: torch.Tensor | None = None,
    rope: Rope | None = None,
) -> torch.Tensor:
    """The whole op for every non-``bf16_dense`` mode: pre-pass, block index, attention.
    ``rope``: q and k are rotated in the pre-pass (`prepare`).

    q, k, v: (B, H, N, D) in model order, bf16/fp16, any strides; returns (B, H, N, D) in q's
    dtype. ``config`` must have passed `config.check_feasible`. ``blocks`` (tests) replaces
    the pattern's block index; ``out`` (tests poison it) receives the result.
    """
    if spec.mode.fp8 and not hasattr(torch, "float8_e4m3fn"):
        raise RuntimeError("fp8 modes need torch.float8_e4m3fn")
    prep = prepare(q, k, v, layout=layout, spec=spec, blocks=blocks, impl=config.impl, rope=rope)
    return attend(
        prep,
        block_m=config.block_m,
        block_n=config.block_n,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        scale=scale,
        out_dtype=q.dtype,
        out=out,
        exp2=config.exp2,
        impl=config.impl,
    )
