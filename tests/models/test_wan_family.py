"""The Wan family through `fpstune.apply`, each on a tiny random-config diffusers pipeline run by
its own ``__call__`` on CPU: Wan 2.2's two-expert A14B pair (one policy, the pipeline's step picks
the cell whichever expert runs it), a TI2V-5B-shaped model (``expand_timesteps``, Wan 2.2's 16 x
VAE) in both its modes, the 2.1 image-to-video pipeline (CLIP image tokens in cross-attention),
and the policy's ``model.task``."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from wan_helpers import CONFIG, FRAMES, GRID, HEIGHT, STEPS, TEXT_DIM, WIDTH, cell_policy

import fpstune
from fpstune.kernels import AttentionSpec, Mode, Policy
from fpstune.kernels.policy import Task
from fpstune.models import adapters, wan
from fpstune.models import processor as processor_module
from fpstune.models import router as router_module
from fpstune.models.apply import PolicyMismatch, applied
from fpstune.models.processor import WanSelfAttention

ROOT = Path(__file__).resolve().parents[2]
LAYERS = CONFIG["num_layers"]
BF16 = AttentionSpec(mode=Mode.BF16_DENSE)
#: a different cell for every (step, layer) of the tiny model (4 steps x 2 layers)
CELLS = {
    (0, 0): AttentionSpec(mode=Mode.FP8_DENSE, tile=(1, 3, 4)),
    (0, 1): AttentionSpec(mode=Mode.FP8_DENSE, tile=(3, 3, 4)),
    (1, 0): AttentionSpec.from_dict(
        {"mode": "bf16_sparse", "tile": [1, 3, 2], "sparsity": 0.5, "pattern": {"kind": "topk"}}
    ),
    (1, 1): AttentionSpec.from_dict(
        {"mode": "fp8_sparse", "tile": [1, 3, 4], "sparsity": 0.5, "pattern": {"kind": "window"}}
    ),
    (2, 0): AttentionSpec(mode=Mode.FP8_DENSE, tile=(1, 1, 4)),
    (2, 1): AttentionSpec.from_dict(
        {"mode": "bf16_sparse", "tile": [1, 3, 4], "sparsity": 0.5, "pattern": {"kind": "topk"}}
    ),
    (3, 0): AttentionSpec(mode=Mode.FP8_DENSE, tile=(1, 3, 2)),
    (3, 1): BF16,
}
#: boundary 875 of 1000: UniPC's 4 steps run at t = 999, 900 (high-noise expert), 750, 500
BOUNDARY_RATIO = 0.875
#: 2.1 I2V: the mask (4 channels: Wan's 4 frames per latent) and the image's latents join the
#: noise's 4 channels; CLIP hidden size 16 -> image tokens in cross-attention
I2V_CONFIG = {**CONFIG, "in_channels": 12, "image_dim": 16, "added_kv_proj_dim": 32}
#: 2.1 I2V cross-attention takes the last 512 tokens as text (hard-coded in diffusers)
I2V_TEXT_TOKENS = 512
#: TI2V-5B-shaped: latents of z_dim channels in and out, Wan 2.2's VAE (2 x 2 patchify, 16 x)
Z = 12
TI2V_CONFIG = {**CONFIG, "in_channels": Z, "out_channels": Z}
TI2V_HEIGHT, TI2V_WIDTH = 2 * HEIGHT, 2 * WIDTH  # 96 x 128 -> latents 6 x 8 -> grid 3 x 3 x 4


def _policy(
    cells: dict[tuple[int, int], AttentionSpec],
    *,
    task: Task = "t2v",
    config: dict[str, Any] = CONFIG,
    height: int = HEIGHT,
    width: int = WIDTH,
    scale: wan.VaeScale | None = None,
) -> Policy:
    model = wan.model_shape(
        config,
        name="tiny-wan",
        height=height,
        width=width,
        frames=FRAMES,
        steps=STEPS,
        cfg=2,
        scale=scale,
        task=task,
    )
    return cell_policy(model, cells)


def _scheduler(shift: float = 3.0) -> Any:
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
    )


def _vae(z: int = 4, *, wan22: bool = False) -> Any:
    """A tiny Wan VAE: 2.1's (4 x 8 x 8) or, ``wan22``, 2.2's (2 x 2 patchify, residual, 16 x)."""
    from diffusers import AutoencoderKLWan

    extra: dict[str, Any] = {}
    if wan22:
        extra = {"is_residual": True, "patch_size": 2, "in_channels": 12, "out_channels": 12}
        extra["scale_factor_spatial"] = 16
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=z,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z,
        latents_std=[1.0] * z,
        **extra,
    )


def _transformer(config: dict[str, Any], seed: int) -> Any:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**config).eval()


def _embeds(tokens: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(1, tokens, TEXT_DIM, generator=g),
        "negative_prompt_embeds": torch.randn(1, tokens, TEXT_DIM, generator=g),
    }


def _image(width: int = WIDTH, height: int = HEIGHT) -> Any:
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _generate(pipe: Any, *, tokens: int = 5, **kw: Any) -> torch.Tensor:
    """Latents after every step (the pipeline's own loop, CFG 5, seed 0), stacked."""
    seen: list[torch.Tensor] = []

    def keep(p: Any, i: int, t: Any, state: dict[str, Any]) -> dict[str, Any]:
        seen.append(state["latents"].clone())
        return {}

    size = {"height": HEIGHT, "width": WIDTH, "num_frames": FRAMES} | kw
    with torch.no_grad():
        pipe(
            **_embeds(tokens),
            **size,
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            callback_on_step_end=keep,
        )
    return torch.stack(seen)


# -- recording every self-attention call ---------------------------------------------------------


Call = tuple[str, int, int, str, AttentionSpec]  # expert, layer, step, CFG pass, spec


@pytest.fixture
def record(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[Call], dict[int, str]]]:
    """(expert, layer, step, CFG pass, spec) of every routed self-attention call; the test fills
    ``experts`` (id of a processor -> the expert's name). A BF16 cell runs SDPA, any other cell
    must reach the kernels' `attention` with its spec."""
    calls: list[Call] = []
    experts: dict[int, str] = {}
    route, attend = processor_module._route, router_module.attention

    def recording_route(processor: WanSelfAttention, *args: Any, **kw: Any) -> torch.Tensor:
        router = processor.router
        layer = processor.layer
        calls.append(
            (experts[id(processor)], layer, router.step, router.pass_name, router.spec_for(layer))
        )
        return route(processor, *args, **kw)

    def recording_attention(*args: Any, spec: AttentionSpec, **kw: Any) -> torch.Tensor:
        kernels_reached.append((*calls[-1][:4], spec))
        return attend(*args, spec=spec, **kw)

    kernels_reached: list[Any] = []
    monkeypatch.setattr(processor_module, "_route", recording_route)
    monkeypatch.setattr(router_module, "attention", recording_attention)
    yield calls, experts
    assert kernels_reached == [c for c in calls if c[4].mode is not Mode.BF16_DENSE]


