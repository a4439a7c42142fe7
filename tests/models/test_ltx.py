"""LTX-Video through `fpstune.apply`: a tiny random-config ``LTXVideoTransformer3DModel`` in an
``LTXPipeline`` built in memory (tiny VAE, flow-matching Euler scheduler, prompt embeddings
passed directly, no text encoder), run by the pipeline's own ``__call__`` on CPU; the rotary
embedding and token order fpstune relies on; the ``ltx-video`` adapter's config, shape and
load."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from wan_helpers import cell_policy

import fpstune
from fpstune.errors import BadInput
from fpstune.kernels import AttentionSpec, Mode, Policy
from fpstune.kernels.rope import rotary, tables
from fpstune.models import adapters
from fpstune.models import ltx as ltx_module
from fpstune.models import router as router_module
from fpstune.models.apply import PolicyMismatch, applied
from fpstune.models.ltx import LTXSelfAttention, LTXVideoAdapter
from fpstune.models.router import AttentionRouter

#: 2 layers, 2 heads x 16 (inner 32: 5 rotary frequencies per axis, 2 padding channels)
CONFIG: dict[str, Any] = {
    "in_channels": 8,
    "out_channels": 8,
    "patch_size": 1,
    "patch_size_t": 1,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "cross_attention_dim": 32,
    "num_layers": 2,
    "caption_channels": 16,
}
#: 17 frames of 96 x 128 pixels -> latents 3 x 3 x 4 (8 x temporally, 32 x spatially)
HEIGHT, WIDTH, FRAMES = 96, 128, 17
GRID = (3, 3, 4)
STEPS = 2
TEXT_TOKENS = 6
BF16 = AttentionSpec(mode=Mode.BF16_DENSE)
#: a different cell for every (step, layer) of the tiny model (2 steps x 2 layers)
CELLS = {
    (0, 0): AttentionSpec(mode=Mode.FP8_DENSE, tile=(1, 3, 4)),
    (0, 1): AttentionSpec.from_dict(
        {"mode": "fp8_sparse", "tile": [1, 3, 4], "sparsity": 0.5, "pattern": {"kind": "window"}}
    ),
    (1, 0): AttentionSpec.from_dict(
        {"mode": "bf16_sparse", "tile": [1, 3, 2], "sparsity": 0.5, "pattern": {"kind": "topk"}}
    ),
    (1, 1): BF16,
}
#: LTX-Video 0.9's transformer config (Lightricks/LTX-Video, transformer/config.json)
LTX_VIDEO_CONFIG = {
    "_class_name": "LTXVideoTransformer3DModel",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 64,
    "attention_out_bias": True,
    "caption_channels": 4096,
    "cross_attention_dim": 2048,
    "in_channels": 128,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "num_attention_heads": 32,
    "num_layers": 28,
    "out_channels": 128,
    "patch_size": 1,
    "patch_size_t": 1,
    "qk_norm": "rms_norm_across_heads",
}


@pytest.fixture(scope="module")
def adapter() -> Any:
    """The built-in ``ltx-video`` adapter."""
    found = adapters.get("ltx-video")
    assert isinstance(found, LTXVideoAdapter)
    return found


def _transformer(config: dict[str, Any] = CONFIG, seed: int = 0) -> Any:
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    model: Any = LTXVideoTransformer3DModel(**config)
    return model.eval()


def _scheduler() -> Any:
    """LTX-Video's scheduler config (dynamic shifting by the video's sequence length)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )


@pytest.fixture(scope="module")
def pipe() -> Any:
    """An LTXPipeline: tiny VAE (LTX's 8 x 32 x 32 compression, 8 latent channels), no text
    encoder or tokenizer."""
    from diffusers import AutoencoderKLLTXVideo, LTXPipeline

    torch.manual_seed(1)
    vae: Any = AutoencoderKLLTXVideo(
        latent_channels=CONFIG["in_channels"],
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
    )
    vae.eval()
    assert (vae.temporal_compression_ratio, vae.spatial_compression_ratio) == (8, 32)
    return LTXPipeline(
        scheduler=_scheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=_transformer(),
    )


