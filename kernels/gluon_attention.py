"""The FP8 attention kernels written in Gluon (Triton's explicit-layout dialect) for Hopper.

Same contract as ``triton_attention._attn_kernel`` for the fp8 modes (the same `Prepared`
buffers and kv lists, the same numbers: softmax scale and Q/K scales folded into one per-row
factor, ``log2 448`` folded into the row max, P·V accumulated in the tensor core, V's channel
scale applied at the end). What Gluon adds is control over the schedule:

- K and V blocks arrive by TMA into a ring of ``STAGES`` shared-memory slots, each with an
  mbarrier that counts the bytes in.
- FlashAttention-3's intra-warpgroup overlap: QK(j) and P·V(j-1) are both in flight; the
  warpgroup waits for QK only, does block j's softmax while P·V(j-1) still runs, then waits for
  P·V and rescales. Issue and both waits sit in one iteration (a ``wait(1)`` across the loop's
  back edge makes ptxas serialise every wgmma: its message C7514).
- P goes to the P·V wgmma without leaving its thread: its keys are relabelled (`_p_operand`)
  and the pre-pass stores V's keys in the same order (`prepare.prepare(impl=...)`).

Two kernels share the per-warpgroup body `_warpgroup_rows`:

- ``impl: gluon``: one warpgroup of 64 rows per CTA that refills its own ring, two CTAs
  per SM.
- ``impl: gluon_ws``: 128 rows per CTA on two consumer warpgroups (the default
  partition and a 4-warp worker, 240 registers each) fed by a 1-warp TMA producer
  (`gl.warp_specialize`); slots go back to the producer through ``empty`` mbarriers that both
  consumers arrive on. One CTA per SM. ``block_n=256`` (`_pair_loop`): two 128-key
  TMA blocks per softmax step, so the per-block bookkeeping is paid once per 256 keys; 2-5 %
  faster than 128-key steps, 1.41-1.44x cuDNN dense and 12.5-12.9x at 90 % sparsity on the
  H100. FA3's ping-pong turns between the consumers (one warpgroup's softmax while the other's
  wgmmas hold the tensor cores) measured slower in every run and were removed.

Hopper only (sm_90); the CPU interpreter does not run Gluon, so `dispatch.attend` refuses these
kernels off the GPU and their tests need a Hopper GPU. Written against triton 3.6's Gluon API
(experimental: 3.9 renamed ``tma.async_copy_global_to_shared`` to ``async_load``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# Plain @triton.jit helpers, shared with `_attn_kernel`: Gluon calls them with its own layouts.
from .prepare import Prepared, launch_order, scale_from_bits, tile_of_rows

LOG2_448 = gl.constexpr(8.807354922057604)  # log2(448): P comes out as P·448
# The warp-specialised kernel has 4 + 4 + 1 warps, i.e. three warpgroups (384 threads) at one
# CTA per SM: 168 registers each on average. The producer's warpgroup drops to 24 and the two
# consumer warpgroups get 240 (setmaxnreg; 168 * 384 = 24 * 128 + 2 * 240 * 128).
CONSUMER_REGS = 240
WS_LAUNCH = {"maxnreg": 168}


@gluon.jit
def _block_start(kv_tile, it, TILE_TOKENS: gl.constexpr, BLOCK_N: gl.constexpr):
    """First key (padded, tile-major) of block ``it`` of the kv list, in tile ``kv_tile``."""
    return kv_tile * TILE_TOKENS + (it % (TILE_TOKENS // BLOCK_N)) * BLOCK_N


@gluon.jit
def _tma_block(k_desc, v_desc, k_dst, v_dst, bar, idx_ptr, it, bh, N_PAD, pred,
               HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
               TILE_TOKENS: gl.constexpr):  # fmt: skip
    """TMA K and V of block ``it`` of the kv list into ``k_dst`` / ``v_dst``, counted on
    ``bar`` (``pred``: whether to)."""
    kv_tile = gl.load(idx_ptr + it // (TILE_TOKENS // BLOCK_N), mask=pred, other=0)
    start = _block_start(kv_tile, it, TILE_TOKENS, BLOCK_N)
    tma.async_copy_global_to_shared(k_desc, [bh * N_PAD + start, 0], bar, k_dst, pred)
    tma.async_copy_global_to_shared(v_desc, [bh * HEAD_DIM, start], bar, v_dst, pred)


@gluon.jit
def _issue_load(k_desc, v_desc, k_smem, v_smem, bars, idx_ptr, it, total, bh, N_PAD,
                HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, TILE_TOKENS: gl.constexpr,
                STAGES: gl.constexpr):  # fmt: skip
    """TMA block ``it`` of the kv list (if it exists) into slot ``it % STAGES``."""
    pred = it < total
    slot = it % STAGES
    bar = bars.index(slot)
    mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=pred)
    _tma_block(k_desc, v_desc, k_smem.index(slot), v_smem.index(slot), bar, idx_ptr, it, bh,
               N_PAD, pred, HEAD_DIM, BLOCK_N, TILE_TOKENS)  # fmt: skip


@gluon.jit
def _masked_scores(qk, bias_ptr, start, masked, s_layout: gl.constexpr, BLOCK_N: gl.constexpr):
    """Scores of a block with padded keys get the kv bias (-inf past the last token)."""
    if masked:
        cols = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        qk = qk + gl.load(bias_ptr + cols)[None, :]
    return qk


@gluon.jit
def _softmax(qk, m_i, l_i, c, bias_ptr, start, masked, s_layout: gl.constexpr,
             BLOCK_N: gl.constexpr):  # fmt: skip
    """One block's online softmax: the numerator P·448 (fp32), max, rescale. P crosses the
    loop's back edge as fp32 (P·V of block j is issued in iteration j+1); `_p_operand` packs it
    to e4m3 next to the wgmma that reads it (carried as e4m3 it was split into one byte per
    register and re-packed with ~200 extra instructions per block).
    """
    qk = _masked_scores(qk, bias_ptr, start, masked, s_layout, BLOCK_N)
    m_new = gl.maximum(m_i, gl.max(qk, 1) * c)
    p = gl.exp2(qk * c[:, None] - (m_new - LOG2_448)[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_i, alpha


@gluon.jit
def _p_operand(p, p_layout: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr):
    """P (fp32) as the P·V wgmma's e4m3 register operand, its keys relabelled instead of moved.

    In the accumulator layout a thread holds, of each 32 keys, 16h + 8q + 2t + b (t its lane
    in the quad; h, q, b bits of its registers); the fp8 A operand wants 16h + 4t + 2q + b.
    Swapping the q and t fields of the key index maps one onto the other without leaving the
    thread; V's keys are stored in the same order (`wgmma_key_order`), so P·V is unchanged.
    Each 4 consecutive keys of the operand layout are then packed into one register by two
    ``cvt.rn.satfinite.e4m3x2.f32`` (the rounding of the Triton kernel's ``.to``): Triton's own
    fp32 -> e4m3 cast splits the pairs into bytes and re-packs them, fp16 in between
    costs a third conversion per pair.
    """
    p = p.reshape([ROWS, BLOCK_N // 32, 2, 2, 4, 2]).permute((0, 1, 2, 4, 3, 5))
    p = gl.convert_layout(p.reshape([ROWS, BLOCK_N]), p_layout)
    codes = gl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; "
        "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; mov.b32 $0, {lo, hi}; }",
        "=r,r,r,r,r", [p], dtype=gl.int8, is_pure=True, pack=4,
    )  # fmt: skip
    return codes.to(gl.float8e4nv, bitcast=True)


@gluon.jit
def _pair_softmax(qk_a, qk_b, m_i, l_i, c_a, c_b):
    """One online-softmax update over two blocks' scores: P·448 of each (fp32), the new max,
    the row sum, and the accumulator's rescale factor."""
    m_new = gl.maximum(m_i, gl.maximum(gl.max(qk_a, 1) * c_a, gl.max(qk_b, 1) * c_b))
    shift = (m_new - LOG2_448)[:, None]
    p_a = gl.exp2(qk_a * c_a[:, None] - shift)
    p_b = gl.exp2(qk_b * c_b[:, None] - shift)
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + (gl.sum(p_a, 1) + gl.sum(p_b, 1))
    return p_a, p_b, m_new, l_i, alpha


@gluon.jit
def _pair_entries(idx_ptr, ks_ptr, c_q, it, NB: gl.constexpr):
    """Kv-list entries of blocks ``it`` and ``it + 1`` and their rows' score factors."""
    kv_a = gl.load(idx_ptr + it // NB)
    kv_b = gl.load(idx_ptr + (it + 1) // NB)
    return kv_a, kv_b, c_q * gl.load(ks_ptr + kv_a), c_q * gl.load(ks_ptr + kv_b)


@gluon.jit
def _pair_loop(q_smem, ring, work, c_q, ks_ptr, bias_ptr, m_i, l_i, acc,
               s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
               ROWS: gl.constexpr, BLOCK_N: gl.constexpr, TILE_TOKENS: gl.constexpr,
               STAGES: gl.constexpr):  # fmt: skip
    """Two kv blocks per step, one online-softmax update for both.

    The ring's slot ``j`` holds blocks 2j and 2j+1 (one ``ready`` and one ``empty`` barrier per
    pair). Step j: QK of both blocks, one wait, one max and rescale over 256 keys, P packed,
    P·V of both, one wait. Nothing is in flight across the back edge (ptxas would serialise
    every wgmma) and P never crosses it; the registers hold S for two blocks (128), the
    accumulator (64) and packed P (32). Issuing P·V(j) and QK(j+1) together instead needs S
    and packed P live at once: ptxas then spills P and serialises the wgmmas (tried). The
    per-block bookkeeping (waits, barriers, the rescale, the row max's shuffles) is paid once
    per two blocks. An odd last block goes through the same step alone.
    """
    _kd, _vd, k_smem, v_smem, _q, ready, empty = ring
    _pid, _bh, idx_ptr, total, n_plain, _np = work
    NB: gl.constexpr = TILE_TOKENS // BLOCK_N
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    npairs = total // 2
    for j in range(npairs):
        it = 2 * j
        sl = 2 * (j % STAGES)
        mbarrier.wait(ready.index(j % STAGES), (j // STAGES) & 1)
        ta = warpgroup_mma(q_smem, k_smem.index(sl).permute((1, 0)), s_zero, use_acc=False,
                           is_async=True)  # fmt: skip
        tb = warpgroup_mma(q_smem, k_smem.index(sl + 1).permute((1, 0)), s_zero, use_acc=False,
                           is_async=True)  # fmt: skip
        kv_a, kv_b, c_a, c_b = _pair_entries(idx_ptr, ks_ptr, c_q, it, NB)
        qk_a, qk_b = warpgroup_mma_wait(0, deps=[ta, tb])
        qk_a = _masked_scores(qk_a, bias_ptr, _block_start(kv_a, it, TILE_TOKENS, BLOCK_N),
                              it >= n_plain, s_layout, BLOCK_N)  # fmt: skip
        qk_b = _masked_scores(qk_b, bias_ptr, _block_start(kv_b, it + 1, TILE_TOKENS, BLOCK_N),
                              it + 1 >= n_plain, s_layout, BLOCK_N)  # fmt: skip
        p_a, p_b, m_i, l_i, alpha = _pair_softmax(qk_a, qk_b, m_i, l_i, c_a, c_b)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        op_a = _p_operand(p_a, p_layout, ROWS, BLOCK_N)
        op_b = _p_operand(p_b, p_layout, ROWS, BLOCK_N)
        tok = warpgroup_mma(op_a, v_smem.index(sl).permute((1, 0)), acc, is_async=True)
        tok = warpgroup_mma(op_b, v_smem.index(sl + 1).permute((1, 0)), tok, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[tok])
        mbarrier.arrive(empty.index(j % STAGES), count=1)
    if total % 2 == 1:  # the odd last block, alone in the first half of its slot
        it = total - 1
        sl = 2 * (npairs % STAGES)
        mbarrier.wait(ready.index(npairs % STAGES), (npairs // STAGES) & 1)
        qk = warpgroup_mma(q_smem, k_smem.index(sl).permute((1, 0)), s_zero, use_acc=False)
        kv = gl.load(idx_ptr + it // NB)
        p, m_i, l_i, alpha = _softmax(qk, m_i, l_i, c_q * gl.load(ks_ptr + kv), bias_ptr,
                                      _block_start(kv, it, TILE_TOKENS, BLOCK_N), it >= n_plain,
                                      s_layout, BLOCK_N)  # fmt: skip
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        acc = warpgroup_mma(_p_operand(p, p_layout, ROWS, BLOCK_N),
                            v_smem.index(sl).permute((1, 0)), acc)  # fmt: skip
        mbarrier.arrive(empty.index(npairs % STAGES), count=1)
    return acc, l_i


@gluon.jit
def _warpgroup_rows(WG: gl.constexpr, ptrs, dims, ring, work, SPARSE: gl.constexpr,
                    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    TILE_TOKENS: gl.constexpr, STAGES: gl.constexpr,
                    REFILL: gl.constexpr, PAIRS: gl.constexpr):  # fmt: skip
    """One warpgroup's 64 rows of the CTA's ``BLOCK_M``: Q, the kv loop, the epilogue.

    ``REFILL``: this warpgroup refills the ring itself (the one-warpgroup kernel); otherwise a
    producer warp does, and the warpgroup arrives on the slot's ``empty`` barrier instead.
    """
    QC, QS, KS, VAMAX, KV_BIAS, SLOT_SRC, OUT = ptrs
    qk_scale, H, N, N_TILES, TEXT_START, TEXT, GRID_H, GRID_W, TILES_H, TILES_W = dims[:10]
    TILE_T, TILE_H, TILE_W, s_ob, s_oh, s_on = dims[10:]
    k_desc, v_desc, k_smem, v_smem, q_smem, ready, empty = ring
    pid, bh, idx_ptr, total, n_plain, N_PAD = work
    ROWS: gl.constexpr = 64
    NB: gl.constexpr = TILE_TOKENS // BLOCK_N
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 32]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
    b = bh // H
    h = bh % H
    bh64 = bh.to(gl.int64)
    row0 = pid * BLOCK_M + WG * ROWS

    # ---- Q (once) into this warpgroup's shared memory, and each row's scale factor
    lrows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, ld_layout))
    lcols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld_layout))
    rows = row0 + gl.arange(0, ROWS, layout=row_s)
    if SPARSE:
        q = gl.load(QC + bh64 * N_PAD * HEAD_DIM + lrows[:, None] * HEAD_DIM + lcols[None, :])
        q_tile = (pid * BLOCK_M) // TILE_TOKENS
        tile_of_row = gl.full([ROWS], 0, gl.int32, row_s) + q_tile
    else:
        q_ptrs = QC + bh64 * N * HEAD_DIM + lrows[:, None] * HEAD_DIM + lcols[None, :]
        q = gl.load(q_ptrs, mask=(lrows < N)[:, None], other=0.0)
        tile_of_row = tile_of_rows(
            rows, N, N_TILES, TEXT_START, TEXT, GRID_H, GRID_W, TILES_H, TILES_W, TILE_T, TILE_H,
            TILE_W, TILE_TOKENS,
        )  # fmt: skip
    q_smem = q_smem.index(WG)
    q_smem.store(q)
    fence_async_shared()  # the wgmma reads Q through the async proxy
    c_q = gl.load(QS + bh64 * N_TILES + tile_of_row) * qk_scale
    ks_ptr = KS + bh64 * N_TILES
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([ROWS], gl.float32, row_s)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)

    if PAIRS:
        acc, l_i = _pair_loop(q_smem, ring, work, c_q, ks_ptr, KV_BIAS, m_i, l_i, acc, s_layout,
                              o_layout, p_layout, ROWS, BLOCK_N, TILE_TOKENS, STAGES)  # fmt: skip
    else:
        # ---- block 0: QK and softmax
        mbarrier.wait(ready.index(0), 0)
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
        qk = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False)
        kv_tile = gl.load(idx_ptr)
        c = c_q * gl.load(ks_ptr + kv_tile)
        p, m_i, l_i, alpha = _softmax(qk, m_i, l_i, c, KV_BIAS, kv_tile * TILE_TOKENS, n_plain <= 0,
                                      s_layout, BLOCK_N)  # fmt: skip
        # Block 1's list entry and K scale, loaded one iteration ahead from here on.
        kv_next = gl.load(idx_ptr + 1 // NB, mask=total > 1, other=0)
        ks_next = gl.load(ks_ptr + kv_next)

        # ---- steady state: QK(j) and PV(j-1) in flight, softmax(j) overlaps PV(j-1)
        for it in range(1, total):
            slot = it % STAGES
            prev = (it - 1) % STAGES
            mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
            qk_tok = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero,
                                   use_acc=False, is_async=True)  # fmt: skip
            p_op = _p_operand(p, p_layout, ROWS, BLOCK_N)
            acc_tok = warpgroup_mma(p_op, v_smem.index(prev).permute((1, 0)), acc, is_async=True)
            kv_tile = kv_next
            c = c_q * ks_next
            kv_next = gl.load(idx_ptr + (it + 1) // NB, mask=it + 1 < total, other=0)
            ks_next = gl.load(ks_ptr + kv_next)
            start = _block_start(kv_tile, it, TILE_TOKENS, BLOCK_N)
            qk = warpgroup_mma_wait(1, deps=[qk_tok])
            p, m_i, l_i, alpha = _softmax(qk, m_i, l_i, c, KV_BIAS, start, it >= n_plain, s_layout,
                                          BLOCK_N)  # fmt: skip
            acc = warpgroup_mma_wait(0, deps=[acc_tok])
            # Both wgmmas that read block it-1's slot are done: refill it, or hand it back.
            if REFILL:
                _issue_load(k_desc, v_desc, k_smem, v_smem, ready, idx_ptr, it - 1 + STAGES, total,
                            bh, N_PAD, HEAD_DIM, BLOCK_N, TILE_TOKENS, STAGES)  # fmt: skip
            else:
                mbarrier.arrive(empty.index(prev), count=1)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]

        last = (total - 1) % STAGES
        p_op = _p_operand(p, p_layout, ROWS, BLOCK_N)
        acc = warpgroup_mma(p_op, v_smem.index(last).permute((1, 0)), acc)

    # ---- epilogue: normalise, V's channel scale, write in model order
    offs_d = gl.arange(0, HEAD_DIM, layout=col_o)
    out = acc * (1.0 / gl.convert_layout(l_i, row_o))[:, None]
    out = out * scale_from_bits(gl.load(VAMAX + bh64 * HEAD_DIM + offs_d))[None, :]
    out_rows = row0 + gl.arange(0, ROWS, layout=row_o)
    out_base = OUT + b.to(gl.int64) * s_ob + h.to(gl.int64) * s_oh
    if SPARSE:
        src = gl.load(SLOT_SRC + out_rows)
        ptrs = out_base + src[:, None].to(gl.int64) * s_on + offs_d[None, :]
        gl.store(ptrs, out.to(OUT.dtype.element_ty), mask=(src >= 0)[:, None])
    else:
        ptrs = out_base + out_rows[:, None].to(gl.int64) * s_on + offs_d[None, :]
        gl.store(ptrs, out.to(OUT.dtype.element_ty), mask=(out_rows < N)[:, None])


@gluon.jit
def _issue_pair(k_desc, v_desc, k_smem, v_smem, bars, idx_ptr, j, total, bh, N_PAD,
                HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, TILE_TOKENS: gl.constexpr,
                STAGES: gl.constexpr):  # fmt: skip
    """TMA blocks 2j and 2j+1 of the kv list into pair slot ``j % STAGES`` (its two halves, one
    barrier). An odd list's last slot gets its last block twice: the bytes the barrier expects
    stay constant, and the consumer reads only the first half."""
    slot = j % STAGES
    bar = bars.index(slot)
    mbarrier.expect(bar, 2 * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
    for h in gl.static_range(2):
        _tma_block(k_desc, v_desc, k_smem.index(2 * slot + h), v_smem.index(2 * slot + h), bar,
                   idx_ptr, gl.minimum(2 * j + h, total - 1), bh, N_PAD, True, HEAD_DIM,
                   BLOCK_N, TILE_TOKENS)  # fmt: skip


@gluon.jit
def _produce(ring, work, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
             TILE_TOKENS: gl.constexpr, STAGES: gl.constexpr, PAIRS: gl.constexpr):  # fmt: skip
    """The producer warp: TMA each block (``PAIRS``: each pair of blocks) of the kv list into
    the ring once both warpgroups have handed its slot back (``empty`` starts as if released,
    so the first pass never waits)."""
    k_desc, v_desc, k_smem, v_smem, _q_smem, ready, empty = ring
    _pid, bh, idx_ptr, total, _n_plain, N_PAD = work
    if PAIRS:
        for j in range((total + 1) // 2):
            mbarrier.wait(empty.index(j % STAGES), ((j // STAGES) & 1) ^ 1)
            _issue_pair(k_desc, v_desc, k_smem, v_smem, ready, idx_ptr, j, total, bh, N_PAD,
                        HEAD_DIM, BLOCK_N, TILE_TOKENS, STAGES)  # fmt: skip
    else:
        for it in range(total):
            mbarrier.wait(empty.index(it % STAGES), ((it // STAGES) & 1) ^ 1)
            _issue_load(k_desc, v_desc, k_smem, v_smem, ready, idx_ptr, it, total, bh, N_PAD,
                        HEAD_DIM, BLOCK_N, TILE_TOKENS, STAGES)  # fmt: skip


@gluon.jit
def _kv_list(KV_INDEX, KV_COUNT, KV_FULL, s_ib, s_ih, s_iq, s_cb, s_ch, s_cq, H, pid,
             bh, SPARSE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
             TILE_TOKENS: gl.constexpr):  # fmt: skip
    """This CTA's kv list: its index pointer, its length in blocks, and how many come before
    the padded (masked) tiles."""
    NB: gl.constexpr = TILE_TOKENS // BLOCK_N
    b = bh // H
    h = bh % H
    list_off = b.to(gl.int64) * s_cb + h.to(gl.int64) * s_ch
    idx_ptr = KV_INDEX + b.to(gl.int64) * s_ib + h.to(gl.int64) * s_ih
    if SPARSE:
        q_tile = (pid * BLOCK_M) // TILE_TOKENS
        list_off += q_tile * s_cq
        idx_ptr += q_tile * s_iq
    total = gl.load(KV_COUNT + list_off) * NB
    n_plain = gl.load(KV_FULL + list_off) * NB
    return idx_ptr, total, n_plain


@gluon.jit
def _gl_attn_kernel(
    QC,
    k_desc,
    v_desc,
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
    SPARSE: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    TILE_TOKENS: gl.constexpr,
    STAGES: gl.constexpr,
    WARP_SPECIALIZE: gl.constexpr,
    PAIRS: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
):
    """Grid (q blocks, batch*heads). ``WARP_SPECIALIZE=False``: one warpgroup (4 warps) of 64
    rows that refills its own ring. ``True``: 128 rows, two consumer warpgroups (the default
    partition and a 4-warp worker with ``CONSUMER_REGS`` registers) and a producer warp."""
    pid, bh = launch_order(
        gl.program_id(0), gl.program_id(1), gl.num_programs(0), gl.num_programs(1), FIRST
    )
    idx_ptr, total, n_plain = _kv_list(
        KV_INDEX, KV_COUNT, KV_FULL, s_ib, s_ih, s_iq, s_cb, s_ch, s_cq, H, pid, bh, SPARSE,
        BLOCK_M, BLOCK_N, TILE_TOKENS,
    )  # fmt: skip
    WARPGROUPS: gl.constexpr = BLOCK_M // 64
    q_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8,
                                                  rank=2)  # fmt: skip
    SLOTS: gl.constexpr = STAGES * (2 if PAIRS else 1)  # PAIRS: a stage is a pair of blocks
    k_smem = gl.allocate_shared_memory(gl.float8e4nv, [SLOTS, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.float8e4nv, [SLOTS, HEAD_DIM, BLOCK_N], v_desc.layout)
    q_smem = gl.allocate_shared_memory(gl.float8e4nv, [WARPGROUPS, 64, HEAD_DIM], q_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=WARPGROUPS)  # each consumer warpgroup arrives once

    ptrs = (QC, QS, KS, VAMAX, KV_BIAS, SLOT_SRC, OUT)
    dims = (qk_scale, H, N, N_TILES, TEXT_START, TEXT, GRID_H, GRID_W, TILES_H, TILES_W, TILE_T,
            TILE_H, TILE_W, s_ob, s_oh, s_on)  # fmt: skip
    ring = (k_desc, v_desc, k_smem, v_smem, q_smem, ready, empty)
    work = (pid, bh, idx_ptr, total, n_plain, N_PAD)
    if WARP_SPECIALIZE:
        gl.warp_specialize([
            (_warpgroup_rows, (0, ptrs, dims, ring, work, SPARSE, HEAD_DIM, BLOCK_M, BLOCK_N,
                               TILE_TOKENS, STAGES, False, PAIRS)),
            (_warpgroup_rows, (1, ptrs, dims, ring, work, SPARSE, HEAD_DIM, BLOCK_M, BLOCK_N,
                               TILE_TOKENS, STAGES, False, PAIRS)),
            (_produce, (ring, work, HEAD_DIM, BLOCK_N, TILE_TOKENS, STAGES, PAIRS)),
        ], [4, 1], [CONSUMER_REGS, 24])  # fmt: skip
    else:
        for s in gl.static_range(STAGES):
            _issue_load(k_desc, v_desc, k_smem, v_smem, ready, idx_ptr, s, total, bh, N_PAD,
                        HEAD_DIM, BLOCK_N, TILE_TOKENS, STAGES)  # fmt: skip
        _warpgroup_rows(0, ptrs, dims, ring, work, SPARSE, HEAD_DIM, BLOCK_M, BLOCK_N,
                        TILE_TOKENS, STAGES, True, False)  # fmt: skip
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))
        mbarrier.invalidate(empty.index(s))


def launch(
    prep: Prepared,
    grid: tuple[int, int],
    rest: tuple[object, ...],
    *,
    block_m: int,
    block_n: int,
    num_stages: int,
    warp_specialize: bool = False,
    options: Mapping[str, Any] | None = None,
) -> None:
    """Run `_gl_attn_kernel` on a `Prepared` (fp8 modes). ``grid`` and ``rest`` (the kv lists,
    output, sizes and strides) are `prepare.launch_args`'s, as for `_attn_kernel`.
    ``warp_specialize``: the 128-row, two-warpgroup kernel with a producer warp; with
    ``block_n=256`` it takes two 128-key TMA blocks per softmax step (`_pair_loop`), and a
    stage is such a pair. ``options``: further launch keywords (`knobs.launch_options`)."""
    assert prep.q_scale is not None and prep.k_scale is not None and prep.v_amax is not None
    pairs = warp_specialize and block_n == 256
    tma_block = 128 if pairs else block_n
    k_desc, v_desc = descriptors(prep.k, prep.v, block_n=tma_block)
    _gl_attn_kernel[grid](
        prep.q, k_desc, v_desc, prep.q_scale, prep.k_scale, prep.v_amax, *rest,
        SPARSE=prep.q_tile_major, HEAD_DIM=prep.shape[3], BLOCK_M=block_m, BLOCK_N=tma_block,
        TILE_TOKENS=prep.layout.tile_tokens, STAGES=num_stages, WARP_SPECIALIZE=warp_specialize,
        PAIRS=pairs, CONSUMER_REGS=CONSUMER_REGS, num_warps=4,
        **{**(WS_LAUNCH if warp_specialize else {}), **(options or {})},
    )  # fmt: skip


def descriptors(
    k: torch.Tensor, v: torch.Tensor, *, block_n: int
) -> tuple[TensorDescriptor, TensorDescriptor]:
    """TMA descriptors of the pre-pass's K (B*H, N_PAD, D) and channel-major V (B*H, D, N_PAD)."""
    bh, n_pad, d = k.shape
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    k2, v2 = k.view(bh * n_pad, d), v.view(bh * d, n_pad)
    return (
        TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [block_n, d], layout),
        TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [d, block_n], layout),
    )
