"""One transformer forward ("step", batch 1) of HunyuanVideo, CogVideoX-5B and LTX-Video at their
published sizes with random bf16 weights (latency does not depend on weight values), against
SDPA's cuDNN backend, through each family's `fpstune.models.routing.Routing`:

- ``hunyuanvideo``: diffusers' default ``HunyuanVideoTransformer3DModel`` (13B), 720p x 129
  frames: grid 33 x 45 x 80, joint attention with 256 text tokens after the video;
- ``cogvideox-5b``: ``CogVideoXTransformer3DModel`` at CogVideoX-5B's config, 720 x 480 x 49
  frames: grid 13 x 30 x 45, joint attention with 226 text tokens before the video, rotary
  tables as ``CogVideoXPipeline`` builds them;
- ``ltx-video``: diffusers' default ``LTXVideoTransformer3DModel`` (2B), 768 x 512 x 121 frames:
  grid 16 x 16 x 24 (video-only self-attention, 128 text tokens by cross-attention).

Rows per model, in one process on one GPU (each model freed before the next):
- ``sdpa``: the model with diffusers' own processors, every attention on cuDNN;
- ``rest``: fpstune's processors with the self-attention call returning v (v holds the text
  tokens too where the call is joint): everything but the kernel, RoPE as diffusers applies it;
- one row per spec (fp8_dense, fp8_sparse window at 0.9): every routed layer on that spec
  through a real `AttentionRouter` and a `Policy` built for the model's shape (adapter
  ``shape``), RoPE handed to the kernels' pre-pass where the family allows it.
Attention share, Amdahl bound and "of bound" as in `benchmarks.e2e_bench`; the op's speed-up is
measured on one layer's joint q, k, v (text included, with the model's prompt mask) against
cuDNN on the same sequence.

    python3 -m benchmarks.model_step --models hunyuanvideo cogvideox-5b ltx-video --reps 3
    python3 -m benchmarks.model_step --models ltx-video --kernel gluon_ws
    python3 -m benchmarks.model_step --tiny --reps 1       # CPU smoke run: 2 layers, 2 heads

Writes benchmarks/results/<date>-<gpu>-model_step.json (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import statistics
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.e2e_bench import DEVICE, op_ms, with_kernel
from fpstune.kernels import AttentionSpec, Policy, attention, current_fingerprint, prompt_key_mask
from fpstune.latency.bench import KERNELS, environment, result_args, wall_ms, write_result
from fpstune.models import adapters
from fpstune.models.cogvideox import COGVIDEOX
from fpstune.models.hunyuan import HUNYUAN_VIDEO
from fpstune.models.ltx import LTX
from fpstune.models.routing import Routing, install

Kwargs = dict[str, Any]  # a transformer forward's keyword arguments
Inputs = Callable[[Any, tuple[int, int, int], int, int | None], Kwargs]
SPECS = (
    {"mode": "fp8_dense"},
    {"mode": "fp8_sparse", "sparsity": 0.9, "pattern": {"kind": "window"}},
)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=torch.bfloat16)


def hunyuan_inputs(m: Any, latents: tuple[int, int, int], text: int, prompt: int | None) -> Kwargs:
    """As ``HunyuanVideoPipeline`` calls the transformer (mask and guidance in bf16)."""
    c = m.config
    mask = torch.zeros(1, text, device=DEVICE, dtype=torch.bfloat16)
    mask[:, :prompt] = 1  # the prompt, then padding (None: all ones)
    return {
        "hidden_states": _randn(1, c.in_channels, *latents),
        "timestep": torch.tensor([500.0], device=DEVICE),  # the pipeline's fp32 latents' dtype
        "encoder_hidden_states": _randn(1, text, c.text_embed_dim),
        "encoder_attention_mask": mask,
        "pooled_projections": _randn(1, c.pooled_projection_dim),
        "guidance": torch.tensor([6.0 * 1000.0], device=DEVICE, dtype=torch.bfloat16),
    }


def cogvideox_inputs(m: Any, latents: tuple[int, int, int], text: int, _: int | None) -> Kwargs:
    """As ``CogVideoXPipeline`` calls the 1.0 transformer: frame-major latents, rotary tables
    from its ``_prepare_rotary_positional_embeddings`` (crop region of the base grid)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    c = m.config
    f, h, w = latents
    grid_hw = (h // c.patch_size, w // c.patch_size)
    crops = get_resize_crop_region_for_grid(
        grid_hw, c.sample_width // c.patch_size, c.sample_height // c.patch_size
    )
    rope = get_3d_rotary_pos_embed(
        embed_dim=c.attention_head_dim, crops_coords=crops, grid_size=grid_hw, temporal_size=f,
        device=DEVICE,
    )  # fmt: skip
    return {
        "hidden_states": _randn(1, f, c.in_channels, h, w),
        "encoder_hidden_states": _randn(1, text, c.text_embed_dim),
        "timestep": torch.tensor([500], device=DEVICE),
        "image_rotary_emb": rope,
    }


def ltx_inputs(m: Any, latents: tuple[int, int, int], text: int, _: int | None) -> Kwargs:
    """As ``LTXPipeline`` calls the transformer (packed latents, frame rate 25)."""
    c = m.config
    return {
        "hidden_states": _randn(1, math.prod(latents), c.in_channels),
        "encoder_hidden_states": _randn(1, text, c.caption_channels),
        "timestep": torch.tensor([500.0], device=DEVICE),
        "encoder_attention_mask": torch.ones(1, text, device=DEVICE, dtype=torch.bool),
        "num_frames": latents[0], "height": latents[1], "width": latents[2],
        "rope_interpolation_scale": (8 / 25, 32, 32),  # VAE time / frame rate, VAE space
    }  # fmt: skip


@dataclass(frozen=True)
class Model:
    cls: str  # the diffusers transformer class
    adapter: str
    routing: Routing
    inputs: Inputs
    video: tuple[int, int, int]  # (frames, height, width) in pixels
    text: int  # text tokens the transformer gets (joint calls: the policy's model.text)
    first: bool = False  # the text before the video in a joint call
    config: dict[str, Any] = field(default_factory=dict)
    tiny: dict[str, Any] = field(default_factory=dict)
    tiny_video: tuple[int, int, int] = (9, 64, 64)


MODELS = {
    "hunyuanvideo": Model(
        "HunyuanVideoTransformer3DModel", "hunyuanvideo", HUNYUAN_VIDEO, hunyuan_inputs,
        (129, 720, 1280), 256,
        tiny={"num_attention_heads": 2, "num_layers": 1, "num_single_layers": 1,
              "num_refiner_layers": 1, "text_embed_dim": 64, "pooled_projection_dim": 32},
    ),
    "cogvideox-5b": Model(
        "CogVideoXTransformer3DModel", "cogvideox", COGVIDEOX, cogvideox_inputs,
        (49, 480, 720), 226, first=True,
        config={"num_attention_heads": 48, "attention_head_dim": 64, "num_layers": 42,
                "in_channels": 16, "out_channels": 16, "text_embed_dim": 4096,
                "time_embed_dim": 512, "sample_width": 90, "sample_height": 60,
                "sample_frames": 49, "patch_size": 2, "max_text_seq_length": 226,
                "use_rotary_positional_embeddings": True, "norm_eps": 1e-5,
                "spatial_interpolation_scale": 1.875, "temporal_interpolation_scale": 1.0},
        tiny={"num_attention_heads": 2, "num_layers": 2, "text_embed_dim": 64,
              "time_embed_dim": 32, "max_text_seq_length": 16},
        tiny_video=(9, 64, 96),
    ),
    "ltx-video": Model(
        "LTXVideoTransformer3DModel", "ltx-video", LTX, ltx_inputs, (121, 512, 768), 128,
        tiny={"num_attention_heads": 2, "num_layers": 2, "cross_attention_dim": 128,
              "caption_channels": 64},
        tiny_video=(17, 128, 128),
    ),
}  # fmt: skip
TINY_TEXT = 16


class _NoAttention:
    """Router stand-in whose self-attention returns v: times everything else."""

    grid: tuple[int, int, int] | None = None
    step = 0

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            rope: object = None, text: object = None) -> torch.Tensor:  # fmt: skip
        return v