def _policy(cells: dict[tuple[int, int], AttentionSpec], adapter: Any) -> Policy:
    shape = adapter.shape(
        CONFIG, name="tiny-ltx", height=HEIGHT, width=WIDTH, frames=FRAMES, steps=STEPS, cfg=2
    )
    assert shape.grid == GRID and shape.text == 0
    return cell_policy(shape, cells)


def _embeds() -> dict[str, torch.Tensor]:
    """Prompt and negative embeddings; the last two prompt tokens are padding (masked)."""
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.long)
    mask[:, -2:] = 0
    return {
        "prompt_embeds": torch.randn(1, TEXT_TOKENS, CONFIG["caption_channels"], generator=g),
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": torch.randn(
            1, TEXT_TOKENS, CONFIG["caption_channels"], generator=g
        ),
        "negative_prompt_attention_mask": torch.ones(1, TEXT_TOKENS, dtype=torch.long),
    }


def _generate(pipe: Any, **kw: Any) -> torch.Tensor:
    """Latents after every step (the pipeline's own loop, CFG 3, seed 0), stacked."""
    seen: list[torch.Tensor] = []

    def keep(p: Any, i: int, t: Any, state: dict[str, Any]) -> dict[str, Any]:
        seen.append(state["latents"].clone())
        return {}

    size = {"height": HEIGHT, "width": WIDTH, "num_frames": FRAMES} | kw
    with torch.no_grad():
        pipe(
            **_embeds(),
            **size,
            num_inference_steps=STEPS,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            callback_on_step_end=keep,
        )
    return torch.stack(seen)


def _attn1(pipe: Any) -> list[Any]:
    return [b.attn1.processor for b in pipe.transformer.transformer_blocks]


def _attn2(pipe: Any) -> list[Any]:
    return [b.attn2.processor for b in pipe.transformer.transformer_blocks]


Call = tuple[int, int, str | None, AttentionSpec, int]  # layer, step, pass, spec, batch


@pytest.fixture
def record(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Call]]:
    """(layer, step, CFG pass, spec, batch) of every routed self-attention call. A BF16 cell
    runs SDPA; every other cell must reach the kernels' `attention` with its spec."""
    calls: list[Call] = []
    kernels_reached: list[Call] = []
    route, attend = ltx_module._route, router_module.attention

    def recording_route(processor: LTXSelfAttention, q: torch.Tensor, *a: Any) -> torch.Tensor:
        router, layer = processor.router, processor.layer
        calls.append((layer, router.step, router.pass_name, router.spec_for(layer), q.shape[0]))
        return route(processor, q, *a)

    def recording_attention(*args: Any, spec: AttentionSpec, **kw: Any) -> torch.Tensor:
        assert kw["grid"] == GRID and kw["rope"] is None  # LTX rotates in the processor
        kernels_reached.append((*calls[-1][:3], spec, calls[-1][4]))
        return attend(*args, spec=spec, **kw)

    monkeypatch.setattr(ltx_module, "_route", recording_route)
    monkeypatch.setattr(router_module, "attention", recording_attention)
    yield calls
    assert kernels_reached == [c for c in calls if c[3].mode is not Mode.BF16_DENSE]


# -- through the pipeline -------------------------------------------------------------------------


