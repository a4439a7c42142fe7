"""Benchmark fpstune's attention op against torch SDPA (cuDNN and flash backends) on one GPU.

Times the whole op as production calls it, `fpstune.kernels.attention` (pre-pass, block-index
building and attention kernel), at the Wan2.1 attention shapes, next to SDPA's cuDNN and flash
backends in the same process, and prints dense-equivalent TFLOP/s (4·B·H·N²·D / time) and the
speed-up over cuDNN. The cuDNN row of each shape is measured first and again last: the gap between
the two is the noise floor. A sweep section times kernel configs and tiles for the fp8 modes at
1x12x75600x128, and an accuracy section checks FlashAttention's rule at full size on sampled rows.

    python benchmarks/kernel_bench.py --out bench.json            # everything (~3 min on an H100)
    python benchmarks/kernel_bench.py --shapes 720p --no-sweep --out quick.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

DEVICE = "cuda"  # a CPU dry run of the accuracy section sets "cpu" (with TRITON_INTERPRET=1)
SHAPES: dict[str, tuple[int, int, tuple[int, int, int], int]] = {
    # name: (batch, heads, grid, head_dim)
    "480p": (1, 12, (21, 30, 52), 128),
    "720p": (1, 12, (21, 45, 80), 128),
    "720p-14b": (1, 40, (21, 45, 80), 128),
}


@dataclass
class Timing:
    name: str
    shape: str
    median_ms: float
    p25_ms: float
    p75_ms: float
    reps: int
    tflops: float = 0.0
    speedup_vs_cudnn: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


HOST_MS: dict[int, float] = {}  # id(times list) -> host (Python) time per call, ms


def time_op(fn: Callable[[], object], *, budget_s: float, min_reps: int = 5) -> list[float]:
    """Per-call GPU times (ms) from CUDA events around each call, calls issued back to back
    (one synchronisation at the end, as triton.testing.do_bench does): the host runs ahead as
    it does inside a model, and only host time the GPU cannot hide shows up. Two warm-up calls
    first (the first compiles). The host time per call is kept in HOST_MS."""
    fn()
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est_ms = (time.perf_counter() - t0) * 1e3
    reps = max(min_reps, min(100, int(budget_s * 1e3 / max(est_ms, 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    host = []
    for i in range(reps):
        starts[i].record()
        h0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - h0) * 1e3)
        ends[i].record()
    torch.cuda.synchronize()
    times = [a.elapsed_time(b) for a, b in zip(starts, ends, strict=True)]
    HOST_MS[id(times)] = statistics.median(host)
    return times


def summarise(name: str, shape: str, times: list[float], flops: float, **extra: Any) -> Timing:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    med = statistics.median(times)
    extra.setdefault("host_ms", HOST_MS.get(id(times)))
    return Timing(name, shape, med, q[0], q[2], len(times), flops / med / 1e9, extra=extra)


def random_qkv(
    shape: tuple[int, int, int, int], *, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh bf16 q, k, v of ``shape`` (B, H, N, D) on the GPU, N(0, 1), from ``seed``."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return tuple(  # type: ignore[return-value]
        torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, generator=gen) for _ in range(3)
    )


def set_vs_cudnn(rows: list[dict[str, Any]]) -> None:
    """Each row's speed-up over the mean of the run's ``sdpa_cudnn`` rows (first and last)."""
    ref = statistics.mean(r["median_ms"] for r in rows if r["op"].startswith("sdpa_cudnn"))
    for r in rows:
        r["vs_cudnn"] = ref / r["median_ms"]


def sdpa(backend: Any) -> Callable[..., torch.Tensor]:
    from torch.nn.attention import sdpa_kernel

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def shape_args(ap: argparse.ArgumentParser) -> None:
    """The options the per-shape benchmarks share: --shapes, --budget-s, --out."""
    ap.add_argument("--shapes", nargs="+", default=["720p", "720p-14b"], choices=list(SHAPES))
    ap.add_argument("--budget-s", type=float, default=3.0, help="timing budget per op")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")


def environment() -> dict[str, Any]:
    import triton

    props = torch.cuda.get_device_properties(0)
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
    except Exception:
        driver = "unknown"
    try:
        from importlib.metadata import version

        fpstune_version = version("fpstune")
    except Exception:
        fpstune_version = "unknown"
    return {
        "gpu": props.name,
        "sm_count": props.multi_processor_count,
        "capability": list(torch.cuda.get_device_capability()),
        "driver": str(driver),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "fpstune": fpstune_version,
        "python": platform.python_version(),
        "timing": "CUDA events around each call, calls back to back (one sync at the end), "
        "2 warm-up calls, reps = clamp(budget/est, 5, 100), median and quartiles",
    }


def spec_of(mode: str, sparsity: float = 0.0, pattern: str | None = None, **kw: Any) -> Any:
    from fpstune.kernels import AttentionSpec

    d: dict[str, Any] = {"mode": mode, **kw}
    if pattern is not None:
        d.update(sparsity=sparsity, pattern={"kind": pattern})
    return AttentionSpec.from_dict(d)


def bench_shape(name: str, budget_s: float, modes: list[tuple[str, Any]]) -> list[Timing]:
    from torch.nn.attention import SDPBackend

    from fpstune.kernels import attention

    b, h, grid, d = SHAPES[name]
    n = math.prod(grid)
    flops = 4.0 * b * h * n * n * d
    q, k, v = random_qkv((b, h, n, d), seed=0)
    rows: list[Timing] = []

    def add(label: str, fn: Callable[[], object], **extra: Any) -> None:
        t = summarise(label, name, time_op(fn, budget_s=budget_s), flops, **extra)
        rows.append(t)
        host = t.extra["host_ms"]
        print(
            f"  {name:9s} {label:31s} {t.median_ms:9.3f} ms  {t.tflops:7.1f} TFLOP/s"
            f"  (host {host:.3f} ms/call)",
            flush=True,
        )

    cudnn, flash = sdpa(SDPBackend.CUDNN_ATTENTION), sdpa(SDPBackend.FLASH_ATTENTION)
    add("sdpa_cudnn", lambda: cudnn(q, k, v))
    add("sdpa_flash", lambda: flash(q, k, v))
    for label, spec in modes:
        add(label, partial(attention, q, k, v, grid=grid, spec=spec), spec=spec.to_dict())
    add("sdpa_cudnn (again)", lambda: cudnn(q, k, v))
    ref = statistics.mean(r.median_ms for r in rows if r.name.startswith("sdpa_cudnn"))
    for r in rows:
        r.speedup_vs_cudnn = ref / r.median_ms
    return rows


def main_modes(quick: bool, shape: str = "") -> list[tuple[str, Any]]:
    modes = [
        ("bf16_dense (attention)", spec_of("bf16_dense")),
        ("fp8_dense", spec_of("fp8_dense")),
    ]
    for s in (0.5, 0.75, 0.9):
        modes.append((f"fp8_sparse window {s:.0%}", spec_of("fp8_sparse", s, "window")))
    modes.append(("fp8_sparse topk 90%", spec_of("fp8_sparse", 0.9, "topk")))
    if not quick:
        modes.append(("bf16_sparse window 90%", spec_of("bf16_sparse", 0.9, "window")))
    if shape.startswith("720p"):
        # (1, 8, 16) pads 45 -> 48 like the default (1, 16, 8) but has half as many partial
        # (masked) tiles.
        t = (1, 8, 16)
        modes.append(("fp8_dense t=1x8x16", spec_of("fp8_dense", tile=t)))
        modes.append(
            ("fp8_sparse window 90% t=1x8x16", spec_of("fp8_sparse", 0.9, "window", tile=t))
        )
    return modes


def sweep(budget_s: float) -> list[Timing]:
    """Kernel configs and tiles at 1x12x75600x128 (the whole op, pre-pass included), then where
    the time goes for the default configs: pre-pass + index building vs the attention kernel."""
    from fpstune.kernels import KernelConfig, attention, default_config, default_tile, infeasibility
    from fpstune.kernels.tiling import TileLayout
    from fpstune.kernels.triton_attention import attend, prepare

    b, h, grid, d = SHAPES["720p"]
    n = math.prod(grid)
    flops = 4.0 * b * h * n * n * d
    q, k, v = random_qkv((b, h, n, d), seed=1)
    t168, t1816 = (1, 16, 8), (1, 8, 16)
    fp8_points = [
        (t168, (128, 128, 8, 3)),  # the first default
        (t168, (64, 128, 4, 3)),  # the second
        (t168, (64, 128, 4, 5)),  # the default now
        (t168, (64, 64, 4, 5)),
        (t1816, (64, 128, 4, 5)),
        ((1, 8, 8), (64, 64, 4, 5)),
    ]
    bf16_points = [
        (t168, (128, 64, 8, 3)),  # the first default
        (t168, (128, 128, 8, 2)),
        (t168, (128, 128, 8, 3)),  # the default now
    ]
    cases: list[tuple[str, tuple[str, float, str | None, tuple[int, int, int], Any]]] = []
    for mode, sp, pat, points in (
        ("fp8_dense", 0.0, None, fp8_points),
        ("fp8_sparse", 0.9, "window", fp8_points),
        ("bf16_sparse", 0.9, "window", bf16_points),
    ):
        for tile, (bm, bn, w, st) in points:
            kc = KernelConfig(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
            label = f"{mode} {sp:.0%} t={'x'.join(map(str, tile))} {bm}x{bn} w{w} s{st}"
            cases.append((label, (mode, sp, pat, tile, kc)))
    rows: list[Timing] = []
    for label, (mode, sp, pat, tile, kc) in cases:
        spec = spec_of(mode, sp, pat, tile=tile, kernel=kc.model_dump())
        why = infeasibility(kc, tile=tile, head_dim=d, mode=spec.mode)
        if why:
            print(f"  sweep {label}: infeasible: {why}")
            continue
        try:
            times = time_op(partial(attention, q, k, v, grid=grid, spec=spec), budget_s=budget_s)
        except Exception as e:  # a config the compiler rejects is a result, not a crash
            print(f"  sweep {label}: failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        t = summarise(label, "720p", times, flops, spec=spec.to_dict())
        rows.append(t)
        print(f"  sweep {label:44s} {t.median_ms:9.3f} ms {t.tflops:7.1f} TFLOP/s", flush=True)

    tile = default_tile(grid)
    layout = TileLayout(grid, tile)
    for mode, sp, pat in (
        ("fp8_dense", 0.0, None),
        ("fp8_sparse", 0.9, "window"),
        ("fp8_sparse", 0.9, "topk"),
        ("bf16_sparse", 0.9, "window"),
    ):
        spec = spec_of(mode, sp, pat, tile=tile)
        kc = default_config(tile, d, spec.mode)
        prep = prepare(q, k, v, layout=layout, spec=spec)
        tp = time_op(partial(prepare, q, k, v, layout=layout, spec=spec), budget_s=budget_s)
        # The same pre-pass with the blocks given: the difference is the index building.
        blocks = prep.blocks
        tb = time_op(
            partial(prepare, q, k, v, layout=layout, spec=spec, blocks=blocks), budget_s=budget_s
        )
        ta = time_op(
            partial(attend, prep, **kc.model_dump(), scale=d**-0.5, out_dtype=q.dtype),
            budget_s=budget_s,
        )
        label = f"parts {mode} {sp:.0%} {pat or ''}"
        pre, pre_b = statistics.median(tp), statistics.median(tb)
        t = summarise(label, "720p", ta, flops, prepass_ms=pre, prepass_given_blocks_ms=pre_b)
        rows.append(t)
        print(
            f"  {label:34s} prepare {pre:7.3f} ms (blocks given {pre_b:6.3f}, host "
            f"{HOST_MS[id(tp)]:.3f})  kernel {t.median_ms:8.3f} ms ({t.tflops:6.1f} TFLOP/s)",
            flush=True,
        )

    return rows


def host_check(budget_s: float) -> list[dict[str, Any]]:
    """Does the host wait for the GPU? Each piece of the op is issued right behind an 8192^3 bf16
    matmul (~1.5 ms of GPU work): a piece that synchronises shows a host time close to the GPU
    time of the pair, one that does not shows only its own launch cost."""
    from fpstune.kernels import attention, block_index, default_tile
    from fpstune.kernels.tiling import TileLayout
    from fpstune.kernels.triton_attention import (
        _ascending,
        _full_first,
        _ranked_blocks,
        _static,
        prepare,
    )

    b, h, grid, d = SHAPES["720p"]
    n = math.prod(grid)
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    q, k, v = (
        torch.randn(b, h, n, d, device=DEVICE, dtype=torch.bfloat16, generator=gen)
        for _ in range(3)
    )
    layout = TileLayout(grid, default_tile(grid))
    qp, kp = (torch.randn(b, h, layout.n_tiles, d, device=DEVICE, generator=gen) for _ in range(2))
    topk, window = spec_of("fp8_sparse", 0.9, "topk"), spec_of("fp8_sparse", 0.9, "window")
    assert topk.pattern is not None
    pat = topk.pattern
    ranked = _ranked_blocks(pat, 0.9, qp, kp)
    partial_tiles = _static(layout, q.device).partial
    filler = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    pieces: list[tuple[str, Callable[[], object]]] = [
        ("matmul alone", lambda: None),
        (
            "torch.topk (patterns.block_index)",
            lambda: block_index(layout, pat, 0.9, q_pooled=qp, k_pooled=kp),
        ),
        ("sort (_ranked_blocks)", lambda: _ranked_blocks(pat, 0.9, qp, kp)),
        ("_full_first", lambda: _full_first(ranked, partial_tiles)),
        ("_ascending", lambda: _ascending(ranked)),
        ("prepare window 90%", lambda: prepare(q, k, v, layout=layout, spec=window)),
        ("prepare topk 90%", lambda: prepare(q, k, v, layout=layout, spec=topk)),
        ("attention window 90%", lambda: attention(q, k, v, grid=grid, spec=window)),
        ("attention topk 90%", lambda: attention(q, k, v, grid=grid, spec=topk)),
    ]
    out = []

    def behind_matmul(fn: Callable[[], object]) -> tuple[torch.Tensor, object]:
        return filler @ filler, fn()

    for label, fn in pieces:
        times = time_op(partial(behind_matmul, fn), budget_s=budget_s)
        row = {"piece": label, "gpu_ms": statistics.median(times), "host_ms": HOST_MS[id(times)]}
        out.append(row)
        print(
            f"  host check {label:36s} GPU {row['gpu_ms']:7.3f} ms  host {row['host_ms']:7.3f} ms",
            flush=True,
        )
    return out


def accuracy_at_scale(
    rows_per_head: int = 256, knobs: tuple[dict[str, Any], ...] = ({},)
) -> list[dict[str, Any]]:
    """FlashAttention's rule at 1x12x75600x128 on sampled query rows: error of the Triton output
    and of the fp32 emulation of the same fp8 semantics, both against fp64 unquantised attention
    with the same block mask; once per ``knobs`` (softmax knobs set on the default kernel config,
    e.g. ``{"exp2": "f16x2"}``)."""
    from fpstune.kernels import default_config, default_tile
    from fpstune.kernels.reference import (
        P_SCALE,
        channel_scales,
        fake_quant_channels,
        fake_quant_tiles,
        fp8_round,
        tile_scales,
    )
    from fpstune.kernels.tiling import TileLayout
    from fpstune.kernels.triton_attention import attend, prepare, wgmma_keys

    b, h, grid, d = SHAPES["720p"]
    tile = default_tile(grid)
    layout = TileLayout(grid, tile)
    n = layout.tokens
    scale = d**-0.5
    out_rows = []
    for kind in ("random", "structured"):
        gen = torch.Generator(device=DEVICE).manual_seed(7)
        if kind == "random":
            q, k, v = (torch.randn(b, h, n, d, device=DEVICE, generator=gen) for _ in range(3))
        else:
            pos = torch.stack(
                torch.meshgrid(
                    *(torch.arange(g, device=DEVICE, dtype=torch.float32) for g in grid),
                    indexing="ij",
                ),
                -1,
            ).reshape(n, 3)
            freqs = torch.randn(b, h, 3, d // 2, device=DEVICE, generator=gen) / 4.0
            ph = pos @ freqs
            feat = math.sqrt(16.0 / math.sqrt(d)) * torch.cat((ph.cos(), ph.sin()), -1)
            q = feat + 0.3 * torch.randn(b, h, n, d, device=DEVICE, generator=gen)
            k = feat + 0.3 * torch.randn(b, h, n, d, device=DEVICE, generator=gen)
            v = torch.randn(b, h, n, d, device=DEVICE, generator=gen)
        q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
        rows = torch.randperm(n, device=DEVICE, generator=gen)[:rows_per_head]
        qt, kt, vt = (layout.to_tiles(x.float()) for x in (q, k, v))
        qd = layout.from_tiles(fake_quant_tiles(qt, tile_scales(qt, layout), layout))[:, :, rows]
        kd = fake_quant_tiles(kt, tile_scales(kt, layout), layout)
        vd = fake_quant_channels(vt, channel_scales(vt))
        valid = layout.valid(DEVICE)
        for mode, sp, pat in (("fp8_dense", 0.0, None), ("fp8_sparse", 0.9, "window")):
            spec = spec_of(mode, sp, pat, tile=tile)
            kc = default_config(tile, d, spec.mode)
            prep = prepare(q, k, v, layout=layout, spec=spec)
            keep = valid.view(1, 1, 1, -1).expand(b, h, len(rows), -1)
            if prep.blocks is not None:
                tmask = prep.blocks.dense_mask(layout.n_tiles).to(DEVICE)
                q_tile = layout.token_slot(DEVICE)[rows] // layout.tile_tokens
                tm = tmask[:, :, q_tile].repeat_interleave(layout.tile_tokens, -1)
                keep = keep & tm
            # fp64 truth on unquantised inputs, in padded tile-major key order.
            s64 = (q.double()[:, :, rows] @ kt.double().transpose(-1, -2)) * scale
            truth = torch.softmax(s64.masked_fill(~keep, float("-inf")), -1) @ vt.double()
            # fp32 emulation of the fp8 semantics (reference.py's arithmetic, on these rows).
            s = ((qd @ kd.transpose(-1, -2)) * scale).masked_fill(~keep, float("-inf"))
            p = torch.exp(s - s.amax(-1, keepdim=True))
            emu = ((fp8_round(p * P_SCALE) / P_SCALE) @ vd / p.sum(-1, keepdim=True)).to(
                torch.bfloat16
            )
            e_ref = (emu.double() - truth).abs()
            for knob in knobs:
                cfg = type(kc).model_validate({**kc.model_dump(), **knob})
                res: dict[str, Any] = {"kind": kind, "mode": mode, "sparsity": sp}
                res["config"] = cfg.key
                res["ref_max"], res["ref_mean"] = e_ref.max().item(), e_ref.mean().item()
                out = torch.full_like(q, float("nan"))  # poisoned: every element is written
                if wgmma_keys(cfg.impl) != wgmma_keys(prep.impl):  # V's key order differs
                    prep = prepare(q, k, v, layout=layout, spec=spec, impl=cfg.impl)
                attend(prep, **cfg.model_dump(), scale=scale, out_dtype=q.dtype, out=out)
                e = (out[:, :, rows].double() - truth).abs()
                res["triton_max"], res["triton_mean"] = e.max().item(), e.mean().item()
                res["ratio_max"] = res["triton_max"] / res["ref_max"]
                res["ratio_mean"] = res["triton_mean"] / res["ref_mean"]
                out_rows.append(res)
                print("  accuracy", json.dumps(res), flush=True)
        del q, k, v, qt, kt, vt, kd, vd
        torch.cuda.empty_cache()
    return out_rows


def table(rows: list[Timing]) -> str:
    head = ("shape", "op", "median ms", "IQR ms", "TFLOP/s", "vs cuDNN")
    lines = ["{:9s} {:31s} {:>10s} {:>15s} {:>8s} {:>8s}".format(*head)]
    for r in rows:
        lines.append(
            f"{r.shape:9s} {r.name:31s} {r.median_ms:10.3f} {r.p25_ms:7.2f}-{r.p75_ms:<7.2f} "
            f"{r.tflops:8.1f} {r.speedup_vs_cudnn:7.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="path of the JSON results file")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per row")
    ap.add_argument("--no-sweep", action="store_true", help="skip the config / tile sweep")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the full-size accuracy check")
    ap.add_argument("--no-host-check", action="store_true", help="skip the host-sync check")
    ap.add_argument("--quick", action="store_true", help="fewer modes")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.time()
    result: dict[str, Any] = {"environment": environment(), "command": " ".join(sys.argv)}
    print(json.dumps(result["environment"]), flush=True)

    def save() -> None:
        result["wall_s"] = time.time() - t0
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    main_rows: list[Timing] = []
    for name in args.shapes:
        try:
            main_rows += bench_shape(name, args.budget, main_modes(args.quick, name))
        except Exception as e:  # keep what was measured; say what broke
            result.setdefault("errors", []).append(f"{name}: {type(e).__name__}: {e}")
            print(f"  {name}: FAILED {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
        result["main"] = [asdict(r) for r in main_rows]
        save()
    sections: list[tuple[str, bool, Callable[[], Any]]] = [
        ("host_check", args.no_host_check, lambda: host_check(args.budget * 0.5)),
        ("accuracy", args.no_accuracy, accuracy_at_scale),
        ("sweep", args.no_sweep, lambda: [asdict(r) for r in sweep(args.budget * 0.6)]),
    ]
    for key, skip, run in sections:
        if skip:
            continue
        try:
            result[key] = run()
        except Exception as e:
            result.setdefault("errors", []).append(f"{key}: {type(e).__name__}: {e}")
            print(f"  {key}: FAILED {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
        save()
    print()
    print(table(main_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
