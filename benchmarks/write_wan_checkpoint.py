"""Write a complete diffusers ``WanPipeline`` folder with random weights, as a user's checkpoint
looks on disk (``save_pretrained``): the Wan2.1 transformer of ``--model`` (`e2e_bench.build`,
seed 0, bf16: the same weights `pipeline_apply.py --checkpoint` is timed on), Wan's VAE
(``AutoencoderKLWan``'s default config: Wan 2.1's), a one-layer UMT5 text encoder of the
transformer's text width with a word-level tokenizer (the real UMT5-XXL is 5.7 B parameters;
the prompt's content does not matter for speed or for the tuning flow), and Wan's UniPC
scheduler (flow shift 3, Wan 2.1's at 480p). Nothing is downloaded.

    python3 -m benchmarks.write_wan_checkpoint --model 1.3b --out /tmp/wan-1.3b
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.e2e_bench import COMMON, DEVICE, build

WORDS = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "runs", "on", "the", "beach", "blurry"]


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python3 -m benchmarks.write_wan_checkpoint",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--model", default="1.3b", choices=["tiny", "1.3b", "14b"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    t0 = time.perf_counter()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # type: ignore[assignment]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(1)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(WORDS), d_model=int(COMMON["text_dim"]), d_kv=64, d_ff=256,
            num_layers=1, num_heads=4, relative_attention_num_buckets=32,
        )
    )  # fmt: skip
    torch.manual_seed(2)
    vae = AutoencoderKLWan() if args.model != "tiny" else AutoencoderKLWan(base_dim=16)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=build(args.model, DEVICE),
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),
    )
    pipe.save_pretrained(args.out)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: {size / 2**30:.2f} GiB written in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
