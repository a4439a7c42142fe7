"""HunyuanVideo 1.0 and 1.5 through `fpstune.apply`, each on a tiny random-config diffusers
pipeline run by its own ``__call__`` on CPU (prompt embeddings handed in, padded text positions,
CFG so the two passes carry different prompt masks): every joint text + video call runs its
cell with the call's text length and mask, an all-BF16 policy reproduces the pipeline bit for
bit, a policy of another text length is refused, `fpstune.remove` restores diffusers'
processors; and the adapters' config / shape / load / refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from wan_helpers import cell_policy

import fpstune
from fpstune.errors import BadInput
from fpstune.kernels import AttentionSpec, Mode, Policy
from fpstune.models import adapters, hunyuan
from fpstune.models import router as router_module
from fpstune.models.apply import PolicyMismatch, applied
from fpstune.models.hunyuan import (
    HunyuanVideo15Adapter,
    HunyuanVideoAdapter,
    HunyuanVideoJointAttention,
)
from fpstune.models.router import Text

#: 2 dual-stream + 2 single-stream blocks, 2 heads x 16 (RoPE axes 4 + 6 + 6), text dim 16
CONFIG: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "num_refiner_layers": 1,
    "patch_size": 2,
    "patch_size_t": 1,
    "text_embed_dim": 16,
    "pooled_projection_dim": 8,
    "rope_axes_dim": (4, 6, 6),
}
LAYERS = 4
#: 32 x 64 pixels x 9 frames -> latents (4, 3, 4, 8) (VAE 4 x 8 x 8) -> grid 3 x 2 x 4 (24 tokens)
HEIGHT, WIDTH, FRAMES = 32, 64, 9
GRID = (3, 2, 4)
STEPS = 2
TEXT = 6
#: the prompt keeps 4 of its 6 tokens, the negative prompt 3 (padding after them)
MASKS = {
    "cond": torch.tensor([[True, True, True, True, False, False]]),
    "uncond": torch.tensor([[True, True, True, False, False, False]]),
}
BF16 = AttentionSpec(mode=Mode.BF16_DENSE)


def _spec(mode: str, tile: list[int], kind: str | None = None) -> AttentionSpec:
    d: dict[str, Any] = {"mode": mode, "tile": tile}
    if kind is not None:
        d |= {"sparsity": 0.5, "pattern": {"kind": kind}}
    return AttentionSpec.from_dict(d)


#: a different cell for every (step, layer): layers 0-1 dual-stream, 2-3 single-stream
CELLS = {
    (0, 0): _spec("fp8_dense", [1, 2, 4]),
    (0, 1): _spec("fp8_sparse", [1, 2, 2], "window"),
    (0, 2): _spec("bf16_sparse", [1, 2, 2], "topk"),
    (0, 3): BF16,
    (1, 0): _spec("bf16_sparse", [1, 2, 4], "topk"),
    (1, 1): _spec("fp8_dense", [3, 2, 4]),
    (1, 2): _spec("fp8_sparse", [1, 2, 4], "window"),
    (1, 3): _spec("fp8_dense", [1, 1, 4]),
}


@pytest.fixture(scope="module")
def adapter() -> Any:
    """The built-in ``hunyuanvideo`` adapter."""
    found = adapters.get("hunyuanvideo")
    assert isinstance(found, HunyuanVideoAdapter)
    return found


def _transformer(seed: int = 0) -> Any:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model: Any = HunyuanVideoTransformer3DModel(**CONFIG)
    return model.eval()


def _scheduler() -> Any:
    return FlowMatchEulerDiscreteScheduler(shift=7.0)


@pytest.fixture(scope="module")
def pipe() -> Any:
    """A HunyuanVideoPipeline without text encoders (embeddings are handed in), tiny VAE."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoPipeline

    torch.manual_seed(1)
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
    )
    return HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=_transformer(),
        vae=vae,
        scheduler=_scheduler(),
        text_encoder_2=None,
        tokenizer_2=None,
    )


