"""`fpstune capture` on a Wan2.1-1.3B-shaped checkpoint at 480p, on the GPU: time and file sizes.

No real weights can be fetched, so the checkpoint has the 1.3B model's config (30 layers,
12 heads x 128, text_dim 4096) with random bf16 weights, saved in diffusers' layout with Wan's
UniPC scheduler config; the prompt embeddings are random (1, 512, 4096). The run goes through
the real `capture` command (typer), then replays the record with the transformer alone and
compares the final latents with the captured ones.

    python3 -m benchmarks.capture_wan --work /tmp/capture          # on the GPU

Writes benchmarks/results/<date>-<gpu>-capture_wan.json (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import typer

from fpstune.cli.capture import capture_cmd
from fpstune.latency.bench import result_args, write_result
from fpstune.models import wan
from fpstune.models.capture import load_record, record_path, replay
from fpstune.quality.calibration import load_calibration

WAN_1_3B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}


def make_checkpoint(root: Path) -> float:
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
    from safetensors.torch import save_file

    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanTransformer3DModel(**WAN_1_3B).to(torch.bfloat16)
    model.save_pretrained(root / "transformer")
    UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    ).save_config(root / "scheduler")
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "prompt_embeds": torch.randn(1, 512, 4096, generator=g),
            "negative_prompt_embeds": torch.randn(1, 512, 4096, generator=g),
        },
        str(root / "embeds.safetensors"),
    )
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python3 -m benchmarks.capture_wan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--work", type=Path, default=Path("/tmp/capture"), help="checkpoint and capture"
    )
    result_args(ap)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--layers", default="0,15,29")
    ap.add_argument("--sample-steps", default="0,9")
    ap.add_argument("--max-tokens", type=int, default=4096)
    args = ap.parse_args()
    root = args.work / "wan2.1-1.3b-random"
    build_s = make_checkpoint(root)
    cal = args.work / "calib.safetensors"
    app = typer.Typer()
    app.command()(capture_cmd)
    argv = [
        str(root), "-o", str(cal), "--prompt-embeds", str(root / "embeds.safetensors"),
        "--height", "480", "--width", "832", "--frames", "81", "--steps", str(args.steps),
        "--layers", args.layers, "--sample-steps", args.sample_steps,
        "--max-tokens", str(args.max_tokens), "--device", "cuda",
    ]  # fmt: skip
    start = time.perf_counter()
    app(argv, standalone_mode=False)
    capture_s = time.perf_counter() - start
    shape = wan.model_shape(
        wan.transformer_config(root),
        name=root.name, height=480, width=832, frames=81, steps=args.steps, cfg=2,
    )  # fmt: skip
    meta = load_calibration(cal, model=shape).meta
    record = load_record(record_path(cal))
    transformer = wan.load_transformer(root, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    again = replay(transformer, record).cpu()
    replay_s = time.perf_counter() - start
    diff = (again - record.final).abs().max().item()
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": "Wan2.1-1.3B config, random bf16 weights",
        "video": "480x832, 81 frames",
        "grid": list(meta.model_grid),
        "stored_grid": list(meta.grid),
        "steps": args.steps,
        "cells": len(meta.cells),
        "qkv_shape": list(meta.tensor_shape),
        "checkpoint_build_s": round(build_s, 1),
        "capture_command_s": round(capture_s, 1),
        "replay_s": round(replay_s, 1),
        "replay_bit_equal": bool(torch.equal(again, record.final)),
        "replay_max_abs_diff": diff,
        "calibration_bytes": cal.stat().st_size,
        "record_bytes": record_path(cal).stat().st_size,
    }
    path = write_result("capture_wan", result, out=args.out, folder=args.results)
    print(json.dumps(result, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
