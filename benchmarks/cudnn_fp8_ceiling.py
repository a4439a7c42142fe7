"""cuDNN's own FP8 attention on the same GPU: how far above SDPA's cuDNN BF16 does NVIDIA's FP8
forward get at the issue-7 shapes? A reference for the fp8_dense >= 1.6x target, measured in
the same process as the BF16 baseline and fpstune's kernel.

cuDNN's FP8 SDPA (``graph.sdpa_fp8`` of the cuDNN frontend, per-tensor scales, e4m3 in and
out, as Transformer Engine uses it) does the same arithmetic per score as fpstune's fp8_dense
(QK and P·V on the fp8 tensor cores, P quantised to e4m3) with coarser scales and no padded
keys. fpstune's fp8_dense (gluon_ws 128x256, kernel alone, and its pre-pass) runs in the same
process. The frontend is not a dependency of fpstune: give the GPU host its wheel
(``nvidia-cudnn-frontend``, it loads the cuDNN that PyTorch ships).

    python benchmarks/cudnn_fp8_ceiling.py --out ceiling.json     # ~1 min on an H100/H200
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_bench import SHAPES, environment, random_qkv, sdpa, shape_args, spec_of, time_op

E4M3_MAX = 448.0


def fp8_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_amax: float
) -> tuple[Callable[[], None], Callable[[], torch.Tensor]]:
    """A cuDNN FP8 SDPA graph over e4m3 copies of bf16 (B, H, N, D) ``q, k, v`` (per-tensor
    scales, amax -> 448); returns the call to time and one that dequantises the output.
    ``out_amax`` sets the output's scale (the BF16 reference's largest magnitude)."""
    import cudnn

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

    def output() -> torch.Tensor:
        run()
        return o8.float() / o_scale

    return run, output


def fpstune_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int],
                  ) -> tuple[Callable[[], object], Callable[[], None]]:  # fmt: skip
    """fpstune's fp8_dense as shipped in the kernel space's fastest config on Hopper (gluon_ws,
    128x256, 2 stages, tile (1, 8, 16)): its pre-pass, and its kernel alone on one pre-pass."""
    from gluon_schedule import CONFIG, TILE, VARIANTS, launcher

    from fpstune.kernels.tiling import TileLayout
    from fpstune.kernels.triton_attention import launch_args, prepare

    spec = spec_of("fp8_dense", 0.0, None, tile=TILE, kernel=CONFIG)
    prep_fn = partial(prepare, q, k, v, layout=TileLayout(grid, TILE), spec=spec, impl="gluon_ws")
    prep = prep_fn()
    out = torch.full_like(q, float("nan"))
    lgrid, rest = launch_args(prep, block_m=CONFIG["block_m"], scale=q.shape[-1] ** -0.5, out=out)
    return prep_fn, launcher(prep, lgrid, rest, VARIANTS["256-key s2"])


def run_shape(name: str, budget_s: float, ours: bool) -> list[dict[str, Any]]:
    """cuDNN BF16, cuDNN FP8 (and fpstune's fp8_dense), cuDNN BF16 again at one `SHAPES`
    entry (kernel alone, ms)."""
    from torch.nn.attention import SDPBackend

    b, h, grid, d = SHAPES[name]
    n = math.prod(grid)
    q, k, v = random_qkv((b, h, n, d), seed=0)
    bf16 = partial(sdpa(SDPBackend.CUDNN_ATTENTION), q, k, v)
    ref = bf16().float()
    run, output = fp8_sdpa(q, k, v, ref.abs().amax().item())
    err = ((output() - ref).norm() / ref.norm()).item()
    flop = 4 * b * h * n * n * d
    rows: list[dict[str, Any]] = []
    ops: list[tuple[str, Callable[[], object]]] = [("sdpa_cudnn bf16", bf16), ("cudnn fp8", run)]
    if ours:
        prep_fn, kernel = fpstune_dense(q, k, v, grid)
        ops += [("fpstune prepare", prep_fn), ("fpstune fp8_dense", kernel)]
    ops.append(("sdpa_cudnn bf16", bf16))
    for label, fn in ops:
        ms = statistics.median(time_op(fn, budget_s=budget_s))
        row = {"shape": name, "op": label, "median_ms": ms}
        if label != "fpstune prepare":  # attention: dense TFLOP/s
            row["tflops"] = flop / ms / 1e9
        rows.append(row)
        rate = f" {row['tflops']:6.0f} TFLOP/s" if "tflops" in row else ""
        print(f"  {name:9s} {label:17s} {ms:9.3f} ms{rate}", flush=True)
    base = statistics.mean((rows[0]["median_ms"], rows[-1]["median_ms"]))
    for r in rows:
        r["vs_cudnn_bf16"] = base / r["median_ms"]
    rows[1]["rel_l2_err"] = err
    for r in rows[1:-1]:
        print(f"  {name:9s} {r['op']:18s} {r['vs_cudnn_bf16']:6.2f}x cuDNN BF16", flush=True)
    print(f"  {name:9s} cudnn fp8's relative L2 error against BF16: {err:.3e}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    shape_args(ap)
    ap.add_argument("--no-fpstune", action="store_true", help="cuDNN only (no fpstune install)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: cudnn_fp8_ceiling needs a CUDA GPU")
    rows = [r for name in args.shapes for r in run_shape(name, args.budget_s, not args.no_fpstune)]
    if args.out:
        args.out.write_text(json.dumps({"env": environment(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