def _policy(cells: dict[tuple[int, int], AttentionSpec], *, text: int = TEXT) -> Policy:
    model = HunyuanVideoAdapter().shape(
        dict(CONFIG),
        name="tiny-hunyuan",
        height=HEIGHT,
        width=WIDTH,
        frames=FRAMES,
        steps=STEPS,
        cfg=2,
        text=text,
    )
    assert model.grid == GRID and model.layers == LAYERS and model.text == text
    return cell_policy(model, cells)


def _generate(pipe: Any) -> torch.Tensor:
    """Latents after every step (the pipeline's own loop, true CFG 2, seed 0), stacked."""
    g = torch.Generator().manual_seed(2)
    embeds = {
        f"{neg}{name}": torch.randn(1, *shape, generator=g)
        for neg in ("", "negative_")
        for name, shape in (("prompt_embeds", (TEXT, 16)), ("pooled_prompt_embeds", (8,)))
    }
    masks = {
        "prompt_attention_mask": MASKS["cond"].float(),
        "negative_prompt_attention_mask": MASKS["uncond"].float(),
    }
    seen: list[torch.Tensor] = []

    def keep(p: Any, i: int, t: Any, state: dict[str, Any]) -> dict[str, Any]:
        seen.append(state["latents"].clone())
        return {}

    with torch.no_grad():
        pipe(
            **embeds,
            **masks,
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            num_inference_steps=STEPS,
            true_cfg_scale=2.0,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            callback_on_step_end=keep,
        )
    return torch.stack(seen)


def _routed(pipe: Any) -> list[Any]:
    t = pipe.transformer
    return [b.attn.processor for b in (*t.transformer_blocks, *t.single_transformer_blocks)]


def _refiner(pipe: Any) -> list[Any]:
    blocks = pipe.transformer.context_embedder.token_refiner.refiner_blocks
    return [b.attn.processor for b in blocks]


# -- recording every routed call -----------------------------------------------------------------

#: layer, step, CFG pass, spec, text tokens, text first, prompt mask
Call = tuple[int, int, str | None, AttentionSpec, int, bool, torch.Tensor | None]


@pytest.fixture
def record(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Call]]:
    """Every routed call as `Call`; a non-BF16 cell must reach the kernels' `attention` with its
    spec and the call's text length, side and mask."""
    calls: list[Call] = []
    reached: list[Call] = []
    route, attend = hunyuan._route, router_module.attention

    def recording_route(
        processor: HunyuanVideoJointAttention, *args: Any, **kw: Any
    ) -> torch.Tensor:
        text: Text = args[-1]
        router, layer = processor.router, processor.layer
        spec = router.spec_for(layer)
        calls.append(
            (layer, router.step, router.pass_name, spec, text.tokens, text.first, text.mask)
        )
        return route(processor, *args, **kw)

    def recording_attention(*args: Any, spec: AttentionSpec, **kw: Any) -> torch.Tensor:
        layer, step, name = calls[-1][:3]
        reached.append((layer, step, name, spec, kw["text"], kw["text_first"], kw["text_mask"]))
        return attend(*args, spec=spec, **kw)

    monkeypatch.setattr(hunyuan, "_route", recording_route)
    monkeypatch.setattr(router_module, "attention", recording_attention)
    yield calls
    kernel_calls = [c for c in calls if c[3].mode is not Mode.BF16_DENSE]
    assert len(reached) == len(kernel_calls)
    for want, got in zip(kernel_calls, reached, strict=True):
        assert got[:6] == want[:6]
        assert want[6] is not None and got[6] is not None and torch.equal(got[6], want[6])


# -- through the pipeline ------------------------------------------------------------------------


