"""Kernel vs peers: fpstune's attention op against the other attention kernels on one GPU, at
the video models' self-attention shapes (`fpstune.latency.bench.SHAPES`), all in one process.
HunyuanVideo's and CogVideoX's calls hold the prompt's text tokens too (`bench.TEXT`): every
row attends over the same joint sequence, fpstune's with ``attention(..., text=)`` (video
queries keep every text key and their video tiles; text queries attend densely).

Per shape, in this order:
- ``sdpa_cudnn``: torch SDPA's cuDNN backend, BF16 (the baseline), measured first and again last:
  the gap between the two is the run's noise floor; ratios are against their mean;
- ``sdpa_flash``: torch SDPA's flash backend, BF16;
- ``flash_attn3`` / ``flash_attn2``: FlashAttention's own package where it is installed
  (``flash_attn_interface``, ``flash_attn``), BF16;
- ``cudnn_fp8``: cuDNN's FP8 attention where the cuDNN frontend is installed
  (``nvidia-cudnn-frontend``; ``graph.sdpa_fp8``, per-tensor scales, e4m3 in and out, as
  Transformer Engine uses it): NVIDIA's own FP8 forward, the ceiling to compare fp8_dense with;
- fpstune's modes, the whole op as production calls it (`fpstune.kernels.attention`: pre-pass,
  block-index building, kernel); with ``--kernel-alone`` also the attention kernel alone on one
  pre-pass (``[kernel]`` rows). The fp8 rows run the runtime's default config (the Triton
  kernel), or each config ``--kernel`` names: ``gluon_ws`` is the warp-specialised Gluon kernel
  (128x256, 2 stages, Hopper), ``--kernel default gluon_ws`` measures both in one process.

Each row: median and IQR (`fpstune.latency.bench.time_calls`: calls back to back, CUDA events),
host ms per call, dense-equivalent TFLOP/s (4·B·H·N²·D / time, sparse rows too) and the speed-up
over cuDNN BF16. Inputs are bf16 ``randn``. Accuracy is the GPU tests' job
(``pytest -m gpu tests/kernels``). Writes benchmarks/results/<date>-<gpu>-kernel_bench.json.

    python3 -m benchmarks.kernel_bench                                  # all shapes, ~3 min
    python3 -m benchmarks.kernel_bench --shapes 720p 720p-14b --kernel default gluon_ws \\
        --kernel-alone --quick                                          # the H200 table
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from fpstune.latency.bench import (
    KERNELS,
    SHAPES,
    TEXT,
    TIME_CALLS_METHOD,
    environment,
    flops,
    result_args,
    time_calls,
    write_result,
)

E4M3_MAX = 448.0
SPARSITIES = (0.5, 0.75, 0.9)


def spec_of(mode: str, sparsity: float = 0.0, pattern: str | None = None, **kw: Any) -> Any:
    from fpstune.kernels import AttentionSpec

    d: dict[str, Any] = {"mode": mode, **kw}
    if pattern is not None:
        d.update(sparsity=sparsity, pattern={"kind": pattern})
    return AttentionSpec.from_dict(d)


def modes(grid: tuple[int, int, int], kernels: list[str], quick: bool) -> list[tuple[str, Any]]:
    """(label, spec) of fpstune's rows; the fp8 ones once per kernel config in ``kernels``."""
    from fpstune.kernels import default_tile

    def fp8(kernel: str, label: str, *args: Any) -> tuple[str, Any]:
        config = KERNELS[kernel]
        if config is None:
            return label, spec_of(*args)
        return f"{label} {kernel}", spec_of(*args, tile=default_tile(grid), kernel=config)

    rows = [("bf16_dense (SDPA)", spec_of("bf16_dense"))]
    for kernel in kernels:
        rows.append(fp8(kernel, "fp8_dense", "fp8_dense"))
        for s in SPARSITIES:
            rows.append(fp8(kernel, f"fp8_sparse window {s:.0%}", "fp8_sparse", s, "window"))
        if not quick:
            rows.append(fp8(kernel, "fp8_sparse topk 90%", "fp8_sparse", 0.9, "topk"))
    if not quick:
        rows.append(("bf16_sparse window 90%", spec_of("bf16_sparse", 0.9, "window")))
    return rows