def _name_experts(pipe: Any, experts: dict[int, str]) -> None:
    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name, None)
        for block in [] if module is None else module.blocks:
            assert isinstance(block.attn1.processor, WanSelfAttention)
            experts[id(block.attn1.processor)] = name


def _assert_every_call_ran_its_cell(
    calls: list[Call], policy: Policy, expert_of_step: dict[int, str]
) -> None:
    keys = Counter((expert, layer, step, name) for expert, layer, step, name, _ in calls)
    want = {
        (expert_of_step[s], lay, s, n)
        for lay in range(LAYERS)
        for s in range(STEPS)
        for n in ("cond", "uncond")
    }
    assert set(keys) == want and set(keys.values()) == {1}
    for _, layer, step, _, spec in calls:
        assert spec == policy.spec(layer=layer, step=step), (layer, step)


def _cross_attention(pipe: Any) -> list[Any]:
    return [
        type(b.attn2.processor)
        for name in ("transformer", "transformer_2")
        if getattr(pipe, name, None) is not None
        for b in getattr(pipe, name).blocks
    ]


# -- Wan 2.2 A14B: two experts, one policy -----------------------------------------------------


@pytest.fixture(scope="module")
def a14b() -> Any:
    """A two-expert WanPipeline: high-noise ``transformer`` (seed 0), low-noise
    ``transformer_2`` (seed 5), boundary 0.875: two steps each."""
    from diffusers import WanPipeline

    return WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=_vae(),
        scheduler=_scheduler(),
        transformer=_transformer(CONFIG, 0),
        transformer_2=_transformer(CONFIG, 5),
        boundary_ratio=BOUNDARY_RATIO,
    )


