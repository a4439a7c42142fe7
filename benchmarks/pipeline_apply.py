"""A whole diffusers `WanPipeline` generation with `fpstune.apply(pipe, policy)` against the same
pipeline on SDPA's cuDNN backend, in one process on one GPU: what a user's pipeline call gains.

The pipeline is diffusers' own (`WanPipeline.__call__`: its denoising loop, UniPC, CFG 5) around a
Wan2.1-1.3B-architecture transformer with random weights (latency does not depend on weight
values); prompts arrive as embeddings (no text encoder) and the output is the final latents (no
VAE decode), so both timings cover the 50-step denoising loop. The policy is a proxy's policy
(``--policy``, e.g. `fpstune export` of a mini-e2e study) mapped onto the model as
`latency.target` costs it (target layer and step take the proxy's cell at the same fraction;
tile and kernel config the runtime's defaults at the target grid, ``--kernel gluon_ws`` for the
Gluon kernel), written as a real `Policy` for this shape and GPU and installed with
`fpstune.apply`. With ``--checkpoint`` (a folder of `write_wan_checkpoint.py`, the one the
policy was tuned and exported for: `checkpoint_flow_gpu.sh`) the pipeline is that folder's, the
prompt is text through its text encoder, and the policy runs as exported.

Reported: both generation times, the speed-up, its Amdahl bound (the rest of a step measured
with self-attention returning v; each cell's attention at its spec's speed-up over cuDNN on one
layer's q, k, v, `e2e_bench.attention_speedup`), and the final latents' rel-L2 and PSNR against
the SDPA generation of the same seed.

    python3 -m benchmarks.pipeline_apply --policy docs/policies/mini-e2e-run6-25db.yaml \\
        --kernel gluon_ws

Writes benchmarks/results/<date>-<gpu>-pipeline_apply.json (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import fpstune
from benchmarks.e2e_bench import (
    CONFIGS,
    DEVICE,
    KERNELS,
    LATENTS,
    TEXT_TOKENS,
    _NoAttention,
    attention_speedup,
    build,
    timed,
    with_kernel,
)
from fpstune.kernels import AttentionSpec, Mode, Policy, PolicyEntry
from fpstune.kernels.fingerprint import current_fingerprint
from fpstune.kernels.policy import ModelShape
from fpstune.latency.bench import environment, result_args, write_result

STEPS = 50


def target_policy(proxy: Policy, shape: ModelShape, kernel: str) -> Policy:
    """``proxy``'s cells on ``shape``: layer l and step s take the proxy's cell at the same
    fraction (as `latency.target` costs it), one entry per run of equal cells in a step."""
    src = proxy.model
    entries = []
    for s in range(shape.steps):
        row = []
        for lay in range(shape.layers):
            spec = proxy.spec(
                layer=lay * src.layers // shape.layers, step=s * src.steps // shape.steps
            )
            spec = AttentionSpec.from_dict({**spec.to_dict(), "tile": None, "kernel": None})
            row.append(with_kernel(spec, tuple(shape.grid), kernel))
        start = 0
        for lay in range(1, shape.layers + 1):
            if lay == shape.layers or row[lay] != row[start]:
                entries.append(PolicyEntry(steps=(s, s + 1), layers=(start, lay), spec=row[start]))
                start = lay
    return Policy(
        model=shape,
        hardware=current_fingerprint(DEVICE),
        default=AttentionSpec(mode=Mode.BF16_DENSE),
        entries=entries,
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python3 -m benchmarks.pipeline_apply",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--policy", type=Path, required=True, help="the proxy's policy YAML")
    ap.add_argument(
        "--checkpoint", type=Path,
        help="a WanPipeline folder (write_wan_checkpoint.py): generate from its prompt text with "
        "--policy as it is (exported for this checkpoint), not mapped from a proxy",
    )  # fmt: skip
    ap.add_argument("--model", default="1.3b", choices=[m for m in CONFIGS if m != "tiny"])
    ap.add_argument("--res", default="480p", choices=list(LATENTS))
    ap.add_argument("--kernel", choices=list(KERNELS), default="default")
    result_args(ap)
    args = ap.parse_args()

    from diffusers import UniPCMultistepScheduler, WanPipeline
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fpstune.models.processor import install, patch_grid

    if args.checkpoint is not None:
        pipe = WanPipeline.from_pretrained(
            args.checkpoint, torch_dtype=torch.bfloat16, local_files_only=True
        ).to(DEVICE)
        m = pipe.transformer
        prompts: dict[str, Any] = {"prompt": "a cat runs on the beach", "negative_prompt": "blurry"}
    else:
        m = build(args.model, DEVICE)
        pipe = WanPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=None,
            transformer=m,
            scheduler=UniPCMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0
            ),
        )
    f, h, w = LATENTS[args.res]
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    embeds = [
        torch.randn(1, TEXT_TOKENS, 4096, device=DEVICE, dtype=torch.bfloat16, generator=gen)
        for _ in range(2)
    ]
    if args.checkpoint is None:
        prompts = {"prompt_embeds": embeds[0], "negative_prompt_embeds": embeds[1]}
    height, width, frames = h * 8, w * 8, (f - 1) * 4 + 1
    x = torch.zeros(1, 16, f, h, w, device=DEVICE)
    grid = patch_grid(m, x)
    cfg = CONFIGS[args.model]
    shape = ModelShape(
        name=f"wan2.1-{args.model}-{args.res}", heads=cfg["num_attention_heads"], head_dim=128,
        layers=cfg["num_layers"], grid=grid, steps=STEPS, cfg=2,
    )  # fmt: skip
    if args.checkpoint is not None:
        policy = Policy.load(args.policy)  # the shape and GPU checks a user's load does
        shape = policy.model
    else:
        policy = target_policy(Policy.load(args.policy, hardware=None), shape, args.kernel)
    # cuDNN first; the math backend only for what cuDNN cannot run (the text encoder's masked,
    # position-biased attention), never for the transformer's attention (cuDNN runs it)
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]

    def generate() -> torch.Tensor:
        with torch.no_grad(), sdpa_kernel(backends, set_priority=True):
            out = pipe(
                **prompts,
                height=height,
                width=width,
                num_frames=frames,
                num_inference_steps=STEPS,
                guidance_scale=5.0,
                generator=torch.Generator(device=DEVICE).manual_seed(0),
                output_type="latent",
            ).frames
        return out.float()

    def timed_generation() -> tuple[float, torch.Tensor]:
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = generate()
        torch.cuda.synchronize()
        return time.perf_counter() - t, out

    print(f"== {shape.name}: grid {grid}, {math.prod(grid)} tokens, {len(policy.entries)} "
          f"entries, kernel {args.kernel}", flush=True)  # fmt: skip
    fpstune.apply(pipe, policy)
    generate()  # warm-up: Triton compiles
    fp_s, fp_latents = timed_generation()
    fpstune.remove(pipe)
    generate()
    base_s, base_latents = timed_generation()
    print(f"  generation: fpstune.apply {fp_s:.1f} s, SDPA cuDNN {base_s:.1f} s: "
          f"{base_s / fp_s:.2f}x", flush=True)  # fmt: skip

    # Amdahl bound from one forward's parts (as e2e_bench): the rest, and each spec's speed-up.
    text = embeds[0]
    xb = torch.randn(1, 16, f, h, w, device=DEVICE, dtype=torch.bfloat16)
    t500 = torch.tensor([500.0], device=DEVICE)

    def forward() -> object:
        with torch.no_grad(), sdpa_kernel(backends, set_priority=True):
            return m(hidden_states=xb, timestep=t500, encoder_hidden_states=text, return_dict=False)

    sdpa_ms = statistics.median(timed(forward, 3))
    noattn = _NoAttention()
    noattn.grid = grid
    install(m, noattn, fuse_rope=False)  # type: ignore[arg-type]
    rest_ms = statistics.median(timed(forward, 3))
    attn_layer_ms = (sdpa_ms - rest_ms) / shape.layers
    table = policy.spec_table()
    bound_ms = 2 * sum(
        rest_ms
        + sum(
            attn_layer_ms
            / (1.0 if s.mode is Mode.BF16_DENSE else attention_speedup(grid, shape.heads, s))
            for s in row
        )
        for row in table
    )
    bound = 2 * STEPS * sdpa_ms / bound_ms
    diff = (fp_latents - base_latents).norm() / base_latents.norm()
    mse = (fp_latents - base_latents).square().mean()
    span = base_latents.max() - base_latents.min()
    psnr = 10 * math.log10(float(span**2 / mse))
    modes = {mode.value: sum(s.mode is mode for row in table for s in row) for mode in Mode}
    out = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": shape.name,
        "grid": grid, "kernel": args.kernel, "policy": str(args.policy), "cells": modes,
        "fpstune_s": fp_s, "sdpa_s": base_s, "speedup": base_s / fp_s, "amdahl_bound": bound,
        "of_bound": (base_s / fp_s) / bound, "forward_sdpa_ms": sdpa_ms, "forward_rest_ms": rest_ms,
        "latent_rel_l2": float(diff), "latent_psnr_db": psnr,
    }  # fmt: skip
    path = write_result("pipeline_apply", out, out=args.out, folder=args.results,
                        env=environment(DEVICE))  # fmt: skip
    print(f"\n{'model':22s} {'cells (bf16/fp8/fp8 sparse)':28s} {'fpstune':>8s} {'SDPA':>8s} "
          f"{'speed-up':>8s} {'bound':>6s} {'rel-L2':>7s} {'PSNR':>6s}")  # fmt: skip
    cells = f"{modes['bf16_dense']}/{modes['fp8_dense']}/{modes['fp8_sparse']}"
    print(f"{shape.name:22s} {cells:28s} {fp_s:7.1f}s {base_s:7.1f}s {base_s / fp_s:7.2f}x "
          f"{bound:5.2f}x {float(diff):7.4f} {psnr:5.1f}")  # fmt: skip
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
