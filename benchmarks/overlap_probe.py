"""Can one SM run the fp8 tensor cores and the MUFU at the same time? A Gluon micro-benchmark.

docs/kernel_notes.md (v12, v13): in the attention kernel the tensor pipe and the MUFU (``ex2``)
are each busy ~48 % of the time and never together, and neither schedule changes (ping-pong,
stagger, a third warpgroup) nor fewer exponentials moved that. This probe takes the attention
out: one CTA per SM with the kernel's partitions (two 4-warp warpgroups, one idle producer
warp, the same register split), where warpgroup 0 only issues wgmmas (the kernel's shapes:
64x128 by 128x128 fp8, four per step, operand A from shared memory like QK or from registers
like P·V) and warpgroup 1 only computes ``exp2(x·a + b)`` on a 64x256 fp32 tile (the
softmax's FFMA + MUFU per score) or, as the control, two FFMAs per element. Each side alone
is sized to ~1,024 clocks per step at the nominal peaks (8,192 fp8 FLOP and 16 ``ex2`` per
clock per SM). If both together take about as long as the longer alone, the SM overlaps them;
if as long as the two added, it does not.

    python benchmarks/overlap_probe.py --steps 4000 --out overlap.json   # on the GPU
    ncu --clock-control none --section WarpStateStats -k regex:_probe_kernel \
        python benchmarks/overlap_probe.py --cases ss/ffma --reps 1           # why it stalls
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

TENSOR = {"none": 0, "ss": 1, "rs": 2}  # wgmma operand A: none, shared memory, registers
VECTOR = {"none": 0, "exp": 1, "ffma": 2}  # per element: nothing, FFMA + ex2, two FFMAs
CASES = [  # (tensor, vector)
    ("none", "none"), ("ss", "none"), ("rs", "none"), ("none", "exp"), ("none", "ffma"),
    ("ss", "exp"), ("rs", "exp"), ("ss", "ffma"), ("rs", "ffma"),
]  # fmt: skip
# 64x128x128 products per step: 4 * 2 * 64 * 128 * 128 FLOP, 1,024 clocks at the fp8 peak
WGMMAS = gl.constexpr(4)


@gluon.jit
def _tensor_side(a_smem, b_smem, out_ptr, steps, MODE: gl.constexpr):
    """Warpgroup 0: ``WGMMAS`` chained 64x128x128 fp8 wgmmas per step, one wait per step."""
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32]
    )
    acc = gl.zeros([64, 128], gl.float32, o_layout)
    if MODE == 1:
        for _ in range(steps):
            tok = warpgroup_mma(a_smem, b_smem.index(0).permute((1, 0)), acc, is_async=True)
            for k in gl.static_range(1, WGMMAS):
                tok = warpgroup_mma(a_smem, b_smem.index(k).permute((1, 0)), tok, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[tok])
    elif MODE == 2:
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        a_reg = a_smem.load(a_layout)
        for _ in range(steps):
            tok = warpgroup_mma(a_reg, b_smem.index(0).permute((1, 0)), acc, is_async=True)
            for k in gl.static_range(1, WGMMAS):
                tok = warpgroup_mma(a_reg, b_smem.index(k).permute((1, 0)), tok, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[tok])
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, o_layout))
    gl.store(out_ptr + gl.program_id(0) * 128 + rows, gl.sum(acc, 1))


@gluon.jit
def _vector_side(out_ptr, steps, MODE: gl.constexpr):
    """Warpgroup 1: per step and element of a 64x256 fp32 tile (the kernel's score layout),
    ``exp2(x·a + b)`` (one FFMA, one MUFU.EX2) or two FFMAs; x stays in [0.5, 1]."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 32]
    )
    cols = gl.arange(0, 256, layout=gl.SliceLayout(0, s_layout))
    x = gl.zeros([64, 256], gl.float32, s_layout) + (cols * (1.0 / 512.0) + 0.5)[None, :]
    if MODE == 1:
        for _ in range(steps):
            x = gl.exp2(x * -0.75 - 0.25)
    elif MODE == 2:
        for _ in range(steps):
            x = (x * -0.75 + 1.25) * 0.5 + 0.25
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    gl.store(out_ptr + gl.program_id(0) * 128 + 64 + rows, gl.sum(x, 1))


@gluon.jit
def _idle():
    pass