def test_every_joint_call_runs_its_cell_with_the_calls_text(pipe: Any, record: list[Call]) -> None:
    refiner = _refiner(pipe)
    reference = _generate(pipe)
    policy = _policy(CELLS)
    fpstune.apply(pipe, policy)
    try:
        assert all(isinstance(p, HunyuanVideoJointAttention) for p in _routed(pipe))
        assert [p.layer for p in _routed(pipe)] == list(range(LAYERS))  # dual first, then single
        got = _generate(pipe)
    finally:
        fpstune.remove(pipe)
    keys = [(layer, step, name) for layer, step, name, *_ in record]
    want = [(lay, s, n) for s in range(STEPS) for n in ("cond", "uncond") for lay in range(LAYERS)]
    assert keys == want  # each (layer, step, pass) once, in the model's order
    for layer, step, name, spec, tokens, first, mask in record:
        assert spec == policy.spec(layer=layer, step=step) == CELLS[(step, layer)]
        assert (tokens, first) == (TEXT, False)
        assert mask is not None and torch.equal(mask, MASKS[str(name)]), (layer, step, name)
    assert {c[3].mode for c in record} == set(Mode)  # every mode ran
    # the token refiner's text-only attention kept diffusers' processors, never routed
    assert _refiner(pipe) == refiner
    assert not any(isinstance(p, HunyuanVideoJointAttention) for p in refiner)
    assert torch.isfinite(got).all()
    assert not torch.allclose(got[0], reference[0], atol=1e-6)  # step 0 ran FP8 / sparse cells


def test_an_all_bf16_policy_reproduces_the_pipeline_bit_for_bit(pipe: Any) -> None:
    reference = _generate(pipe)
    fpstune.apply(pipe, _policy({}))
    try:
        assert applied(pipe) is not None
        got = _generate(pipe)
    finally:
        fpstune.remove(pipe)
    assert torch.equal(got, reference)


def test_the_unfused_rotation_reproduces_the_pipeline_bit_for_bit(pipe: Any) -> None:
    reference = _generate(pipe)
    fpstune.apply(pipe, _policy({}), fuse_rope=False)
    try:
        assert not any(p.fuse_rope for p in _routed(pipe))
        got = _generate(pipe)
    finally:
        fpstune.remove(pipe)
    assert torch.equal(got, reference)


def test_a_policy_of_another_text_length_is_refused(pipe: Any) -> None:
    fpstune.apply(pipe, _policy(CELLS, text=TEXT + 1))
    try:
        with pytest.raises(PolicyMismatch) as e:
            _generate(pipe)
    finally:
        fpstune.remove(pipe)
    assert str(e.value).startswith("model.text: the model attends to 6 text tokens")
    assert "tuned for 7" in str(e.value)


def test_remove_restores_diffusers_processors(pipe: Any, adapter: Any) -> None:
    from diffusers.models.transformers.transformer_hunyuan_video import (
        HunyuanVideoAttnProcessor2_0,
    )

    before, refiner = _routed(pipe), _refiner(pipe)
    assert all(type(p) is HunyuanVideoAttnProcessor2_0 for p in before)
    fpstune.apply(pipe, _policy(CELLS))
    assert adapters.for_transformer(pipe.transformer) is adapters.get("hunyuanvideo")
    fpstune.remove(pipe)
    assert all(a is b for a, b in zip(_routed(pipe), before, strict=True))
    assert _refiner(pipe) == refiner
    assert pipe.transformer._diffusers_hook.get_hook("fpstune") is None
    assert applied(pipe) is None
    # a bare install is undone by the adapter's remove: diffusers' own processor again
    router = router_module.AttentionRouter()
    assert adapter.install(pipe.transformer, router) == LAYERS
    adapter.remove(pipe.transformer)
    assert all(type(p) is HunyuanVideoAttnProcessor2_0 for p in _routed(pipe))


def test_a_transformer_of_another_shape_is_refused() -> None:
    from diffusers import HunyuanVideoTransformer3DModel

    other: Any = HunyuanVideoTransformer3DModel(**{**CONFIG, "num_single_layers": 1})
    with pytest.raises(PolicyMismatch) as e:
        fpstune.apply(other, _policy(CELLS))
    assert str(e.value) == (
        "model.layers: the transformer has 3, the policy (tiny-hunyuan) was tuned for 4"
    )


# -- the adapter -----------------------------------------------------------------------------------