def _expert_of_step(pipe: Any) -> dict[int, str]:
    """Which expert the pipeline runs at each step, as diffusers decides it."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    boundary = pipe.config.boundary_ratio * scheduler.config.num_train_timesteps
    return {
        i: "transformer" if t >= boundary else "transformer_2"
        for i, t in enumerate(scheduler.timesteps)
    }


def test_a14b_each_expert_runs_the_cell_of_its_layer_and_step(
    a14b: Any, record: tuple[list[Call], dict[int, str]]
) -> None:
    calls, experts = record
    expert_of_step = _expert_of_step(a14b)
    assert set(expert_of_step.values()) == {"transformer", "transformer_2"}  # both run
    before = [b.attn1.processor for b in (*a14b.transformer.blocks, *a14b.transformer_2.blocks)]
    cross = _cross_attention(a14b)
    reference = _generate(a14b)
    policy = _policy(CELLS)
    fpstune.apply(a14b, policy)
    try:
        _name_experts(a14b, experts)
        got = _generate(a14b)
    finally:
        fpstune.remove(a14b)
    _assert_every_call_ran_its_cell(calls, policy, expert_of_step)
    assert _cross_attention(a14b) == cross  # cross-attention keeps diffusers' processors
    assert not torch.allclose(got[0], reference[0], atol=1e-6)  # step 0: FP8 cells
    # remove undid both experts
    after = [b.attn1.processor for b in (*a14b.transformer.blocks, *a14b.transformer_2.blocks)]
    assert after == before
    for expert in (a14b.transformer, a14b.transformer_2):
        assert expert._diffusers_hook.get_hook("fpstune") is None
    assert applied(a14b) is None


def test_a14b_an_all_bf16_policy_reproduces_the_pipeline_bit_for_bit(a14b: Any) -> None:
    reference = _generate(a14b)
    fpstune.apply(a14b, _policy({}))
    try:
        assert a14b.transformer._fpstune.router is a14b.transformer_2._fpstune.router
        got = _generate(a14b)
    finally:
        fpstune.remove(a14b)
    assert torch.equal(got, reference)


def test_a14b_an_expert_of_another_shape_is_refused_naming_it(a14b: Any) -> None:
    from diffusers import WanPipeline

    other = _transformer({**CONFIG, "num_attention_heads": 4, "attention_head_dim": 8}, 6)
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=a14b.vae,
        scheduler=a14b.scheduler,
        transformer=a14b.transformer,
        transformer_2=other,
        boundary_ratio=BOUNDARY_RATIO,
    )
    with pytest.raises(PolicyMismatch) as e:
        fpstune.apply(pipe, _policy(CELLS))
    assert str(e.value) == "model.heads: transformer_2 has 4, the policy (tiny-wan) was tuned for 2"
    assert applied(pipe) is None
    assert not any(isinstance(b.attn1.processor, WanSelfAttention) for b in pipe.transformer.blocks)


# -- TI2V-5B-shaped: expand_timesteps, Wan 2.2's VAE ---------------------------------------------


@pytest.fixture(scope="module")
def ti2v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TI2V-5B-shaped checkpoint folder (transformer, 16 x VAE, scheduler)."""
    from diffusers import WanPipeline

    root = tmp_path_factory.mktemp("wan") / "tiny-ti2v"
    torch.manual_seed(2)
    WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=_vae(Z, wan22=True),
        scheduler=_scheduler(5.0),
        transformer=_transformer(TI2V_CONFIG, 0),
        expand_timesteps=True,
    ).save_pretrained(root)
    return root


