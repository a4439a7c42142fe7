"""End-to-end speed on the Wan2.1 architecture: diffusers' ``WanTransformer3DModel`` at
the Wan2.1-1.3B and -14B configs with random weights (latency does not depend on weight values),
one transformer forward (batch 1: a CFG step is two) at 480p and 720p.

Per model and resolution, in one process on one GPU:
- ``sdpa``: the model as diffusers runs it, every attention on SDPA's cuDNN backend;
- ``no self-attn``: fpstune's processor with the self-attention call returning v (everything
  but the attention kernel: projections, norms, RoPE as diffusers applies it, cross-attention,
  FFN): the rest of a step;
- one row per attention spec (fp8_dense, fp8_sparse window at each sparsity): every self-
  attention layer on that spec, through fpstune's processor.
The attention share is (sdpa - rest) / sdpa. The Amdahl bound of a spec is the step's speed-up
if only its attention calls got faster, by the op's own speed-up over cuDNN measured here on one
layer's q, k, v: sdpa / (rest + (sdpa - rest) / s_attn). "of bound" = speed-up / bound. With
``--rope fused`` (the default) the spec rows no longer pay diffusers' separate RoPE pass, which
the rest includes, so a step can pass its bound by that much; ``--rope unfused`` keeps it.

With ``--policy FILE`` (a policy YAML, e.g. `fpstune export` of a mini-e2e study) a whole 50-step
generation is costed at 1.3B-720p: the policy's (layer, step) cells are mapped onto the target
model's as the study costed them (`latency.target`: the proxy's layer and step at the same
fraction; tile and kernel config the runtime's defaults at the target grid); every distinct
per-step assignment of specs to layers is measured as one forward; the generation is the sum
over the 50 steps (x2 for CFG), against 50 x 2 SDPA forwards, with its Amdahl bound.

    python3 -m benchmarks.e2e_bench                                   # all four (~4 min H100)
    python3 -m benchmarks.e2e_bench --models 1.3b --res 720p --policy policy.yaml
    python3 -m benchmarks.e2e_bench --models 1.3b --res 720p --kernel gluon_ws

Writes benchmarks/results/<date>-<gpu>-e2e_bench.json (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fpstune.kernels import AttentionSpec, attention
from fpstune.latency.bench import (
    KERNELS,
    environment,
    result_args,
    time_calls,
    wall_ms,
    write_result,
)

CONFIGS = {
    "tiny": {"num_attention_heads": 2, "ffn_dim": 64, "num_layers": 2},  # CPU smoke runs
    "1.3b": {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "14b": {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
}
COMMON = {
    "patch_size": (1, 2, 2), "attention_head_dim": 128, "in_channels": 16, "out_channels": 16,
    "text_dim": 4096, "freq_dim": 256, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}  # fmt: skip
#: latent (frames, height, width) of an 81-frame video (VAE: /4 in time, /8 in space)
LATENTS = {"480p": (21, 60, 104), "720p": (21, 90, 160), "tiny": (2, 8, 8)}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TEXT_TOKENS = 512
SPARSITIES = (0.5, 0.75, 0.9)


def with_kernel(spec: AttentionSpec, grid: tuple[int, int, int], kernel: str) -> AttentionSpec:
    """``spec`` with --kernel's config on its fp8 modes (tile: the runtime's default there)."""
    from fpstune.kernels import default_tile

    config = KERNELS[kernel]
    if config is None or not spec.mode.fp8:
        return spec
    return AttentionSpec.from_dict({**spec.to_dict(), "tile": default_tile(grid), "kernel": config})


class _Fixed:
    """A policy stand-in: one spec for every (layer, step)."""

    def __init__(self, spec: AttentionSpec) -> None:
        self._spec = spec

    def spec(self, *, layer: int, step: int) -> AttentionSpec:
        return self._spec


class _ByLayer:
    """A policy stand-in: one spec per layer (one step's assignment)."""

    def __init__(self, specs: tuple[AttentionSpec, ...]) -> None:
        self._specs = specs

    def spec(self, *, layer: int, step: int) -> AttentionSpec:
        return self._specs[layer]


class _NoAttention:
    """Router stand-in whose self-attention returns v: times everything else."""

    grid: tuple[int, int, int] | None = None
    step = 0

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            rope: object = None) -> torch.Tensor:  # fmt: skip
        return v


def build(model: str, device: torch.device) -> Any:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # 14B in fp32 would not fit beside its bf16 copy
        try:
            m = WanTransformer3DModel(**COMMON, **CONFIGS[model])
        finally:
            torch.set_default_dtype(prev)
    m.eval().requires_grad_(False)  # type: ignore[attr-defined]
    return m


