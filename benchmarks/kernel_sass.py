"""Compile the attention kernel offline for sm_90a (no GPU) and count its SASS: registers, shared
memory, and the instruction mix of the kv loop, per variant. This is what docs/kernel_notes.md's
"offline SASS" figures come from; it costs no device time.

    python benchmarks/kernel_sass.py                         # the default fp8 config's variants
    python benchmarks/kernel_sass.py --variants e16 --sparse # the sparse kernel, packed exp2

A variant is ``base`` (the default config) or ``e16`` (``KernelConfig.exp2 = "f16x2"``). MUFU
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

KNOBS = {"e16": "EXP16"}
OPS = ("QGMMA", "MUFU.EX2", "MUFU.EX2.F16", "HADD2", "FADD", "FMUL", "FFMA", "FMNMX", "F2FP",
       "SHFL", "BAR")  # fmt: skip


def compile_variant(knobs: set[str], *, block_m: int, block_n: int, warps: int, stages: int,
                    sparse: bool, tile_tokens: int, maxnreg: int | None = None,
                    ) -> tuple[str, dict[str, int]]:  # fmt: skip
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fpstune.kernels.triton_attention import _attn_kernel

    ptr = {n: "*fp8e4nv" for n in ("QC", "KC", "VC")}
    ptr |= {n: "*fp32" for n in ("QS", "KS", "KV_BIAS")}
    ptr |= {n: "*i32" for n in ("VAMAX", "KV_INDEX", "KV_COUNT", "KV_FULL", "SLOT_SRC")}
    ptr |= {"OUT": "*bf16", "qk_scale": "fp32"}
    consts = {
        "FP8": True, "SPARSE": sparse, "HEAD_DIM": 128, "BLOCK_M": block_m, "BLOCK_N": block_n,
        "TILE_TOKENS": tile_tokens, "EXACT": False,
        **{v: k in knobs for k, v in KNOBS.items()},
    }  # fmt: skip
    sig = {
        name: ptr.get(name, "constexpr" if name in consts else "i32")
        for name in _attn_kernel.arg_names
    }
    # What the launcher's specialisation sees at 720p: 16-byte aligned pointers, and the token
    # counts and output strides multiples of 16.
    aligned = [n for n, t in sig.items() if t.startswith("*")]
    aligned += ["N", "N_PAD", "s_ob", "s_oh", "s_on"]
    attrs = {(_attn_kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(_attn_kernel, sig, constexprs=consts, attrs=attrs)
    options: dict[str, int] = {"num_warps": warps, "num_stages": stages}
    if maxnreg:
        options["maxnreg"] = maxnreg
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
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


def loop_mix(sass: str) -> collections.Counter[str]:
    """Instruction counts of the first loop (the kv loop over full tiles; the masked loop over
    the padded tiles follows it)."""
    lines = [ln for ln in sass.splitlines() if _ADDR.match(ln)]
    addr = [int(_ADDR.match(ln).group(1), 16) for ln in lines]  # type: ignore[union-attr]
    loops = []
    for a, ln in zip(addr, lines, strict=True):
        target = re.search(r"BRA\b.*?0x([0-9a-f]+)", ln)
        if target and int(target.group(1), 16) < a:
            loops.append((int(target.group(1), 16), a))
    first = min(loops, default=(0, -1))
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
        f"{'variant':10s} {'regs':>4s} {'smem':>6s} {'loop':>5s} "
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
        mix = loop_mix(sass)
        print(
            f"{v:10s} {meta['regs']:4d} {meta['local']:5d} {meta['smem']:6d} "
            f"{sum(mix.values()):5d} " + " ".join(f"{mix.get(o, 0):5d}" for o in OPS)
        )


if __name__ == "__main__":
    main()