def test_every_self_attention_call_runs_the_cell_of_its_layer_and_step(
    pipe: Any, adapter: Any, record: list[Call]
) -> None:
    from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

    assert adapters.for_transformer(pipe) is adapter
    reference = _generate(pipe)
    cross = _attn2(pipe)
    policy = _policy(CELLS, adapter)
    fpstune.apply(pipe, policy)
    try:
        assert all(isinstance(p, LTXSelfAttention) for p in _attn1(pipe))
        assert _attn2(pipe) == cross  # the same diffusers objects
        assert all(type(p) is LTXVideoAttnProcessor for p in cross)
        got = _generate(pipe)
    finally:
        fpstune.remove(pipe)
    # LTX runs CFG as one batch of 2 per step ("cond_uncond"): one call per (layer, step)
    assert sorted(c[:2] for c in record) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {(c[2], c[4]) for c in record} == {("cond_uncond", 2)}
    for layer, step, _, spec, _ in record:
        assert spec == CELLS[(step, layer)] == policy.spec(layer=layer, step=step)
    assert not torch.allclose(got[0], reference[0], atol=1e-6)  # step 0: FP8 cells


def test_an_all_bf16_policy_reproduces_the_pipeline_bit_for_bit(pipe: Any, adapter: Any) -> None:
    reference = _generate(pipe)
    fpstune.apply(pipe, _policy({}, adapter))
    try:
        got = _generate(pipe)
    finally:
        fpstune.remove(pipe)
    assert torch.equal(got, reference)


def test_another_resolution_is_refused_naming_the_grid(
    pipe: Any, adapter: Any, record: list[Call]
) -> None:
    fpstune.apply(pipe, _policy(CELLS, adapter))
    try:
        with pytest.raises(PolicyMismatch) as e:
            _generate(pipe, height=HEIGHT + 32)  # latents 3 x 4 x 4
    finally:
        fpstune.remove(pipe)
    assert str(e.value) == (
        "grid: the pipeline's latent-patch grid is 3x4x4, the policy was tuned for 3x3x4 "
        "(another resolution or frame count)"
    )
    assert record == []  # refused at the first transformer call, before any attention


def test_remove_restores_diffusers_processors(pipe: Any, adapter: Any) -> None:
    from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

    before, cross = _attn1(pipe), _attn2(pipe)
    fpstune.apply(pipe, _policy(CELLS, adapter))
    assert applied(pipe) is not None
    fpstune.remove(pipe)
    assert all(a is b for a, b in zip(_attn1(pipe), before, strict=True))
    assert all(a is b for a, b in zip(_attn2(pipe), cross, strict=True))
    assert pipe.transformer._diffusers_hook.get_hook("fpstune") is None
    assert applied(pipe) is None
    # a bare install gives way to new diffusers processors; remove is idempotent
    assert adapter.install(pipe.transformer, AttentionRouter()) == CONFIG["num_layers"]
    assert all(isinstance(p, LTXSelfAttention) for p in _attn1(pipe))
    adapter.remove(pipe.transformer)
    adapter.remove(pipe.transformer)
    assert all(type(p) is LTXVideoAttnProcessor for p in _attn1(pipe))


def test_a_transformer_of_another_shape_is_refused(adapter: Any) -> None:
    other = _transformer({**CONFIG, "num_attention_heads": 4, "attention_head_dim": 8})
    with pytest.raises(PolicyMismatch) as e:
        fpstune.apply(other, _policy(CELLS, adapter))
    assert (
        str(e.value) == "model.heads: the transformer has 4, the policy (tiny-ltx) was tuned for 2"
    )
    assert applied(other) is None


def test_the_grid_comes_from_the_calls_latent_sizes(pipe: Any) -> None:
    grid = ltx_module.LTX.grid
    hidden = torch.zeros(1, 36, CONFIG["in_channels"])
    t = pipe.transformer
    assert grid(t, (), {"hidden_states": hidden, "num_frames": 3, "height": 3, "width": 4}) == GRID
    assert grid(t, (hidden, None, None, None, 3, 3, 4), {}) == GRID  # positionally
    with pytest.raises(ValueError, match="called without height"):
        grid(t, (), {"hidden_states": hidden, "num_frames": 3, "width": 4})
    with pytest.raises(ValueError, match="latent grid 3x3x3 does not match the 36 video tokens"):
        grid(t, (), {"hidden_states": hidden, "num_frames": 3, "height": 3, "width": 3})
    patched = _transformer({**CONFIG, "patch_size": 2, "num_layers": 1})
    # 2 x 2 spatial patches: latents 3 x 6 x 8 are a 3 x 3 x 4 grid of 36 tokens
    assert grid(patched, (hidden,), {"num_frames": 3, "height": 6, "width": 8}) == GRID
    with pytest.raises(ValueError, match=r"not divisible by the patch size \(1, 2, 2\)"):
        grid(patched, (hidden,), {"num_frames": 3, "height": 6, "width": 7})


