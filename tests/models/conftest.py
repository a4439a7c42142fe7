"""A tiny random-config Wan checkpoint in diffusers' directory layout, made on the fly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from wan_helpers import CONFIG, TEXT_DIM, TEXT_TOKENS


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ckpt/transformer`` (random weights, seed 0) and ``ckpt/scheduler`` (UniPC, flow
    prediction, shift 3: Wan 2.1's scheduler config)."""
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

    root = tmp_path_factory.mktemp("wan") / "tiny-wan"
    torch.manual_seed(0)
    WanTransformer3DModel(**CONFIG).save_pretrained(root / "transformer")
    UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    ).save_config(root / "scheduler")
    return root


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prompt and negative embeddings for one video (used for every seed)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    path = tmp_path_factory.mktemp("prompts") / "embeds.safetensors"
    save_file(
        {
            "prompt_embeds": torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g),
            "negative_prompt_embeds": torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g),
        },
        str(path),
    )
    return path


@pytest.fixture(scope="session")
def pipeline_dir(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint as a WanPipeline directory with a tiny UMT5 text encoder and a word-level
    tokenizer (no VAE: prompt encoding does not need one). Needs transformers."""
    pytest.importorskip("transformers")
    from diffusers import WanPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    from fpstune.models import wan

    words = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "runs", "blurry"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(1)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(words),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
        )
    )
    transformer, scheduler = wan.load_wan(checkpoint)
    root = tmp_path_factory.mktemp("wan") / "tiny-wan-pipeline"
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=None,
        scheduler=scheduler,
        transformer=transformer,
    )
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def full_pipeline_dir(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pipeline_dir` with a tiny Wan VAE (z_dim 4, Wan's 4x8x8 compression): a complete
    ``WanPipeline`` folder as ``save_pretrained`` writes it, random weights."""
    from diffusers import AutoencoderKLWan, WanPipeline

    torch.manual_seed(2)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=CONFIG["in_channels"],
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * CONFIG["in_channels"],
        latents_std=[1.0] * CONFIG["in_channels"],
    )
    pipe = WanPipeline.from_pretrained(pipeline_dir, vae=vae, local_files_only=True)
    root = tmp_path_factory.mktemp("wan") / "tiny-wan-full"
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def pipeline64_dir(full_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`full_pipeline_dir` with a head_dim-64 transformer (a head_dim the kernels take): the
    folder a user captures, tunes and applies a policy to, end to end."""
    from diffusers import WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**{**CONFIG, "attention_head_dim": 64, "ffn_dim": 64})
    pipe = WanPipeline.from_pretrained(
        full_pipeline_dir, transformer=transformer, local_files_only=True
    )
    root = tmp_path_factory.mktemp("wan") / "tiny-wan-64"
    pipe.save_pretrained(root)
    return root