def build(spec: Model, tiny: bool) -> Any:
    """The transformer built on the device in bf16 (13B in fp32 would not fit)."""
    import diffusers

    torch.manual_seed(0)
    with torch.device(DEVICE):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            m = getattr(diffusers, spec.cls)(**{**spec.config, **(spec.tiny if tiny else {})})
        finally:
            torch.set_default_dtype(prev)
    return m.eval().requires_grad_(False)


@functools.cache
def attention_speedup(
    grid: tuple[int, int, int], heads: int, head_dim: int, text: int, first: bool,
    prompt: int | None, spec: AttentionSpec,
) -> float:  # fmt: skip
    """cuDNN SDPA time / fpstune op time on one layer's joint q, k, v (``text`` tokens beside
    the video; ``prompt``: the first that many kept, the rest masked as padding)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n = math.prod(grid) + text
    q, k, v = (_randn(1, heads, n, head_dim) for _ in range(3))
    mask = None if prompt is None else (torch.arange(text, device=DEVICE) < prompt)[None]
    key_mask = None if mask is None else prompt_key_mask(mask, n, first)
    backends = [SDPBackend.CUDNN_ATTENTION if DEVICE.type == "cuda" else SDPBackend.MATH]

    def cudnn() -> object:
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)

    ours = functools.partial(attention, q, k, v, grid=grid, spec=spec, text=text,
                             text_first=first, text_mask=mask)  # fmt: skip
    return op_ms(cudnn) / op_ms(ours)


def run_model(name: str, reps: int, kernel: str, tiny: bool, prompt: int | None) -> Kwargs:
    """The rows of one model (module docstring); the model is freed with this frame."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fpstune.models.router import AttentionRouter

    spec = MODELS[name]
    m = build(spec, tiny)
    frames, height, width = spec.tiny_video if tiny else spec.video
    text = TINY_TEXT if tiny else spec.text
    joint = spec.routing is not LTX
    shape = adapters.get(spec.adapter).shape(
        dict(m.config), name=name, height=height, width=width, frames=frames, steps=50, cfg=1,
        **({"text": text} if spec.routing is HUNYUAN_VIDEO else {}),
    )  # fmt: skip
    c = m.config
    patch = (getattr(c, "patch_size_t", None) or 1, c.patch_size, c.patch_size)
    latents = (shape.grid[0] * patch[0], shape.grid[1] * patch[1], shape.grid[2] * patch[2])
    if spec.routing is not HUNYUAN_VIDEO:
        prompt = None  # CogVideoX's joint call has no mask; LTX's text is cross-attention
    elif prompt is None or prompt > text:
        prompt = text  # HunyuanVideo always passes its mask: all ones here
    kwargs = spec.inputs(m, latents, text, prompt)
    grid = spec.routing.grid(m, (), kwargs)
    if grid != tuple(shape.grid):
        raise RuntimeError(f"routing grid {grid} != adapter shape grid {shape.grid}")
    backends = [SDPBackend.CUDNN_ATTENTION if DEVICE.type == "cuda" else SDPBackend.MATH]

    def forward() -> object:
        with torch.no_grad(), sdpa_kernel(backends):
            return m(**kwargs, return_dict=False)

    def timed() -> float:
        return statistics.median(wall_ms(forward, reps))

    tokens = math.prod(grid)
    row: dict[str, Any] = {"model": name, "grid": grid, "tokens": tokens,
                           "text": text if joint else 0, "prompt": prompt}  # fmt: skip
    how = "joint" if joint else "cross-attention"
    print(f"== {name}: grid {grid}, {tokens} tokens, {text} text ({how})", flush=True)
    sdpa_ms = timed()  # diffusers' own processors
    print(f"  sdpa {sdpa_ms:9.1f} ms", flush=True)
    noattn = _NoAttention()
    noattn.grid = grid
    install(spec.routing, m, noattn, fuse_rope=False)  # type: ignore[arg-type]  # diffusers' RoPE
    rest_ms = timed()
    share = (sdpa_ms - rest_ms) / sdpa_ms
    row.update(sdpa_ms=sdpa_ms, rest_ms=rest_ms, attention_share=share, specs=[])
    print(f"  rest {rest_ms:9.1f} ms  attention share {share:.1%}", flush=True)
    router = AttentionRouter(grid=grid)
    install(spec.routing, m, router, fuse_rope=True)
    for s in (with_kernel(AttentionSpec.from_dict(d), grid, kernel) for d in SPECS):
        hw = current_fingerprint(DEVICE)
        router.policy = Policy(model=shape, hardware=hw, default=s)
        ms = timed()
        s_attn = attention_speedup(grid, shape.heads, shape.head_dim, shape.text, spec.first,
                                   prompt, s)  # fmt: skip
        bound = sdpa_ms / (rest_ms + (sdpa_ms - rest_ms) / s_attn)
        r = {"spec": s.describe(), "ms": ms, "speedup": sdpa_ms / ms, "attention_speedup":
             s_attn, "amdahl_bound": bound, "of_bound": (sdpa_ms / ms) / bound}  # fmt: skip
        row["specs"].append(r)
        print(
            f"  {r['spec']:34s} {ms:9.1f} ms  step {r['speedup']:5.2f}x  attention "
            f"{s_attn:5.2f}x  bound {bound:5.2f}x  of bound {r['of_bound']:.1%}",
            flush=True,
        )
    if len(router.calls) != shape.layers:  # every routed layer went through the router
        raise RuntimeError(f"{len(router.calls)} of {shape.layers} layers were routed")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python3 -m benchmarks.model_step",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    result_args(ap)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--reps", type=int, default=3, help="timed forwards per row (median)")
    ap.add_argument("--kernel", choices=list(KERNELS), default="default",
                    help="fp8 kernel config of every fp8 spec (e2e_bench's --kernel)")  # fmt: skip
    ap.add_argument("--prompt", type=int, default=None,
                    help="HunyuanVideo: prompt tokens kept by its mask of the 256 text tokens "
                    "(the rest padding); default all 256")  # fmt: skip
    ap.add_argument("--tiny", action="store_true",
                    help="2 layers, 2 heads, a small grid: a CPU smoke run")  # fmt: skip
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    for name in args.models:
        try:
            rows.append(run_model(name, args.reps, args.kernel, args.tiny, args.prompt))
        except Exception as e:  # one model failing (OOM, a diffusers change) spares the others
            traceback.print_exc()
            print(f"!! {name}: {type(e).__name__}: {e}", flush=True)
            rows.append({"model": name, "error": f"{type(e).__name__}: {e}"})
        gc.collect()  # the model went with run_model's frame (and the traceback's)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    payload = {"kernel": args.kernel, "tiny": args.tiny, "rows": rows}
    path = write_result("model_step", payload, out=args.out, folder=args.results,
                        env=environment(DEVICE))  # fmt: skip
    head = ("model", "sdpa ms", "share", "spec", "ms", "step", "attn", "bound", "of")
    print("\n{:13s} {:>9s} {:>6s} {:34s} {:>9s} {:>6s} {:>6s} {:>6s} {:>6s}".format(*head))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:13s} error: {r['error']}")
        for s in r.get("specs", []):
            print(
                f"{r['model']:13s} {r['sdpa_ms']:9.1f} {r['attention_share']:6.1%} "
                f"{s['spec']:34s} {s['ms']:9.1f} {s['speedup']:5.2f}x "
                f"{s['attention_speedup']:5.2f}x {s['amdahl_bound']:5.2f}x {s['of_bound']:6.1%}"
            )
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