# -- what fpstune relies on: token order and rotary embedding -----------------------------------


@pytest.mark.parametrize("patch", [1, 2])
def test_tokens_are_frame_major_then_height_then_width(patch: int) -> None:
    """`LTXPipeline._pack_latents` and the rotary embedding's coordinates both order tokens
    (t, h, w) row-major over the latent-patch grid: the order fpstune's tiles assume."""
    from diffusers import LTXPipeline

    t, h, w = GRID
    index = torch.arange(t * h * w, dtype=torch.float32).reshape(1, 1, t, h, w)
    # every latent of patch (t', h', w') holds the patch's row-major index
    latents = index.repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    latents = latents.repeat_interleave(patch, 4).repeat(1, 2, 1, 1, 1)
    packed = LTXPipeline._pack_latents(latents, patch, patch)
    assert packed.shape == (1, t * h * w, 2 * patch**3)
    assert torch.equal(packed, torch.arange(t * h * w).float()[None, :, None].expand_as(packed))
    rope = _transformer({**CONFIG, "num_layers": 1}).rope
    coords = rope._prepare_video_coords(1, t, h, w, None, torch.device("cpu"))[0]
    n = torch.arange(t * h * w)
    assert torch.equal(coords, torch.stack((n // (h * w), n // w % h, n % w), -1).float())


def test_rotary_embedding_is_fpstunes_rotation_per_head_with_per_head_tables() -> None:
    """LTX's rotation (diffusers' ``apply_rotary_emb``) is `fpstune.kernels.rope.rotary` on
    each head's channels, bit for bit; but its tables span heads x head_dim channels and differ
    from head to head, so one (tokens, head_dim) table cannot carry them: no fused RoPE."""
    from diffusers.models.transformers.transformer_ltx import (
        LTXVideoRotaryPosEmbed,
        apply_rotary_emb,
    )

    t, h, w = GRID
    tokens = t * h * w
    for heads, dim in ((2, 16), (32, 64)):  # the tiny model; LTX-Video's 32 x 64
        embed = LTXVideoRotaryPosEmbed(dim=heads * dim)
        x = torch.randn(2, tokens, heads * dim, generator=torch.Generator().manual_seed(heads))
        cos, sin = embed(x, t, h, w, rope_interpolation_scale=(8 / 25, 32, 32))
        assert cos.shape == (2, tokens, heads * dim)  # per video of the batch, per channel
        assert torch.equal(cos[..., 0::2], cos[..., 1::2])  # one angle per channel pair
        assert torch.equal(sin[..., 0::2], sin[..., 1::2])
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            ours = ltx_module.rotate(xd, (cos, sin))
            assert torch.equal(ours, apply_rotary_emb(xd, (cos, sin)))
            for head in range(heads):
                c = slice(head * dim, (head + 1) * dim)
                assert torch.equal(rotary(xd[..., c], cos[..., c], sin[..., c]), ours[..., c])
        assert not torch.equal(cos[..., :dim], cos[..., dim : 2 * dim])  # per-head angles
        with pytest.raises(ValueError, match="expected"):
            tables((cos, sin), tokens, dim, torch.device("cpu"))


# -- the adapter: config, shape, load -------------------------------------------------------------


def test_shape_is_ltx_videos_published_shape(adapter: Any, tmp_path: Path) -> None:
    pipeline_dir, transformer_dir = tmp_path / "ltx", tmp_path / "bare"
    (pipeline_dir / "transformer").mkdir(parents=True)
    transformer_dir.mkdir()
    for file in (pipeline_dir / "transformer" / "config.json", transformer_dir / "config.json"):
        file.write_text(json.dumps(LTX_VIDEO_CONFIG))
    for root in (pipeline_dir, transformer_dir):
        config = adapter.config(root)
        shape = adapter.shape(
            config, name="ltx-video", height=512, width=704, frames=161, steps=50, cfg=2
        )
        # 161 frames -> (161 - 1) / 8 + 1 = 21 latent frames; 512 / 32 = 16; 704 / 32 = 22
        assert shape.model_dump() == {
            "name": "ltx-video",
            "heads": 32,
            "head_dim": 64,
            "layers": 28,
            "grid": (21, 16, 22),
            "steps": 50,
            "cfg": 2,
            "task": "t2v",
            "text": 0,
        }
    size = {"name": "x", "steps": 50, "cfg": 2}
    with pytest.raises(BadInput, match=r"^--height: 500 is not a multiple of 32$"):
        adapter.shape(LTX_VIDEO_CONFIG, height=500, width=704, frames=161, **size)
    with pytest.raises(BadInput, match=r"^--frames: 160 is not 1 \+ a multiple of 8$"):
        adapter.shape(LTX_VIDEO_CONFIG, height=512, width=704, frames=160, **size)


def test_config_errors_name_the_file(adapter: Any, tmp_path: Path) -> None:
    with pytest.raises(BadInput) as e:
        adapter.config(tmp_path)
    assert str(e.value) == (
        f"{tmp_path / 'transformer' / 'config.json'}: no transformer config "
        f"(nor {tmp_path / 'config.json'})"
    )
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BadInput, match=r"config.json: not a JSON transformer config"):
        adapter.config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    with pytest.raises(BadInput, match="_class_name: 'WanTransformer3DModel' is not LTXVideo"):
        adapter.config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 2}))
    with pytest.raises(BadInput, match=r"config\.json: attention_head_dim: missing"):
        adapter.config(tmp_path)
    with pytest.raises(BadInput, match="no such model directory"):
        adapter.config(tmp_path / "nowhere")