def test_ti2v_shape_takes_the_vae_compression_from_the_checkpoint(ti2v_dir: Path) -> None:
    adapter = adapters.get("wan-diffusers")
    config = adapter.config(ti2v_dir)
    assert wan.vae_scale(ti2v_dir) == wan.VaeScale(temporal=4, spatial=16)
    assert {k: config[k] for k in wan.VAE_SCALE_KEYS} == {
        "vae_scale_factor_temporal": 4,
        "vae_scale_factor_spatial": 16,
    }
    size: dict[str, Any] = {"height": TI2V_HEIGHT, "width": TI2V_WIDTH, "frames": FRAMES}
    shape = adapter.shape(config, name="tiny-ti2v", steps=STEPS, cfg=2, **size)
    assert (shape.heads, shape.head_dim, shape.layers, shape.grid) == (2, 16, 2, GRID)
    assert wan.latent_shape(config, scale=wan.config_scale(config), **size) == (Z, 3, 6, 8)
    # the VAE's scale without scale_factor_spatial in its config: 8 x its 2 x 2 patchify
    vae_config = ti2v_dir / "vae" / "config.json"
    data = json.loads(vae_config.read_text())
    del data["scale_factor_spatial"]
    bare = ti2v_dir.parent / "bare-ti2v"
    (bare / "vae").mkdir(parents=True)
    (bare / "vae" / "config.json").write_text(json.dumps(data))
    assert wan.vae_scale(bare).spatial == 16


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_ti2v_runs_the_policy_in_both_modes(
    ti2v_dir: Path, task: Task, record: tuple[list[Call], dict[int, str]]
) -> None:
    """Text to video (`WanPipeline`) and image to video (`WanImageToVideoPipeline`: the first
    latent frame is the image's, timestep 0 there) with ``expand_timesteps``: per-token
    timesteps, the grid from the hidden states."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    calls, experts = record
    t2v = WanPipeline.from_pretrained(
        ti2v_dir, tokenizer=None, text_encoder=None, local_files_only=True
    )
    pipe = t2v
    kw: dict[str, Any] = {"height": TI2V_HEIGHT, "width": TI2V_WIDTH}
    if task == "i2v":
        pipe = WanImageToVideoPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=t2v.vae,
            scheduler=t2v.scheduler,
            transformer=t2v.transformer,
            expand_timesteps=True,
        )
        kw["image"] = _image(TI2V_WIDTH, TI2V_HEIGHT)
    adapter = adapters.get("wan-diffusers")
    shape = adapter.shape(
        adapter.config(ti2v_dir),
        name="tiny-wan",
        height=TI2V_HEIGHT,
        width=TI2V_WIDTH,
        frames=FRAMES,
        steps=STEPS,
        cfg=2,
    )
    policy = _policy(
        CELLS,
        task=task,
        config=TI2V_CONFIG,
        height=TI2V_HEIGHT,
        width=TI2V_WIDTH,
        scale=wan.VaeScale(temporal=4, spatial=16),
    )
    assert policy.model == shape.model_copy(update={"task": task})
    cross = _cross_attention(pipe)
    fpstune.apply(pipe, policy)
    try:
        _name_experts(pipe, experts)
        _generate(pipe, **kw)
    finally:
        fpstune.remove(pipe)
    _assert_every_call_ran_its_cell(calls, policy, dict.fromkeys(range(STEPS), "transformer"))
    assert _cross_attention(pipe) == cross


# -- Wan 2.1 I2V: CLIP image tokens in cross-attention only --------------------------------------


@pytest.fixture(scope="module")
def i2v() -> Any:
    """A 2.1-style WanImageToVideoPipeline: tiny random CLIP vision encoder (built offline)."""
    pytest.importorskip("transformers")
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(4)
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=I2V_CONFIG["image_dim"],
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        image_encoder=clip,
        image_processor=processor,
        vae=_vae(),
        scheduler=_scheduler(),
        transformer=_transformer(I2V_CONFIG, 0),
    )


def test_i2v_runs_the_policy_on_self_attention_only(
    i2v: Any, record: tuple[list[Call], dict[int, str]]
) -> None:
    calls, experts = record
    image = _image()
    reference = _generate(i2v, tokens=I2V_TEXT_TOKENS, image=image)
    cross = _cross_attention(i2v)
    assert all(b.attn2.add_k_proj is not None for b in i2v.transformer.blocks)  # image tokens
    policy = _policy(CELLS, task="i2v", config=I2V_CONFIG)
    fpstune.apply(i2v, policy)
    try:
        _name_experts(i2v, experts)
        got = _generate(i2v, tokens=I2V_TEXT_TOKENS, image=image)
    finally:
        fpstune.remove(i2v)
    # diffusers' I2V loop gives no step index: the step is the timestep's in the scheduler
    _assert_every_call_ran_its_cell(calls, policy, dict.fromkeys(range(STEPS), "transformer"))
    assert _cross_attention(i2v) == cross
    assert not torch.allclose(got[0], reference[0], atol=1e-6)


def test_i2v_an_all_bf16_policy_reproduces_the_pipeline_bit_for_bit(i2v: Any) -> None:
    image = _image()
    reference = _generate(i2v, tokens=I2V_TEXT_TOKENS, image=image)
    fpstune.apply(i2v, _policy({}, task="i2v", config=I2V_CONFIG))
    try:
        got = _generate(i2v, tokens=I2V_TEXT_TOKENS, image=image)
    finally:
        fpstune.remove(i2v)
    assert torch.equal(got, reference)


def test_i2v_a14b_latent_conditioned_runs_both_experts(
    a14b: Any, record: tuple[list[Call], dict[int, str]]
) -> None:
    """Wan 2.2 A14B I2V: two experts, the image as conditioning channels only (no CLIP), and no
    step index from diffusers' loop: each expert's calls still get their (layer, step) cell."""
    from diffusers import WanImageToVideoPipeline

    calls, experts = record
    config = {**CONFIG, "in_channels": 12}
    pipe = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        image_encoder=None,
        image_processor=None,
        vae=a14b.vae,
        scheduler=_scheduler(),
        transformer=_transformer(config, 0),
        transformer_2=_transformer(config, 5),
        boundary_ratio=BOUNDARY_RATIO,
    )
    expert_of_step = _expert_of_step(pipe)
    assert set(expert_of_step.values()) == {"transformer", "transformer_2"}
    policy = _policy(CELLS, task="i2v", config=config)
    fpstune.apply(pipe, policy)
    try:
        _name_experts(pipe, experts)
        _generate(pipe, image=_image())
    finally:
        fpstune.remove(pipe)
    _assert_every_call_ran_its_cell(calls, policy, expert_of_step)
    assert applied(pipe) is None


def test_i2v_a_timestep_the_scheduler_does_not_have_says_what_to_do(i2v: Any) -> None:
    fpstune.apply(i2v, _policy(CELLS, task="i2v", config=I2V_CONFIG))
    try:
        x = torch.randn(1, I2V_CONFIG["in_channels"], 3, 6, 8)
        text = torch.randn(1, I2V_TEXT_TOKENS, TEXT_DIM)
        i2v.scheduler.set_timesteps(STEPS)
        with (
            pytest.raises(RuntimeError, match="no step index and the call's timestep"),
            i2v.transformer.cache_context("cond"),
        ):
            i2v.transformer(
                hidden_states=x, timestep=torch.tensor([123]), encoder_hidden_states=text
            )
    finally:
        fpstune.remove(i2v)


def test_a_policy_for_the_other_task_is_refused_in_one_line(i2v: Any, a14b: Any) -> None:
    with pytest.raises(PolicyMismatch) as e:
        fpstune.apply(i2v, _policy(CELLS, config=I2V_CONFIG))
    assert str(e.value) == (
        "model.task: WanImageToVideoPipeline generates image to video (i2v), the policy "
        "(tiny-wan) was tuned for text to video (t2v)"
    )
    with pytest.raises(PolicyMismatch) as e:
        fpstune.apply(a14b, _policy(CELLS, task="i2v"))
    assert str(e.value) == (
        "model.task: WanPipeline generates text to video (t2v), the policy (tiny-wan) was "
        "tuned for image to video (i2v)"
    )
    # a bare I2V transformer says so by its config (image tokens, conditioning channels)
    with pytest.raises(PolicyMismatch, match=r"^model.task: WanTransformer3DModel generates"):
        fpstune.apply(i2v.transformer, _policy(CELLS, config=I2V_CONFIG))
    assert applied(i2v) is None and applied(a14b) is None


# -- the policy's model.task ---------------------------------------------------------------------


def test_policies_without_a_task_are_t2v_and_keep_their_checksum(tmp_path: Path) -> None:
    shipped = sorted((ROOT / "docs" / "policies").glob("*.yaml"))
    assert shipped
    for file in shipped:
        data = yaml.safe_load(file.read_text())
        assert "task" not in data["model"]
        policy = Policy.from_dict(data)  # the checksum is checked against the content
        assert policy.model.task == "t2v"
        assert policy.to_dict()["checksum"] == data["checksum"]
    t2v, i2v = _policy(CELLS), _policy(CELLS, task="i2v")
    t2v.dump(tmp_path / "t2v.yaml")
    i2v.dump(tmp_path / "i2v.yaml")
    assert "task" not in yaml.safe_load((tmp_path / "t2v.yaml").read_text())["model"]
    assert yaml.safe_load((tmp_path / "i2v.yaml").read_text())["model"]["task"] == "i2v"
    back = Policy.load(tmp_path / "i2v.yaml")
    assert back == i2v and back.model.task == "i2v"
    assert t2v.checksum() != i2v.checksum()