timed = wall_ms  # a whole forward: synchronised wall time per call


@functools.cache
def attention_speedup(grid: tuple[int, int, int], heads: int, spec: AttentionSpec) -> float:
    """cuDNN SDPA time / fpstune op time on one layer's q, k, v (random, bf16); measured once
    per (grid, heads, spec) in a run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n = math.prod(grid)
    q, k, v = (torch.randn(1, heads, n, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    backends = [SDPBackend.CUDNN_ATTENTION if DEVICE.type == "cuda" else SDPBackend.MATH]

    def cudnn() -> object:
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v)

    ours = functools.partial(attention, q, k, v, grid=grid, spec=spec)
    return op_ms(cudnn) / op_ms(ours)


def op_ms(fn: Callable[[], object]) -> float:
    """Median time per call of one layer's attention. On the GPU, calls are issued back to back
    (`fpstune.latency.bench.time_calls`) as inside a forward, where the host runs ahead:
    synchronising after each call put fpstune's host time (pre-pass and index launches) on the
    clock, and at 480p made the bound 10 % lower than the step speed-up it bounds (H200 run,
    2026-12-03)."""
    if DEVICE.type != "cuda":
        return statistics.median(timed(fn, 5))
    return time_calls(fn, budget_s=0.5)[0].median_ms


def run_model(
    model: str,
    res: str,
    reps: int,
    policy_file: Path | None,
    kernel: str = "default",
    fuse_rope: bool = True,
) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fpstune.models.processor import install, patch_grid
    from fpstune.models.router import AttentionRouter

    device = DEVICE
    m = build(model, device)
    f, h, w = LATENTS[res]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, 16, f, h, w, device=device, dtype=torch.bfloat16, generator=gen)
    text = torch.randn(1, TEXT_TOKENS, 4096, device=device, dtype=torch.bfloat16, generator=gen)
    t = torch.tensor([500.0], device=device)
    grid = patch_grid(m, x)
    heads = CONFIGS[model]["num_attention_heads"]

    backends = [SDPBackend.CUDNN_ATTENTION if device.type == "cuda" else SDPBackend.MATH]

    def forward() -> object:
        with torch.no_grad(), sdpa_kernel(backends):
            return m(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)

    row: dict[str, Any] = {"model": model, "res": res, "grid": grid, "tokens": math.prod(grid)}
    print(f"== {model} {res}: grid {grid}, {math.prod(grid)} tokens", flush=True)
    sdpa_ms = statistics.median(timed(forward, reps))  # diffusers' own processors
    router = AttentionRouter(grid=grid)
    noattn = _NoAttention()
    noattn.grid = grid
    install(m, noattn, fuse_rope=False)  # type: ignore[arg-type]  # the rest keeps diffusers' RoPE
    rest_ms = statistics.median(timed(forward, reps))
    install(m, router, fuse_rope=fuse_rope)
    share = (sdpa_ms - rest_ms) / sdpa_ms
    row.update(sdpa_ms=sdpa_ms, rest_ms=rest_ms, attention_share=share, specs=[])
    print(f"  sdpa {sdpa_ms:9.1f} ms  rest {rest_ms:9.1f} ms  attention share {share:.1%}")
    specs = [AttentionSpec.from_dict({"mode": "fp8_dense"})] + [
        AttentionSpec.from_dict(
            {"mode": "fp8_sparse", "sparsity": s, "pattern": {"kind": "window"}}
        )
        for s in SPARSITIES
    ]
    specs = [with_kernel(s, grid, kernel) for s in specs]
    for spec in specs:
        router.policy = _Fixed(spec)
        ms = statistics.median(timed(forward, reps))
        s_attn = attention_speedup(grid, heads, spec)
        bound = sdpa_ms / (rest_ms + (sdpa_ms - rest_ms) / s_attn)
        r = {"spec": spec.describe(), "ms": ms, "speedup": sdpa_ms / ms, "attention_speedup":
             s_attn, "amdahl_bound": bound, "of_bound": (sdpa_ms / ms) / bound}  # fmt: skip
        row["specs"].append(r)
        print(
            f"  {r['spec']:34s} {ms:9.1f} ms  step {r['speedup']:5.2f}x  attention "
            f"{s_attn:5.2f}x  bound {bound:5.2f}x  of bound {r['of_bound']:.1%}",
            flush=True,
        )
    if policy_file is not None:
        row["generation"] = generation(policy_file, router, forward, reps, sdpa_ms, rest_ms,
                                       grid, heads, m, kernel)  # fmt: skip
    return row


def generation(
    policy_file: Path,
    router: Any,
    forward: Callable[[], object],
    reps: int,
    sdpa_ms: float,
    rest_ms: float,
    grid: tuple[int, int, int],
    heads: int,
    m: Any,
    kernel: str = "default",
) -> dict[str, Any]:
    """A whole 50-step generation under the policy, mapped onto this model as `latency.target`
    costs it: target (layer, step) takes the proxy's cell at the same fraction."""
    from fpstune.kernels.policy import Policy

    policy = Policy.load(policy_file, hardware=None)
    layers, steps = len(m.blocks), 50
    src = policy.model

    def at_target(spec: AttentionSpec) -> AttentionSpec:
        spec = AttentionSpec.from_dict({**spec.to_dict(), "tile": None, "kernel": None})
        return with_kernel(spec, grid, kernel)

    assignment = [
        tuple(
            at_target(policy.spec(layer=lay * src.layers // layers, step=s * src.steps // steps))
            for lay in range(layers)
        )
        for s in range(steps)
    ]
    measured: dict[tuple[AttentionSpec, ...], float] = {}
    for a in dict.fromkeys(assignment):
        router.policy = _ByLayer(a)
        measured[a] = statistics.median(timed(forward, reps))
    # one layer's attention time per spec, in units of SDPA's, for the bound
    attn_ms = {s: 1.0 / attention_speedup(grid, heads, s) for a in measured for s in a}
    total = 2 * sum(measured[a] for a in assignment)  # CFG: two forwards per step
    base = 2 * steps * sdpa_ms
    # Amdahl: the rest as measured, each layer's attention at its spec's measured speed-up.
    attn_layer_ms = (sdpa_ms - rest_ms) / layers
    bound_ms = 2 * sum(rest_ms + sum(attn_layer_ms * attn_ms[s] for s in a) for a in assignment)
    out = {
        "policy": str(policy_file), "steps": steps, "distinct_steps": len(measured),
        "generation_s": total / 1e3, "sdpa_generation_s": base / 1e3, "speedup": base / total,
        "amdahl_bound": base / bound_ms, "of_bound": bound_ms / total,
        "modes": {s.describe(): sum(x == s for a in assignment for x in a) for s in attn_ms},
    }  # fmt: skip
    print(
        f"  generation, 50 steps x CFG under {policy_file.name}: {total / 1e3:.1f} s vs SDPA "
        f"{base / 1e3:.1f} s: {out['speedup']:.2f}x (bound {out['amdahl_bound']:.2f}x, "
        f"{out['of_bound']:.1%} of it); {len(measured)} distinct steps",
        flush=True,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python3 -m benchmarks.e2e_bench",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    result_args(ap)
    ap.add_argument("--models", nargs="+", default=["1.3b", "14b"], choices=list(CONFIGS))
    ap.add_argument("--res", nargs="+", default=["480p", "720p"], choices=list(LATENTS))
    ap.add_argument("--reps", type=int, default=3, help="timed forwards per row (median)")
    ap.add_argument("--policy", type=Path, help="policy YAML: cost a 50-step 1.3B-720p generation")
    ap.add_argument("--kernel", choices=list(KERNELS), default="default",
                    help="fp8 kernel config of every fp8 spec: the runtime's default (Triton) or "
                    "the warp-specialised Gluon kernel, 128x256 s2 (Hopper)")  # fmt: skip
    ap.add_argument("--rope", choices=["fused", "unfused"], default="fused",
                    help="fpstune's processor hands RoPE to the kernels' pre-pass (fused, the "
                    "default) or rotates q and k first as diffusers does")  # fmt: skip
    args = ap.parse_args()
    rows = []
    for model in args.models:
        for res in args.res:
            use = args.policy if (model, res) == ("1.3b", "720p") else None
            rows.append(run_model(model, res, args.reps, use, args.kernel, args.rope == "fused"))
    path = write_result("e2e_bench", {"kernel": args.kernel, "rope": args.rope, "rows": rows},
                        out=args.out, folder=args.results, env=environment(DEVICE))  # fmt: skip
    head = ("model", "res", "share", "spec", "step", "bound", "of")
    print("\n{:5s} {:5s} {:>6s} {:34s} {:>6s} {:>6s} {:>6s}".format(*head))
    for r in rows:
        for s in r["specs"]:
            print(
                f"{r['model']:5s} {r['res']:5s} {r['attention_share']:6.1%} {s['spec']:34s} "
                f"{s['speedup']:5.2f}x {s['amdahl_bound']:5.2f}x {s['of_bound']:6.1%}"
            )
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