def test_load_builds_the_transformer_and_scheduler_offline(adapter: Any, tmp_path: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel

    model = _transformer({**CONFIG, "num_layers": 1})
    model.save_pretrained(tmp_path / "transformer")
    with pytest.raises(BadInput, match=r"scheduler_config.json: no scheduler config"):
        adapter.load(tmp_path)
    _scheduler().save_config(tmp_path / "scheduler")
    loaded: tuple[Any, Any] = adapter.load(tmp_path)
    transformer, scheduler = loaded
    assert isinstance(loaded[0], LTXVideoTransformer3DModel) and not transformer.training
    assert isinstance(loaded[1], FlowMatchEulerDiscreteScheduler)
    assert scheduler.config.use_dynamic_shifting
    for (name, a), b in zip(
        model.state_dict().items(), transformer.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert adapter.config(tmp_path)["num_layers"] == 1


def test_capture_and_replay_are_not_built_yet(adapter: Any) -> None:
    assert adapter.name == "ltx-video" and adapter.end_to_end is False
    calls = (
        lambda: adapter.denoise(None, AttentionRouter(), None, None),
        lambda: adapter.replay(None, None),
        lambda: adapter.capture(None, None, None, name="x", seeds=[0]),
        lambda: adapter.end_to_end_probe(seeds=[0], steps=1, guidance=1.0, device="cpu"),
    )
    for call in calls:
        with pytest.raises(adapters.NoModel, match=r"^adapter ltx-video has no .* yet"):
            call()
    with pytest.raises(adapters.NoModel, match="needs a checkpoint directory"):
        adapter.config(None)