@gluon.jit
def _stamp(ASM: gl.constexpr):
    """``%clock64`` or ``%globaltimer`` (ns) as read by each of the warpgroup's 128 threads."""
    one: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    x = gl.full([128], 0, gl.int32, one)
    return gl.inline_asm_elementwise(ASM, "=l,r", [x], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _stamps(clk_ptr, at: gl.constexpr):
    """Store the SM clock and the global timer at point ``at`` (0: start, 1: end) of this CTA."""
    one: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    offs = gl.program_id(0) * 512 + at * 256 + gl.arange(0, 128, layout=one)
    gl.store(clk_ptr + offs, _stamp("mov.u64 $0, %clock64;"))
    gl.store(clk_ptr + offs + 128, _stamp("mov.u64 $0, %globaltimer;"))


@gluon.jit
def _probe_kernel(a_ptr, b_ptr, out_ptr, clk_ptr, steps, T_MODE: gl.constexpr,
                  V_MODE: gl.constexpr):  # fmt: skip
    """One CTA: A (64x128) and four B blocks (128x128, K-major) of fp8 into shared memory, then
    the tensor side, the vector side and an idle producer warp as `gluon_attention`'s kernel
    partitions them."""
    smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    ld: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
    r = gl.arange(0, 128, layout=gl.SliceLayout(1, ld))
    c = gl.arange(0, 128, layout=gl.SliceLayout(0, ld))
    a_smem = gl.allocate_shared_memory(gl.float8e4nv, [64, 128], smem)
    b_smem = gl.allocate_shared_memory(gl.float8e4nv, [WGMMAS, 128, 128], smem)
    a_rows = gl.arange(0, 64, layout=gl.SliceLayout(1, ld))
    a_smem.store(gl.load(a_ptr + a_rows[:, None] * 128 + c[None, :]))
    for k in gl.static_range(WGMMAS):
        b_smem.index(k).store(gl.load(b_ptr + k * 128 * 128 + r[:, None] * 128 + c[None, :]))
    fence_async_shared()
    _stamps(clk_ptr, 0)
    gl.warp_specialize([
        (_tensor_side, (a_smem, b_smem, out_ptr, steps, T_MODE)),
        (_vector_side, (out_ptr, steps, V_MODE)),
        (_idle, ()),
    ], [4, 1], [240, 24])  # fmt: skip
    _stamps(clk_ptr, 1)


def run_case(tensor: str, vector: str, steps: int, reps: int) -> tuple[float, float]:
    """Median milliseconds of one launch over every SM (``reps`` timed after two warm-ups), and
    the SM clock (GHz) the CTAs of the last launch ran at (clock cycles over global-timer ns
    between the start and the end of the partitions, median over CTAs)."""
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    gen = torch.Generator(device=dev).manual_seed(0)
    a = (torch.rand(64, 128, generator=gen, device=dev) * 0.02).to(torch.float8_e4m3fn)
    b = (torch.rand(WGMMAS, 128, 128, generator=gen, device=dev) * 0.02).to(torch.float8_e4m3fn)
    out = torch.full((sms, 128), float("nan"), device=dev)
    clk = torch.zeros((sms, 2, 2, 128), dtype=torch.int64, device=dev)
    launch = (a, b, out, clk, steps)
    opts = {"T_MODE": TENSOR[tensor], "V_MODE": VECTOR[vector], "num_warps": 4, "maxnreg": 168}
    times = []
    for i in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _probe_kernel[(sms,)](*launch, **opts)
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end))
    if tensor != "none" and not torch.isfinite(out[:, :64]).all():
        raise SystemExit(f"{tensor}/{vector}: the tensor side's output is not finite")
    if vector != "none" and not torch.isfinite(out[:, 64:]).all():
        raise SystemExit(f"{tensor}/{vector}: the vector side's output is not finite")
    cycles = (clk[:, 1, 0, 0] - clk[:, 0, 0, 0]).double()
    ns = (clk[:, 1, 1, 0] - clk[:, 0, 1, 0]).double()
    return statistics.median(times), (cycles / ns).median().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000, help="steps per side (default 4000)")
    ap.add_argument("--reps", type=int, default=10, help="timed launches per case (default 10)")
    ap.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    names = [f"{t}/{v}" for t, v in CASES]
    ap.add_argument("--cases", nargs="+", choices=names, default=None,
                    help="launch only these (for a profiler; no table)")  # fmt: skip
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: overlap_probe needs a CUDA GPU (Hopper, sm_90)")
    props = torch.cuda.get_device_properties(0)
    if args.cases:
        for name in args.cases:
            tensor, vector = name.split("/")
            ms_one, ghz = run_case(tensor, vector, args.steps, args.reps)
            print(f"{name}: {ms_one:.3f} ms at {ghz:.3f} GHz")
        return
    runs = {f"{t}/{v}": run_case(t, v, args.steps, args.reps) for t, v in CASES}
    ms = {k: r[0] for k, r in runs.items()}
    base = ms["none/none"]
    rows = []
    for t, v in CASES:
        row = {"tensor": t, "vector": v, "ms": round(ms[f"{t}/{v}"], 4),
               "ghz": round(runs[f"{t}/{v}"][1], 3)}  # fmt: skip
        if t != "none" and v != "none":
            a, b = ms[f"{t}/none"] - base, ms[f"none/{v}"] - base
            both = ms[f"{t}/{v}"] - base
            row |= {"sum": round(a + b, 4), "max": round(max(a, b), 4),
                    "overlap": round((a + b - both) / min(a, b), 3)}  # fmt: skip
        rows.append(row)
    print(f"{props.name}, {props.multi_processor_count} SMs, {args.steps} steps, "
          f"torch {torch.__version__}")  # fmt: skip
    flop = WGMMAS.value * 2 * 64 * 128 * 128 * args.steps * props.multi_processor_count
    for t in ("ss", "rs"):
        print(f"tensor side alone ({t}): {flop / (ms[f'{t}/none'] - base) / 1e9:.0f} TFLOP/s")
    exps = 64 * 256 * args.steps * props.multi_processor_count
    print(f"vector side alone (exp): {exps / (ms['none/exp'] - base) / 1e9:.2f} T ex2/s")
    print(f"{'tensor':6s} {'vector':6s} {'ms':>8s} {'GHz':>6s} {'sum':>8s} {'max':>8s} "
          f"{'overlap':>7s}")  # fmt: skip
    for row in rows:
        extra = (f" {row['sum']:8.3f} {row['max']:8.3f} {row['overlap']:7.2f}"
                 if "sum" in row else "")  # fmt: skip
        print(f"{row['tensor']:6s} {row['vector']:6s} {row['ms']:8.3f} {row['ghz']:6.3f}{extra}")
    print("overlap: (alone + alone - together) / shorter alone; 1 = fully hidden, 0 = serial")
    if args.out:
        args.out.write_text(json.dumps({"gpu": props.name, "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
