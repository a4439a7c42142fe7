"""Compile the attention kernel offline for sm_90a (no GPU) and count its SASS: registers, shared
memory, and the instruction mix of the kv loop, per variant. This is what docs/kernel_notes.md's
"offline SASS" figures come from; it costs no device time.

    python benchmarks/kernel_sass.py                         # the default fp8 config's variants
    python benchmarks/kernel_sass.py --variants e16 --sparse # the sparse kernel, packed exp2
    python benchmarks/kernel_sass.py --variants gluon --stages 3  # the Gluon kernel (v9)
    python benchmarks/kernel_sass.py --variants gluon_ws --stages 4  # its warp-specialised form
    python benchmarks/kernel_sass.py --variants gluon_ws --block 128x256 --stages 2  # 256-key steps

A variant is ``base`` (the default config), ``e16`` (``KernelConfig.exp2 = "f16x2"``),
``gluon`` or ``gluon_ws`` (``KernelConfig.impl``; ``--stages`` applies, the block is fixed
except gluon_ws's ``--block 128x256``, two 128-key blocks per softmax step; gluon_ws's loop is
counted in one consumer warpgroup, without the ping-pong turns). MUFU
ops are counted by their full opcode (``MUFU.EX2`` vs ``MUFU.EX2.F16``), the rest by their stem.
Uses the installed triton's bundled ptxas/cuobjdump (the device runs triton 3.6: install that
version in a side directory and put it first on PYTHONPATH to see what the GPU compiles).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

# gluon: `gluon_attention`'s kernel, 64x128 on 4 warps; gluon_ws: its warp-specialised form,
# 128x128 on two consumer warpgroups and a producer warp
KNOBS = {"e16": "EXP16", "gluon": "", "gluon_ws": ""}
OPS = ("QGMMA", "MUFU.EX2", "MUFU.EX2.F16", "HADD2", "FADD", "FMUL", "FFMA", "FMNMX", "F2FP",
       "SHFL", "BAR")  # fmt: skip


def compile_variant(knobs: set[str], *, block_m: int, block_n: int, warps: int, stages: int,
                    sparse: bool, tile_tokens: int, maxnreg: int | None = None,
                    ) -> tuple[str, dict[str, int]]:  # fmt: skip
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fpstune.kernels.triton_attention import _attn_kernel

    if knobs & {"gluon", "gluon_ws"}:
        ws = "gluon_ws" in knobs
        gl_src, gl_options = _gluon_source(
            stages=stages, sparse=sparse, tile_tokens=tile_tokens, ws=ws,
            pairs=ws and block_n == 256,
        )  # fmt: skip
        return _compiled(
            triton.compile(gl_src, target=GPUTarget("cuda", 90, 32), options=gl_options)
        )
    ptr = {n: "*fp8e4nv" for n in ("QC", "KC", "VC")}
    ptr |= {n: "*fp32" for n in ("QS", "KS", "KV_BIAS")}
    ptr |= {n: "*i32" for n in ("VAMAX", "KV_INDEX", "KV_COUNT", "KV_FULL", "SLOT_SRC")}
    ptr |= {"OUT": "*bf16", "qk_scale": "fp32"}
    consts = {
        "FP8": True, "SPARSE": sparse, "HEAD_DIM": 128, "BLOCK_M": block_m, "BLOCK_N": block_n,
        "TILE_TOKENS": tile_tokens, "EXACT": False,
        **{v: k in knobs for k, v in KNOBS.items() if v},
    }  # fmt: skip
    sig, attrs = _specialised(_attn_kernel, ptr, consts)
    src = ASTSource(_attn_kernel, sig, constexprs=consts, attrs=attrs)
    options: dict[str, int] = {"num_warps": warps, "num_stages": stages}
    if maxnreg:
        options["maxnreg"] = maxnreg
    return _compiled(triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options))


def _gluon_source(
    *, stages: int, sparse: bool, tile_tokens: int, ws: bool, pairs: bool = False
) -> tuple[Any, dict[str, int]]:
    """`gluon_attention._gl_attn_kernel` as the launcher specialises it (64x128 on 4 warps, or
    with ``ws`` 128x128 warp-specialised); its K/V descriptors' types come from descriptors
    over CPU tensors of the 720p shape."""
    import torch
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from fpstune.kernels.gluon_attention import (
        CONSUMER_REGS,
        WS_LAUNCH,
        _gl_attn_kernel,
        descriptors,
    )

    fn = _gl_attn_kernel
    k = torch.empty(12, 80640, 128, dtype=torch.float8_e4m3fn)
    k_desc, v_desc = descriptors(k, k.view(12, 128, 80640), block_n=128)
    types = {n: "*fp32" for n in ("QS", "KS", "KV_BIAS")}
    types |= {n: "*i32" for n in ("VAMAX", "KV_INDEX", "KV_COUNT", "KV_FULL", "SLOT_SRC")}
    types |= {"QC": "*fp8e4nv", "OUT": "*bf16", "qk_scale": "fp32"}
    types |= {"k_desc": mangle_type(k_desc), "v_desc": mangle_type(v_desc)}
    consts = {"SPARSE": sparse, "HEAD_DIM": 128, "BLOCK_M": 128 if ws else 64, "BLOCK_N": 128,
              "TILE_TOKENS": tile_tokens, "STAGES": stages, "WARP_SPECIALIZE": ws,
              "PINGPONG": False, "PAIRS": pairs, "CONSUMER_REGS": CONSUMER_REGS}  # fmt: skip
    sig, attrs = _specialised(fn, types, consts)
    options = {"num_warps": 4, **(WS_LAUNCH if ws else {})}
    return GluonASTSource(fn, sig, constexprs=consts, attrs=attrs), options


def _specialised(
    fn: Any, types: dict[str, str], consts: dict[str, Any]
) -> tuple[dict[str, str], dict[tuple[int], list[list[Any]]]]:
    """``fn``'s signature (``types``, constexprs, i32 for the rest) and what the launcher's
    specialisation sees at 720p: 16-byte aligned pointers, token counts and output strides
    multiples of 16."""
    sig = {n: types.get(n, "constexpr" if n in consts else "i32") for n in fn.arg_names}
    aligned = [n for n, t in sig.items() if t.startswith("*")]
    aligned += ["N", "N_PAD", "s_ob", "s_oh", "s_on"]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return sig, attrs


def _compiled(kernel: Any) -> tuple[str, dict[str, int]]:
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

        def dump(flag: str) -> str:
            cmd = [str(bin_dir / "cuobjdump"), flag, str(cubin)]
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

        sass, usage = dump("-sass"), dump("-res-usage")

    def usage_of(key: str) -> int:
        m = re.search(rf"{key}:(\d+)", usage)
        return int(m.group(1)) if m else -1

    meta = {"regs": usage_of("REG"), "local": usage_of("LOCAL"), "smem": kernel.metadata.shared}
    return sass, meta


def loop_mix(sass: str, gluon: bool = False) -> collections.Counter[str]:
    """Instruction counts of the first loop (the kv loop over full tiles; the masked loop over
    the padded tiles follows it). Gluon: of the loops holding a wgmma, the one densest in
    exponentials (its mbarrier waits retry through backward branches that span the program or
    its tail), its masked branches counted too."""
    lines = [ln for ln in sass.splitlines() if _ADDR.match(ln)]
    addr = [int(_ADDR.match(ln).group(1), 16) for ln in lines]  # type: ignore[union-attr]
    loops = []
    for a, ln in zip(addr, lines, strict=True):
        target = re.search(r"BRA\b.*?0x([0-9a-f]+)", ln)
        if target and int(target.group(1), 16) < a:
            loops.append((int(target.group(1), 16), a))
    first = min(loops, default=(0, -1))
    if gluon:
        wgmma = [a for a, ln in zip(addr, lines, strict=True) if "QGMMA" in ln]
        mufu = [a for a, ln in zip(addr, lines, strict=True) if "MUFU.EX2 " in ln]

        def density(lp: tuple[int, int]) -> float:  # exponentials per byte of loop
            return sum(lp[0] <= a <= lp[1] for a in mufu) / (lp[1] - lp[0] + 16)

        holding = [lp for lp in loops if any(lp[0] <= a <= lp[1] for a in wgmma)]
        first = max(holding, key=density, default=(0, -1))
    mix: collections.Counter[str] = collections.Counter()
    for a, ln in zip(addr, lines, strict=True):
        if first[0] <= a <= first[1]:
            op = _ADDR.sub("", ln).split()
            op = op[1:] if op[0].startswith("@") else op  # predicate
            mix[op[0] if op[0].startswith("MUFU") else op[0].split(".")[0]] += 1
    return mix


_ADDR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["base", "e16"])
    ap.add_argument("--block", default="64x128", help="BLOCK_MxBLOCK_N (default 64x128)")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=5)
    ap.add_argument("--sparse", action="store_true", help="the sparse kernel (default dense)")
    ap.add_argument("--tile-tokens", type=int, default=128)
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap per thread (ptxas)")
    args = ap.parse_args()
    bm, bn = (int(x) for x in args.block.split("x"))
    print(
        f"{'variant':10s} {'regs':>4s} {'local':>5s} {'smem':>6s} {'loop':>5s} "
        + " ".join(f"{o:>5s}" for o in OPS)
    )
    for v in args.variants:
        knobs = set() if v == "base" else set(v.split(","))
        unknown = knobs - set(KNOBS)
        if unknown:
            raise SystemExit(
                f"--variants: unknown knob(s) {sorted(unknown)}; known: {sorted(KNOBS)}"
            )
        sass, meta = compile_variant(
            knobs, block_m=bm, block_n=bn, warps=args.warps, stages=args.stages,
            sparse=args.sparse, tile_tokens=args.tile_tokens, maxnreg=args.maxnreg,
        )  # fmt: skip
        mix = loop_mix(sass, gluon=bool(knobs & {"gluon", "gluon_ws"}))
        print(
            f"{v:10s} {meta['regs']:4d} {meta['local']:5d} {meta['smem']:6d} "
            f"{sum(mix.values()):5d} " + " ".join(f"{mix.get(o, 0):5d}" for o in OPS)
        )


if __name__ == "__main__":
    main()