def sdpa(backend: Any) -> Callable[..., torch.Tensor]:
    from torch.nn.attention import sdpa_kernel

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def flash_attn_peer(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[str, Callable[[], object]] | None:
    """FlashAttention's own package, FA3 first, on (B, N, H, D) copies; None if not installed."""
    try:
        from flash_attn_interface import flash_attn_func  # type: ignore[import-not-found]

        name = "flash_attn3"
    except Exception:  # not installed, or built for another torch / CUDA
        try:
            from flash_attn import flash_attn_func  # type: ignore[import-not-found,no-redef]

            name = "flash_attn2"
        except Exception:
            return None
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    return name, partial(flash_attn_func, qt, kt, vt)


def cudnn_fp8_peer(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_amax: float
) -> Callable[[], None] | None:
    """A cuDNN FP8 SDPA graph over e4m3 copies of bf16 (B, H, N, D) ``q, k, v`` (per-tensor
    scales, amax -> 448; ``out_amax`` sets the output's scale); None without the frontend."""
    try:
        import cudnn  # type: ignore[import-not-found]
    except Exception:  # not installed, or its libraries do not load
        return None
    dev = q.device

    def quantised(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = x.abs().amax().float() / E4M3_MAX
        codes = (x.float() / scale).to(torch.float8_e4m3fn)
        return codes, scale.reshape(1, 1, 1, 1)

    (q8, sq), (k8, sk), (v8, sv) = quantised(q), quantised(k), quantised(v)
    scalar = {"dim": [1, 1, 1, 1], "stride": [1, 1, 1, 1]}
    s_scale = torch.full((1, 1, 1, 1), E4M3_MAX, device=dev)  # P in [0, 1] -> P * 448
    o_scale = torch.full((1, 1, 1, 1), E4M3_MAX / out_amax, device=dev)
    values = {"dq": sq, "dk": sk, "dv": sv, "ds": 1.0 / s_scale, "ss": s_scale, "so": o_scale}
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(dev).cuda_stream)
    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32,
                          compute_data_type=fp32, handle=handle)  # fmt: skip
    shape, stride = list(q8.shape), list(q8.stride())
    tq, tk, tv = (graph.tensor(name=n, dim=shape, stride=stride, data_type=e4m3) for n in "qkv")
    scales = {n: graph.tensor(name=n, data_type=fp32, **scalar) for n in values}
    o, _stats, amax_s, amax_o = graph.sdpa_fp8(
        q=tq, k=tk, v=tv, descale_q=scales["dq"], descale_k=scales["dk"],
        descale_v=scales["dv"], descale_s=scales["ds"], scale_s=scales["ss"],
        scale_o=scales["so"], is_inference=True, attn_scale=1.0 / math.sqrt(shape[-1]),
        use_causal_mask=False, name="sdpa_fp8",
    )  # fmt: skip
    o.set_output(True).set_dim(shape).set_stride(stride).set_data_type(e4m3)
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_data_type(fp32).set_dim(scalar["dim"])
        amax.set_stride(scalar["stride"])
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    o8 = torch.empty_like(q8)
    amaxes = torch.empty(2, 1, 1, 1, 1, device=dev)
    pack = {tq: q8, tk: k8, tv: v8, o: o8, amax_s: amaxes[0], amax_o: amaxes[1]}
    pack |= {scales[n]: t for n, t in values.items()}
    workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=dev)

    def run() -> None:
        graph.execute(pack, workspace, handle=handle)

    return run


def kernel_alone(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    spec: Any,
    text: tuple[int, bool] = (0, False),
) -> Callable[[], object]:
    """The attention kernel on one pre-pass of ``q, k, v`` (the op's pre-pass and block index
    left out), with the config the op would run."""
    from fpstune.kernels import default_config, default_tile
    from fpstune.kernels.dispatch import attend
    from fpstune.kernels.prepare import prepare
    from fpstune.kernels.tiling import TileLayout

    tile = spec.tile or default_tile(grid)
    config = spec.kernel or default_config(tile, q.shape[-1], spec.mode)
    layout = TileLayout(grid, tile, *text)
    prep = prepare(q, k, v, layout=layout, spec=spec, impl=config.impl)
    out = torch.empty_like(q)
    launch = {f: getattr(config, f) for f in ("block_m", "block_n", "num_warps", "num_stages")}
    return partial(
        attend, prep, **launch, impl=config.impl, knobs=config.knobs, scale=q.shape[-1] ** -0.5,
        out_dtype=q.dtype, out=out,
    )  # fmt: skip


