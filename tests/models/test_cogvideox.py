"""CogVideoX through `fpstune.apply`, on tiny random-config diffusers pipelines run by their own
``__call__`` on CPU: joint [text, video] self-attention (text first, an odd 7 tokens, no mask)
routed per (layer, step), an all-BF16 policy reproducing the unpatched pipeline bit for bit
(1.0 with and without rotary embeddings, 1.5's temporal patches), the policy's text length,
`fpstune.remove`, and the attention shape of the published checkpoints."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from wan_helpers import cell_policy

import fpstune
from fpstune.errors import BadInput
from fpstune.kernels import AttentionSpec, Mode, Policy
from fpstune.models import adapters, cogvideox
from fpstune.models import router as router_module
from fpstune.models.apply import PolicyMismatch, applied
from fpstune.models.cogvideox import CogVideoXAdapter, CogVideoXSelfAttention
from fpstune.models.router import Text
from fpstune.models.routing import Dims

#: 2 layers, 2 heads x 16 (rotary: 4 + 6 + 6 channels for t, h, w), 7 text tokens of 16 channels;
#: 32 x 48 pixels x 9 frames -> latents (3, 4, 4, 6) frame-major -> grid 3 x 2 x 3 = 18 tokens
TEXT_DIM = 16
TEXT = 7
CONFIG: dict[str, Any] = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "time_embed_dim": 8,
    "text_embed_dim": TEXT_DIM,
    "num_layers": 2,
    "sample_width": 6,
    "sample_height": 4,
    "sample_frames": 9,
    "patch_size": 2,
    "max_text_seq_length": TEXT,
    "use_rotary_positional_embeddings": True,
}
#: CogVideoX1.5-shaped: 2 latent frames per patch; 9 frames -> 3 latent frames, padded to 4 by
#: the pipeline -> grid 2 x 2 x 3
CONFIG_15 = {**CONFIG, "patch_size_t": 2}
#: CogVideoX-2B-shaped: no rotary embedding (sinusoidal positions added at the patch embedding)
CONFIG_2B = {**CONFIG, "use_rotary_positional_embeddings": False}
HEIGHT, WIDTH, FRAMES = 32, 48, 9
GRID = (3, 2, 3)
STEPS = 2
LAYERS = CONFIG["num_layers"]
BF16 = AttentionSpec(mode=Mode.BF16_DENSE)
#: a different cell for every (step, layer): FP8 dense, FP8 sparse window, BF16 sparse top-k,
#: BF16 dense
CELLS = {
    (0, 0): AttentionSpec(mode=Mode.FP8_DENSE, tile=(1, 2, 3)),
    (0, 1): AttentionSpec.from_dict(
        {"mode": "fp8_sparse", "tile": [1, 2, 3], "sparsity": 0.5, "pattern": {"kind": "window"}}
    ),
    (1, 0): AttentionSpec.from_dict(
        {"mode": "bf16_sparse", "tile": [1, 1, 3], "sparsity": 0.5, "pattern": {"kind": "topk"}}
    ),
    (1, 1): BF16,
}
#: the real configs' attention-relevant values (THUDM/CogVideoX-5b, CogVideoX1.5-5B)
COGVIDEOX_5B = {
    "num_attention_heads": 48,
    "attention_head_dim": 64,
    "num_layers": 42,
    "patch_size": 2,
    "patch_size_t": None,
    "in_channels": 16,
    "out_channels": 16,
    "max_text_seq_length": 226,
    "sample_height": 60,
    "sample_width": 90,
    "use_rotary_positional_embeddings": True,
}
COGVIDEOX_15_5B = {**COGVIDEOX_5B, "patch_size_t": 2, "sample_height": 300, "sample_width": 300}


@pytest.fixture(scope="module")
def adapter() -> CogVideoXAdapter:
    """The built-in ``cogvideox`` adapter."""
    found = adapters.get("cogvideox")
    assert isinstance(found, CogVideoXAdapter)
    return found


def _transformer(config: dict[str, Any], seed: int = 0) -> Any:
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model: Any = CogVideoXTransformer3DModel(**config)
    return model.eval()


def _pipeline(config: dict[str, Any]) -> Any:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    # the pipeline reads the VAE's scale only (8 x: 4 blocks; 4 frames per latent)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    return CogVideoXPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=_transformer(config),
        scheduler=CogVideoXDDIMScheduler(),
    )


@pytest.fixture(scope="module")
def pipe() -> Any:
    return _pipeline(CONFIG)


def _policy(cells: dict[tuple[int, int], AttentionSpec], config: dict[str, Any] = CONFIG) -> Policy:
    model = cogvideox.model_shape(
        config, name="tiny-cogvideox", height=HEIGHT, width=WIDTH, frames=FRAMES, steps=STEPS, cfg=2
    )
    return cell_policy(model, cells)


def _generate(pipe: Any, tokens: int = TEXT) -> torch.Tensor:
    """Latents after every step (the pipeline's own loop, CFG 5 batched, seed 0), stacked."""
    seen: list[torch.Tensor] = []

    def keep(p: Any, i: int, t: Any, state: dict[str, Any]) -> dict[str, Any]:
        seen.append(state["latents"].clone())
        return {}

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        pipe(
            prompt_embeds=torch.randn(1, tokens, TEXT_DIM, generator=g),
            negative_prompt_embeds=torch.randn(1, tokens, TEXT_DIM, generator=g),
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            callback_on_step_end=keep,
        )
    return torch.stack(seen)


def _processors(pipe: Any) -> list[Any]:
    return [block.attn1.processor for block in pipe.transformer.transformer_blocks]


# -- (a) every call runs its cell --------------------------------------------------------------

#: layer, step, CFG pass, spec, text, tokens
Call = tuple[int, int, str | None, AttentionSpec, Text, int]


@pytest.fixture
def record(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Call]]:
    """(layer, step, CFG pass, spec, text, tokens) of every routed self-attention call. A BF16
    cell runs SDPA; every other cell must reach the kernels' `attention` with its spec and the
    text tokens first."""
    calls: list[Call] = []
    reached: list[tuple[AttentionSpec, int, bool, Any, int]] = []
    route, attend = cogvideox._route, router_module.attention

    def recording_route(
        processor: CogVideoXSelfAttention, q: torch.Tensor, *args: Any, **kw: Any
    ) -> torch.Tensor:
        router, layer = processor.router, processor.layer
        text = args[-1]
        step = router.step
        calls.append((layer, step, router.pass_name, router.spec_for(layer), text, q.shape[2]))
        return route(processor, q, *args, **kw)

    def recording_attention(*args: Any, spec: AttentionSpec, **kw: Any) -> torch.Tensor:
        reached.append((spec, kw["text"], kw["text_first"], kw["text_mask"], args[0].shape[2]))
        return attend(*args, spec=spec, **kw)

    monkeypatch.setattr(cogvideox, "_route", recording_route)
    monkeypatch.setattr(router_module, "attention", recording_attention)
    yield calls
    video = GRID[0] * GRID[1] * GRID[2]
    want = [
        (c[3], TEXT, True, None, TEXT + video) for c in calls if c[3].mode is not Mode.BF16_DENSE
    ]
    assert reached == want