#: hunyuanvideo-community/HunyuanVideo transformer/config.json (the values shape() reads)
PUBLISHED = {
    "_class_name": "HunyuanVideoTransformer3DModel",
    "attention_head_dim": 128,
    "guidance_embeds": True,
    "in_channels": 16,
    "mlp_ratio": 4.0,
    "num_attention_heads": 24,
    "num_layers": 20,
    "num_refiner_layers": 2,
    "num_single_layers": 40,
    "out_channels": 16,
    "patch_size": 2,
    "patch_size_t": 1,
    "pooled_projection_dim": 768,
    "qk_norm": "rms_norm",
    "rope_axes_dim": [16, 56, 56],
    "rope_theta": 256.0,
    "text_embed_dim": 4096,
}


def test_shape_of_the_published_720p_model(adapter: Any) -> None:
    shape = adapter.shape(
        PUBLISHED, name="hunyuanvideo", height=720, width=1280, frames=129, steps=50, cfg=1
    )
    assert (shape.heads, shape.head_dim, shape.layers) == (24, 128, 60)
    assert shape.grid == (33, 45, 80)
    assert (shape.text, shape.steps, shape.cfg, shape.task) == (256, 50, 1, "t2v")
    with pytest.raises(BadInput, match=r"^--frames: 128 is not 1 \+ a multiple of 4$"):
        adapter.shape(PUBLISHED, name="x", height=720, width=1280, frames=128, steps=50, cfg=1)
    with pytest.raises(BadInput, match=r"^--height: 712 is not a multiple of 16$"):
        adapter.shape(PUBLISHED, name="x", height=712, width=1280, frames=129, steps=50, cfg=1)


