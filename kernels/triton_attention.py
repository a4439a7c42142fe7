"""The Triton attention kernel for the FP8 / block-sparse modes (any GPU Triton supports).

Reads what `prepare.prepare` wrote (codes, scales, kv lists); `dispatch` decides when it runs.
What every mode computes is defined by `reference.py`; this file must agree with it (tests check
that against an fp64 truth, FlashAttention's way) and never imports it.

``_attn_kernel``: FlashAttention-2 style online softmax in exp2 with the softmax scale and the
Q/K dequant factors folded into one per-row factor; for fp8 the numerator is produced directly
as P·448 (log2 448 folded into the row max), rounded to e4m3 for an fp8 P·V dot, and V's
per-channel scale is applied once at the end. The output is written back in model order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import triton
import triton.language as tl

from .prepare import Prepared, launch_order, scale_from_bits, tile_of_rows, to_e4m3

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
        p8 = to_e4m3(p, EXACT) if FP8 else p.to(v.dtype)
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
    FIRST,
    TEXT_START,
    TEXT,
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
):
    """Grid (q blocks, batch*heads). Sparse: q rows are padded slots of one q tile, whose kv list
    is KV_INDEX[b, h, q_tile]. Dense: q rows are model tokens and every q block shares list 0."""
    pid, bh = launch_order(
        tl.program_id(0), tl.program_id(1), tl.num_programs(0), tl.num_programs(1), FIRST
    )
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
        tile_of_row = tile_of_rows(
            offs_m, N, N_TILES, TEXT_START, TEXT, GRID_H, GRID_W, TILES_H, TILES_W, TILE_T,
            TILE_H, TILE_W, TILE_TOKENS,
        )  # fmt: skip
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
        FP8, False, HEAD_DIM, BLOCK_N, TILE_TOKENS, EXACT,
    )  # fmt: skip
    acc, l_i, m_i = _attn_inner(
        acc, l_i, m_i, q, c_q, KC, VC, KS, KV_BIAS, idx_ptr, bh, n_full, count, N_PAD, N_TILES,
        FP8, True, HEAD_DIM, BLOCK_N, TILE_TOKENS, EXACT,
    )  # fmt: skip

    out = acc * (1.0 / l_i)[:, None]
    if FP8:
        out = out * scale_from_bits(tl.load(VAMAX + bh64 * HEAD_DIM + offs_d))[None, :]
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


def launch(
    prep: Prepared,
    grid: tuple[int, int],
    rest: tuple[object, ...],
    *,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    options: Mapping[str, Any] | None = None,
) -> None:
    """Run `_attn_kernel` on a `Prepared`. ``grid`` and ``rest`` are `prepare.launch_args`'s;
    ``options``: further launch keywords (registered knobs, `knobs.launch_options`)."""
    dummy = prep.q
    _attn_kernel[grid](
        prep.q, prep.k, prep.v,
        dummy if prep.q_scale is None else prep.q_scale,
        dummy if prep.k_scale is None else prep.k_scale,
        dummy if prep.v_amax is None else prep.v_amax,
        *rest, FP8=prep.spec.mode.fp8, SPARSE=prep.q_tile_major, HEAD_DIM=prep.shape[3],
        BLOCK_M=block_m, BLOCK_N=block_n, TILE_TOKENS=prep.layout.tile_tokens,
        EXACT=not prep.q.is_cuda, num_warps=num_warps, num_stages=num_stages, **(options or {}),
    )  # fmt: skip