def test_every_joint_self_attention_call_runs_the_cell_of_its_layer_and_step(
    pipe: Any, record: list[Call]
) -> None:
    reference = _generate(pipe)
    policy = _policy(CELLS)
    fpstune.apply(pipe, policy)
    try:
        assert all(isinstance(p, CogVideoXSelfAttention) for p in _processors(pipe))
        got = _generate(pipe)
    finally:
        fpstune.remove(pipe)
    # CFG runs batched: one call per (layer, step), both prompts in it
    keys = [(layer, step) for layer, step, *_ in record]
    assert sorted(keys) == [(lay, s) for lay in range(LAYERS) for s in range(STEPS)]
    video = GRID[0] * GRID[1] * GRID[2]
    for layer, step, pass_name, spec, text, tokens in record:
        assert spec == policy.spec(layer=layer, step=step) == CELLS[(step, layer)]
        assert (pass_name, text, tokens) == ("cond_uncond", Text(TEXT, first=True), TEXT + video)
    assert not torch.allclose(got[0], reference[0], atol=1e-6)  # step 0: FP8 cells ran


# -- (b) an all-BF16 policy is the unpatched pipeline ------------------------------------------

VARIANTS = {
    "1.0-rope-fused": (CONFIG, True),
    "1.0-rope-in-processor": (CONFIG, False),
    "2b-no-rope": (CONFIG_2B, True),
    "1.5-patch-t": (CONFIG_15, True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_an_all_bf16_policy_reproduces_the_pipeline_bit_for_bit(variant: str) -> None:
    config, fuse_rope = VARIANTS[variant]
    pipe = _pipeline(config)
    reference = _generate(pipe)
    policy = _policy({}, config)
    if config is CONFIG_15:  # 3 latent frames padded to 4, 2 per patch
        assert policy.model.grid == (2, 2, 3)
    fpstune.apply(pipe, policy, fuse_rope=fuse_rope)
    try:
        router = applied(pipe).router  # type: ignore[union-attr]
        got = _generate(pipe)
        assert router.grid == policy.model.grid
        assert router.calls == {(lay, s): 1 for lay in range(LAYERS) for s in range(STEPS)}
    finally:
        fpstune.remove(pipe)
    assert torch.equal(got, reference)


def test_the_rotation_is_diffusers_own_on_the_pipelines_tables() -> None:
    """`fpstune.kernels.rope.rotary` (what the router and the kernels apply) is bit for bit
    diffusers' ``apply_rotary_emb`` on the tables CogVideoX's pipeline builds (5B: crop-region
    linspace grid; 1.5: slice grid), in fp32 and bf16: the processor may hand them over."""
    from diffusers import CogVideoXPipeline
    from diffusers.models.embeddings import apply_rotary_emb

    from fpstune.kernels.rope import rotary

    for config, frames in ((COGVIDEOX_5B, 13), (COGVIDEOX_15_5B, 11)):
        stub = SimpleNamespace(
            vae_scale_factor_spatial=8,
            transformer=SimpleNamespace(config=SimpleNamespace(**config)),
        )
        cos, sin = CogVideoXPipeline._prepare_rotary_positional_embeddings(
            stub,
            480,
            720,
            frames,
            torch.device("cpu"),
        )
        tokens = (frames if config["patch_size_t"] is None else (frames + 1) // 2) * 30 * 45
        assert cos.shape == sin.shape == (tokens, 64)
        g = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(1, 2, tokens, 64, generator=g).to(dtype)
            want: Any = apply_rotary_emb(x, (cos, sin))  # type: ignore[arg-type]
            assert torch.equal(rotary(x, cos, sin), want), dtype


# -- (c) the policy's text length ----------------------------------------------------------------


def test_a_policy_for_another_text_length_is_refused_naming_model_text(pipe: Any) -> None:
    model = _policy({}).model.model_copy(update={"text": 5})
    before = _processors(pipe)
    fpstune.apply(pipe, cell_policy(model, {}))
    try:
        with pytest.raises(PolicyMismatch) as e:
            _generate(pipe)
    finally:
        fpstune.remove(pipe)
    assert str(e.value) == (
        "model.text: the model attends to 7 text tokens with the video, the policy "
        "(tiny-cogvideox) was tuned for 5"
    )
    assert _processors(pipe) == before


# -- (d) remove ----------------------------------------------------------------------------------


def test_remove_restores_diffusers_own_processors(pipe: Any, adapter: CogVideoXAdapter) -> None:
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    before = _processors(pipe)
    assert all(type(p) is CogVideoXAttnProcessor2_0 for p in before)
    assert adapters.for_transformer(pipe) is adapter
    fpstune.apply(pipe, _policy(CELLS))
    assert all(isinstance(p, CogVideoXSelfAttention) for p in _processors(pipe))
    assert [p.layer for p in _processors(pipe)] == list(range(LAYERS))
    fpstune.remove(pipe)
    assert _processors(pipe) == before  # the very objects apply replaced
    assert pipe.transformer._diffusers_hook.get_hook("fpstune") is None
    assert applied(pipe) is None
    # the adapter's own install / remove (no apply): diffusers' processor comes back
    router = router_module.AttentionRouter()
    assert adapter.install(pipe.transformer, router) == LAYERS
    assert all(isinstance(p, CogVideoXSelfAttention) for p in _processors(pipe))
    adapter.remove(pipe.transformer)
    assert all(type(p) is CogVideoXAttnProcessor2_0 for p in _processors(pipe))
    adapter.remove(pipe.transformer)  # idempotent


# -- (e) shapes, configs, loading ----------------------------------------------------------------


def test_shape_of_the_published_checkpoints(adapter: CogVideoXAdapter) -> None:
    five_b = adapter.shape(
        COGVIDEOX_5B, name="cogvideox-5b", height=480, width=720, frames=49, steps=50, cfg=2
    )
    assert (five_b.heads, five_b.head_dim, five_b.layers) == (48, 64, 42)
    assert (five_b.grid, five_b.text, five_b.task) == ((13, 30, 45), 226, "t2v")
    # 1.5: 81 frames -> 21 latent frames, padded to 22 -> 11 temporal patches; 768 x 1360
    one_five = adapter.shape(
        COGVIDEOX_15_5B, name="cogvideox1.5-5b", height=768, width=1360, frames=81, steps=50, cfg=2
    )
    assert (one_five.grid, one_five.text) == ((11, 48, 85), 226)
    # I2V: the image's latents join the noise's channels
    i2v = {**COGVIDEOX_5B, "in_channels": 32}
    shape = adapter.shape(i2v, name="i2v", height=480, width=720, frames=49, steps=50, cfg=2)
    assert shape.task == "i2v"
    with pytest.raises(BadInput, match=r"^--frames: 48 is not 1 \+ a multiple of 4$"):
        adapter.shape(COGVIDEOX_5B, name="x", height=480, width=720, frames=48, steps=50, cfg=2)
    with pytest.raises(BadInput, match=r"^--height: 488 is not a multiple of 16$"):
        adapter.shape(COGVIDEOX_5B, name="x", height=488, width=720, frames=49, steps=50, cfg=2)


def test_routing_reads_the_frame_major_grid_and_the_dims() -> None:
    routing = cogvideox.COGVIDEOX
    for config, frames, grid in ((CONFIG, 3, (3, 2, 3)), (CONFIG_15, 4, (2, 2, 3))):
        transformer = _transformer(config)
        latents = torch.zeros(2, frames, 4, 4, 6)  # (batch, frames, channels, height, width)
        assert routing.grid(transformer, (), {"hidden_states": latents}) == grid
        assert routing.grid(transformer, (latents,), {}) == grid
        assert routing.dims(transformer) == Dims(heads=2, head_dim=16, layers=2)
    with pytest.raises(ValueError, match="not divisible by the patch size \\(2, 2, 2\\)"):
        routing.grid(transformer, (torch.zeros(1, 3, 4, 4, 6),), {})


def test_config_and_load_read_local_directories_only(
    tmp_path: Path, adapter: CogVideoXAdapter
) -> None:
    from diffusers import CogVideoXDDIMScheduler

    root = tmp_path / "tiny-cogvideox"
    model = _transformer(CONFIG)
    model.save_pretrained(root / "transformer")
    scheduler: Any = CogVideoXDDIMScheduler()
    scheduler.save_pretrained(root / "scheduler")
    config = adapter.config(root)
    assert config["max_text_seq_length"] == TEXT and adapter.config(root / "transformer") == config
    shape = adapter.shape(
        config, name="t", height=HEIGHT, width=WIDTH, frames=FRAMES, steps=STEPS, cfg=2
    )
    assert (shape.grid, shape.text) == (GRID, TEXT)
    transformer, loaded = adapter.load(root)
    assert isinstance(loaded, CogVideoXDDIMScheduler) and not transformer.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(transformer.state_dict()[name], tensor), name
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = {
        f"{empty}/transformer/config.json: no transformer config": None,
        f"{empty}/config.json: not a JSON transformer config": "{not json",
        f"{empty}/config.json: attention_head_dim: missing": json.dumps({"num_attention_heads": 2}),
    }
    for message, text in refused.items():
        if text is not None:
            (empty / "config.json").write_text(text)
        with pytest.raises(BadInput, match="^" + re.escape(message)):
            adapter.config(empty)
    (root / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(BadInput, match=r"scheduler/scheduler_config.json: no scheduler config$"):
        adapter.load(root)


def test_capture_and_replay_are_refused_in_one_line(adapter: CogVideoXAdapter) -> None:
    from fpstune.models.adapters import NoModel

    calls = {
        "denoise": lambda: adapter.denoise(None, router_module.AttentionRouter(), None, None),  # type: ignore[arg-type]
        "replay": lambda: adapter.replay(None, None),  # type: ignore[arg-type]
        "capture": lambda: adapter.capture(None, None, None, name="x", seeds=[0]),  # type: ignore[arg-type]
        "end_to_end_probe": lambda: adapter.end_to_end_probe(
            seeds=[0], steps=2, guidance=5.0, device="cpu"
        ),
    }
    for what, call in calls.items():
        with pytest.raises(NoModel, match=r"^adapter cogvideox has no .* yet") as e:
            call()
        assert "\n" not in str(e.value), what
    assert adapter.end_to_end is False