def test_config_and_load_from_a_local_folder(adapter: Any, tmp_path: Path) -> None:
    root = tmp_path / "tiny-hunyuan"
    model = _transformer(3)
    model.save_pretrained(root / "transformer")
    _scheduler().save_config(root / "scheduler")
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(
        json.dumps({"temporal_compression_ratio": 4, "spatial_compression_ratio": 8})
    )
    config = adapter.config(root)
    assert config["num_single_layers"] == 2
    assert (config["vae_scale_factor_temporal"], config["vae_scale_factor_spatial"]) == (4, 8)
    assert adapter.config(root / "transformer")["num_layers"] == 2  # the transformer's folder
    loaded, scheduler = adapter.load(root)
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert not loaded.training
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    with pytest.raises(BadInput, match=r"no transformer config"):
        adapter.config(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(BadInput, match=r"config\.json: not a JSON transformer config"):
        adapter.config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_layers": 2}))
    with pytest.raises(BadInput, match=r"num_attention_heads: missing"):
        adapter.config(tmp_path)


def test_model_operations_refuse_in_one_line(adapter: Any) -> None:
    assert adapter.name == "hunyuanvideo" and adapter.end_to_end is False
    assert isinstance(HunyuanVideoAdapter(), adapters.ModelAdapter)
    assert adapter.serves(_transformer()) and not adapter.serves(torch.nn.Linear(1, 1))
    for call in (
        lambda: adapter.denoise(None, None, None, None),
        lambda: adapter.replay(None, None),
        lambda: adapter.capture(None, None, None, name="x", seeds=[0]),
        lambda: adapter.end_to_end_probe(seeds=[0], steps=1, guidance=1.0, device="cpu"),
    ):
        with pytest.raises(adapters.NoModel, match=r"^adapter hunyuanvideo has no .* yet") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(adapters.NoModel, match=r"^adapter hunyuanvideo needs a checkpoint"):
        adapter.config(None)


# -- HunyuanVideo 1.5 ------------------------------------------------------------------------------

#: 3 dual-stream blocks, 2 heads x 16; latents of 4 channels (+ 4 conditioning + 1 mask in)
CONFIG_15: dict[str, Any] = {
    "in_channels": 9,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 3,
    "num_refiner_layers": 1,
    "patch_size": 1,
    "patch_size_t": 1,
    "text_embed_dim": 16,
    "text_embed_2_dim": 8,
    "image_embed_dim": 8,
    "rope_axes_dim": (4, 6, 6),
    "task_type": "t2v",
}
#: 64 x 128 pixels x 9 frames -> latents (4, 3, 4, 8) (VAE 4 x 16 x 16, patch 1): 96 tokens
HEIGHT_15, WIDTH_15, GRID_15 = 64, 128, (3, 4, 8)
#: image tokens (the pipeline's 729, shrunk), glyph (ByT5) tokens, prompt tokens
IMAGE_15, GLYPH_15, PROMPT_15 = 3, 4, 6
TEXT_15 = IMAGE_15 + GLYPH_15 + PROMPT_15
#: glyph and prompt masks per pass; text to video masks the (zero) image tokens
MASKS_15 = {
    "pred_cond": ([1, 1, 0, 0], [1, 1, 1, 1, 0, 0]),
    "pred_uncond": ([1, 0, 0, 0], [1, 1, 1, 0, 0, 0]),
}
CELLS_15 = {
    (0, 0): _spec("fp8_dense", [1, 4, 4]),
    (0, 1): _spec("fp8_sparse", [1, 2, 4], "window"),
    (0, 2): _spec("bf16_sparse", [1, 4, 4], "topk"),
    (1, 0): BF16,
    (1, 1): _spec("bf16_sparse", [1, 2, 8], "topk"),
    (1, 2): _spec("fp8_dense", [3, 4, 8]),
}


def _kept_15(name: str) -> torch.Tensor:
    """The text mask 1.5's transformer hands its blocks: its valid tokens first."""
    glyph, prompt = MASKS_15[name]
    kept = sum(glyph) + sum(prompt)
    return torch.tensor([[i < kept for i in range(TEXT_15)]])


@pytest.fixture(scope="module")
def pipe15() -> Any:
    """A HunyuanVideo15Pipeline without text encoders, tiny VAE, CFG 3 through its guider."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )

    torch.manual_seed(4)
    transformer: Any = HunyuanVideo15Transformer3DModel(**CONFIG_15)
    pipe: Any = HunyuanVideo15Pipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer.eval(),
        vae=AutoencoderKLHunyuanVideo15(
            latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        text_encoder_2=None,
        tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=3.0),
    )
    pipe.vision_num_semantic_tokens = IMAGE_15
    return pipe


def _policy_15(cells: dict[tuple[int, int], AttentionSpec]) -> Policy:
    model = HunyuanVideo15Adapter().shape(
        dict(CONFIG_15),
        name="tiny-hunyuan-1.5",
        height=HEIGHT_15,
        width=WIDTH_15,
        frames=FRAMES,
        steps=STEPS,
        cfg=2,
        text=TEXT_15,
    )
    assert (model.grid, model.layers, model.task) == (GRID_15, 3, "t2v")
    return cell_policy(model, cells)


def _generate_15(pipe: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    kw: dict[str, torch.Tensor] = {}
    for neg, name in (("", "pred_cond"), ("negative_", "pred_uncond")):
        glyph, prompt = MASKS_15[name]
        kw[f"{neg}prompt_embeds"] = torch.randn(1, PROMPT_15, 16, generator=g)
        kw[f"{neg}prompt_embeds_mask"] = torch.tensor([prompt])
        kw[f"{neg}prompt_embeds_2"] = torch.randn(1, GLYPH_15, 8, generator=g)
        kw[f"{neg}prompt_embeds_mask_2"] = torch.tensor([glyph])
    seen: list[torch.Tensor] = []
    scheduler_step = pipe.scheduler.step

    def keep(*args: Any, **kwargs: Any) -> Any:  # the pipeline takes no step callback
        out = scheduler_step(*args, **kwargs)
        seen.append(out[0].clone())
        return out

    pipe.scheduler.step = keep
    try:
        with torch.no_grad():
            pipe(
                **kw,
                height=HEIGHT_15,
                width=WIDTH_15,
                num_frames=FRAMES,
                num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
            )
    finally:
        del pipe.scheduler.step
    return torch.stack(seen)


def _routed_15(pipe: Any) -> list[Any]:
    return [b.attn.processor for b in pipe.transformer.transformer_blocks]


def test_15_every_joint_call_runs_its_cell_with_the_calls_text(
    pipe15: Any, record: list[Call]
) -> None:
    refiner = [
        b.attn.processor for b in pipe15.transformer.context_embedder.token_refiner.refiner_blocks
    ]
    reference = _generate_15(pipe15)
    policy = _policy_15(CELLS_15)
    fpstune.apply(pipe15, policy)
    try:
        assert adapters.for_transformer(pipe15) is adapters.get("hunyuanvideo-1.5")
        assert [p.layer for p in _routed_15(pipe15)] == [0, 1, 2]
        got = _generate_15(pipe15)
    finally:
        fpstune.remove(pipe15)
    keys = [(layer, step, name) for layer, step, name, *_ in record]
    names = ("pred_cond", "pred_uncond")
    assert keys == [(lay, s, n) for s in range(STEPS) for n in names for lay in range(3)]
    for layer, step, name, spec, tokens, first, mask in record:
        assert spec == CELLS_15[(step, layer)]
        assert (tokens, first) == (TEXT_15, False)
        assert mask is not None and torch.equal(mask, _kept_15(str(name))), (layer, step, name)
    after = [
        b.attn.processor for b in pipe15.transformer.context_embedder.token_refiner.refiner_blocks
    ]
    assert after == refiner
    assert torch.isfinite(got).all()
    assert not torch.allclose(got[0], reference[0], atol=1e-6)


def test_15_an_all_bf16_policy_reproduces_the_pipeline_bit_for_bit(pipe15: Any) -> None:
    from diffusers.models.transformers.transformer_hunyuan_video15 import (
        HunyuanVideo15AttnProcessor2_0,
    )

    before = _routed_15(pipe15)
    reference = _generate_15(pipe15)
    fpstune.apply(pipe15, _policy_15({}))
    try:
        got = _generate_15(pipe15)
    finally:
        fpstune.remove(pipe15)
    assert torch.equal(got, reference)
    assert all(a is b for a, b in zip(_routed_15(pipe15), before, strict=True))
    adapter = adapters.get("hunyuanvideo-1.5")
    assert adapter.install(pipe15.transformer, router_module.AttentionRouter()) == 3
    adapter.remove(pipe15.transformer)
    assert all(type(p) is HunyuanVideo15AttnProcessor2_0 for p in _routed_15(pipe15))


def test_15_the_task_is_the_config_task_type(pipe15: Any) -> None:
    """1.5's text-to-video transformer takes conditioning channels (9 in, 4 out) like an I2V
    one: `apply` asks the routing, which reads ``task_type``."""
    fpstune.apply(pipe15, _policy_15({}))
    fpstune.remove(pipe15)
    t2v = _policy_15({}).model
    i2v = cell_policy(t2v.model_copy(update={"task": "i2v"}), {})
    with pytest.raises(PolicyMismatch, match=r"model\.task: .* \(t2v\), .* \(i2v\)"):
        fpstune.apply(pipe15, i2v)
    assert applied(pipe15) is None


def test_15_shape_of_the_published_720p_model() -> None:
    """diffusers' defaults for HunyuanVideo15Transformer3DModel (the published 8.3B model) with
    the 720p text-to-video checkpoint's task, 720 x 1280, 121 frames (VAE 4 x 16 x 16)."""
    config = {
        "num_attention_heads": 16,
        "attention_head_dim": 128,
        "num_layers": 54,
        "patch_size": 1,
        "patch_size_t": 1,
        "in_channels": 65,
        "out_channels": 32,
        "text_embed_2_dim": 1472,
        "image_embed_dim": 1152,
        "task_type": "t2v",
    }
    shape = HunyuanVideo15Adapter().shape(
        config, name="hv15", height=720, width=1280, frames=121, steps=50, cfg=2
    )
    assert (shape.heads, shape.head_dim, shape.layers) == (16, 128, 54)
    assert (shape.grid, shape.text, shape.task) == ((31, 45, 80), 1985, "t2v")
    i2v = HunyuanVideo15Adapter().shape(
        {**config, "task_type": "i2v"},
        name="x",
        height=720,
        width=1280,
        frames=121,
        steps=50,
        cfg=2,
    )
    assert i2v.task == "i2v"
