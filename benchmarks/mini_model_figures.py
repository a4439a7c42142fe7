"""Evidence that the embedded mini model is trained (docs/quality.md), on any machine (CPU ok):

- docs/img/mini_samples.png: training videos (top rows) and the model's samples (10 steps, CFG 5,
  seeds 0-3; bottom rows), frames left to right;
- docs/img/mini_loss.png: the training loss curve stored in the weights' metadata;
- the attention structure table (printed, and in --json): per layer and head, the share of
  attention mass within a local 3D window (|dt| <= 1, |dh| <= 2, |dw| <= 2 latent patches,
  see LOCAL) averaged over the denoising steps, trained vs untrained (random init).

    python3 -m benchmarks.mini_model_figures --out-dir docs/img

The table also goes to benchmarks/results/<date>-cpu-mini_model_figures.json.

Needs matplotlib for the loss curve (a documentation tool, not a dependency of fpstune).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fpstune.latency.bench import environment, result_args, write_result
from fpstune.models import mini
from fpstune.models.loop import denoise
from fpstune.models.processor import install
from fpstune.models.router import AttentionRouter
from fpstune.models.videos import random_prompts, render

LOCAL = (1, 2, 2)  # half-extent of the local window in latent patches (t, h, w)


def to_rows(videos: torch.Tensor, scale: int = 4) -> Image.Image:
    n = videos.shape[0]
    x = ((videos.clamp(-1, 1) + 1) / 2 * 255).round().byte()  # n, 3, t, h, w
    _, _, t, h, w = x.shape
    img = x.permute(0, 3, 2, 4, 1).reshape(n * h, t * w, 3).numpy()
    return Image.fromarray(img).resize((t * w * scale, n * h * scale), Image.NEAREST)


def local_mask(grid: tuple[int, int, int]) -> torch.Tensor:
    t, h, w = grid
    coords = torch.stack(
        torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1
    ).reshape(-1, 3)
    d = (coords[:, None, :] - coords[None, :, :]).abs()
    return (d <= torch.tensor(LOCAL)).all(-1)


def attention_locality(model: Any, seeds: list[int]) -> list[list[float]]:
    """[layer][head] mean share of softmax mass on keys inside the local window."""
    mask = local_mask(mini.GRID).float()
    acc: dict[tuple[int, int], list[float]] = {}

    def observe(layer: int, step: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        p = torch.softmax((q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5, -1)
        share = (p * mask).sum(-1).mean(dim=(0, 2))  # per head
        for head, s in enumerate(share.tolist()):
            acc.setdefault((layer, head), []).append(s)

    router = AttentionRouter(observer=observe)
    install(model, router)
    denoise(model, router, mini.conditions(seeds), mini.sampling())
    layers = 1 + max(layer for layer, _ in acc)
    heads = 1 + max(head for _, head in acc)
    return [[sum(acc[(i, j)]) / len(acc[(i, j)]) for j in range(heads)] for i in range(layers)]


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python3 -m benchmarks.mini_model_figures",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--out-dir", default="docs/img", help="where the two figures go")
    result_args(ap)
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    g = torch.Generator().manual_seed(123)
    data = render(
        random_prompts(4, generator=g),
        frames=mini.FRAMES,
        height=mini.HEIGHT,
        width=mini.WIDTH,
        generator=g,
    )
    model = mini.build_mini()
    router = AttentionRouter()
    install(model, router)
    samples = denoise(model, router, mini.conditions([0, 1, 2, 3]), mini.sampling())
    top, bottom = to_rows(data), to_rows(samples)
    strip = Image.new("RGB", (top.width, top.height + bottom.height + 8), "white")
    strip.paste(top, (0, 0))
    strip.paste(bottom, (0, top.height + 8))
    strip.save(out / "mini_samples.png", optimize=True)

    meta = mini.weights_metadata()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, loss = zip(*meta["loss_curve"], strict=True)
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(steps, loss)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step (batch 64)")
    ax.set_ylabel("flow-matching loss")
    ax.set_title(
        f"mini: {meta['steps']} steps, {meta['seconds']:.0f} s on {meta['fingerprint']['gpu']}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(out / "mini_loss.png")

    trained = attention_locality(mini.build_mini(), [0, 1])
    untrained = attention_locality(mini.build_mini(random_init=True), [0, 1])
    n_local = int(local_mask(mini.GRID).sum(-1).float().mean())
    print(f"local window {LOCAL} (t, h, w half-extents): {n_local} of 960 keys on average")
    print("layer head  trained  untrained")
    for i, (tr, un) in enumerate(zip(trained, untrained, strict=True)):
        for j, (a, b) in enumerate(zip(tr, un, strict=True)):
            print(f"{i:5d} {j:4d}  {a:7.3f}  {b:9.3f}")
    result = {
        "local": LOCAL,
        "keys_in_window": n_local,
        "trained": trained,
        "untrained": untrained,
        "weights": meta,
    }
    path = write_result("mini_model_figures", result, out=args.out, folder=args.results,
                        env=environment("cpu"))  # fmt: skip
    print(f"written: {path}")


if __name__ == "__main__":
    main()