def bench_shape(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from torch.nn.attention import SDPBackend

    from fpstune.kernels import attention

    b, h, grid, d = SHAPES[name]
    text = TEXT.get(name, (0, False))
    n = math.prod(grid) + text[0]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(3)
    )
    rows: list[dict[str, Any]] = []

    def add(label: str, make: Callable[[], Callable[[], object] | None], **extra: Any) -> None:
        try:
            fn = make()
            if fn is None:
                return
            timing, host = time_calls(fn, budget_s=args.budget)
        except Exception as e:  # a peer or config that fails is a result, not a crash
            rows.append({"shape": name, "op": label, "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"  {name:9s} {label:36s} FAILED {type(e).__name__}: {e}"[:200], flush=True)
            return
        row = {"shape": name, "op": label, **timing.to_dict(), "host_ms": host, **extra}
        row["tflops"] = flops(name) / timing.median_ms / 1e9
        rows.append(row)
        print(f"  {name:9s} {label:36s} {timing.median_ms:9.3f} ms {row['tflops']:7.1f} "
              f"TFLOP/s  (host {host:.3f} ms/call)", flush=True)  # fmt: skip

    cudnn, flash = sdpa(SDPBackend.CUDNN_ATTENTION), sdpa(SDPBackend.FLASH_ATTENTION)
    add("sdpa_cudnn", lambda: partial(cudnn, q, k, v))
    add("sdpa_flash", lambda: partial(flash, q, k, v))
    fa = flash_attn_peer(q, k, v)
    if fa is not None:
        add(fa[0], lambda: fa[1])
    if "cudnn_fp8" not in args.skip:
        amax = cudnn(q, k, v).abs().amax().item()
        add("cudnn_fp8", lambda: cudnn_fp8_peer(q, k, v, amax))
    call = partial(attention, q, k, v, grid=grid, text=text[0], text_first=text[1])
    for label, spec in modes(grid, args.kernel, args.quick):
        add(label, lambda s=spec: partial(call, spec=s), spec=spec.to_dict())
        if args.kernel_alone and spec.mode.value != "bf16_dense":
            add(f"{label} [kernel]", lambda s=spec: kernel_alone(q, k, v, grid, s, text),
                spec=spec.to_dict())  # fmt: skip
    add("sdpa_cudnn (again)", lambda: partial(cudnn, q, k, v))
    ref = statistics.mean(
        r["median_ms"] for r in rows if r["op"].startswith("sdpa_cudnn") and "median_ms" in r
    )
    for r in rows:
        if "median_ms" in r:
            r["vs_cudnn"] = ref / r["median_ms"]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["{:9s} {:40s} {:>10s} {:>9s} {:>8s} {:>9s}".format(
        "shape", "op", "median ms", "IQR ms", "TFLOP/s", "vs cuDNN")]  # fmt: skip
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"{r['shape']:9s} {r['op']:40s} {r['error'][:40]}")
            continue
        lines.append(
            f"{r['shape']:9s} {r['op']:40s} {r['median_ms']:10.3f} {r['iqr_ms']:9.3f} "
            f"{r['tflops']:8.1f} {r['vs_cudnn']:8.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python3 -m benchmarks.kernel_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--shapes", nargs="+", default=["480p", "720p", "720p-14b"],
                    choices=list(SHAPES), help="default: the Wan2.1 shapes")  # fmt: skip
    ap.add_argument("--kernel", nargs="+", choices=list(KERNELS), default=["default"],
                    help="fp8 kernel configs: one set of fp8 rows each")  # fmt: skip
    ap.add_argument("--kernel-alone", action="store_true",
                    help="also time the attention kernel alone on one pre-pass")  # fmt: skip
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per row")
    ap.add_argument("--quick", action="store_true", help="leave out topk and bf16_sparse")
    ap.add_argument("--skip", nargs="*", default=[], choices=["cudnn_fp8"],
                    help="peers to leave out")  # fmt: skip
    result_args(ap)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    env = environment()
    print(env, flush=True)
    payload: dict[str, Any] = {"timing": TIME_CALLS_METHOD, "kernel": args.kernel, "rows": []}
    path = None
    for name in args.shapes:
        payload["rows"] += bench_shape(name, args)
        torch.cuda.empty_cache()
        path = write_result("kernel_bench", payload, out=args.out, folder=args.results, env=env)
    print()
    print(table(payload["rows"]))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
