"""`fpstune.apply(pipe, policy)` inside a real diffusers `WanPipeline`, called the way users call
it: the pipeline's own ``__call__`` (text encoder, transformer, UniPC scheduler, VAE), on CPU."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from wan_helpers import CONFIG, FRAMES, HEIGHT, STEPS, WIDTH, cell_policy

import fpstune
from fpstune.kernels import AttentionSpec, Mode, Policy
from fpstune.models import router as router_module
from fpstune.models import wan
from fpstune.models.apply import PolicyMismatch, applied
from fpstune.models.processor import WanSelfAttention

LAYERS = CONFIG["num_layers"]
BF16 = AttentionSpec(mode=Mode.BF16_DENSE)
#: a different cell per (layer, step) where it matters: step 0 the model's own attention
CELLS = {
    (1, 0): AttentionSpec(mode=Mode.FP8_DENSE, tile=(1, 3, 4)),
    (1, 1): AttentionSpec.from_dict(
        {"mode": "fp8_sparse", "tile": [1, 3, 4], "sparsity": 0.5, "pattern": {"kind": "window"}}
    ),
    (2, 0): AttentionSpec.from_dict(
        {"mode": "bf16_sparse", "tile": [1, 3, 2], "sparsity": 0.5, "pattern": {"kind": "topk"}}
    ),
    (2, 1): AttentionSpec(mode=Mode.FP8_DENSE, tile=(3, 3, 4)),
    (3, 0): AttentionSpec(mode=Mode.FP8_DENSE, tile=(1, 1, 4)),
}


def _policy(cells: dict[tuple[int, int], AttentionSpec], *, steps: int = STEPS) -> Policy:
    model = wan.model_shape(
        CONFIG, name="tiny-wan", height=HEIGHT, width=WIDTH, frames=FRAMES, steps=steps, cfg=2
    )
    return cell_policy(model, cells)


@pytest.fixture(scope="module")
def pipe(full_pipeline_dir: Path) -> Any:
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(full_pipeline_dir, local_files_only=True)


def _generate(pipe: Any, *, steps: int = STEPS, height: int = HEIGHT, **kw: Any) -> torch.Tensor:
    """Latents after every step (the pipeline's own loop, CFG 5, seed 0), stacked."""
    seen: list[torch.Tensor] = []

    def keep(p: Any, i: int, t: Any, state: dict[str, Any]) -> dict[str, Any]:
        seen.append(state["latents"].clone())
        return {}

    pipe(
        prompt="a cat runs",
        negative_prompt="blurry",
        height=height,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        callback_on_step_end=keep,
        **kw,
    )
    return torch.stack(seen)


@pytest.fixture
def record(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int, str, AttentionSpec]]]:
    """(layer, step, CFG pass, spec) of every self-attention call the router serves; a BF16
    cell runs SDPA, any other cell must reach the kernels' `attention` with its spec."""
    calls: list[tuple[int, int, str, AttentionSpec]] = []
    run, attend = router_module.AttentionRouter.run, router_module.attention

    def recording_run(self: Any, layer: int, *args: Any, **kw: Any) -> torch.Tensor:
        calls.append((layer, self.step, self.pass_name, self.spec_for(layer)))
        return run(self, layer, *args, **kw)

    def recording_attention(*args: Any, spec: AttentionSpec, **kw: Any) -> torch.Tensor:
        kernels_reached.append((*calls[-1][:3], spec))
        return attend(*args, spec=spec, **kw)

    kernels_reached: list[Any] = []
    monkeypatch.setattr(router_module.AttentionRouter, "run", recording_run)
    monkeypatch.setattr(router_module, "attention", recording_attention)
    yield calls
    assert kernels_reached == [c for c in calls if c[3].mode is not Mode.BF16_DENSE]


def test_every_self_attention_call_runs_its_cell_and_nothing_else_changes(
    pipe: Any, record: list[tuple[int, int, str, AttentionSpec]]
) -> None:
    reference = _generate(pipe)
    policy = _policy(CELLS)
    attn2 = [type(b.attn2.processor) for b in pipe.transformer.blocks]
    fpstune.apply(pipe, policy)
    try:
        got = _generate(pipe)
    finally:
        fpstune.remove(pipe)
    # every (layer, step, CFG pass) exactly once, with the policy's cell
    keys = Counter((layer, step, name) for layer, step, name, _ in record)
    want = {(lay, s, n) for lay in range(LAYERS) for s in range(STEPS) for n in ("cond", "uncond")}
    assert set(keys) == want and set(keys.values()) == {1}
    for layer, step, _, spec in record:
        assert spec == policy.spec(layer=layer, step=step), (layer, step)
    # cross-attention keeps diffusers' processors
    assert [type(b.attn2.processor) for b in pipe.transformer.blocks] == attn2
    # the latents follow BF16's bit for bit until the first step with a non-BF16 cell
    assert torch.equal(got[0], reference[0])  # step 0: every cell BF16
    assert not torch.allclose(got[1], reference[1], atol=1e-6)  # step 1: FP8 / sparse cells


def test_an_all_bf16_policy_reproduces_the_pipeline_bit_for_bit(pipe: Any) -> None:
    reference = _generate(pipe)
    fpstune.apply(pipe, _policy({}))
    try:
        got = _generate(pipe)
    finally:
        fpstune.remove(pipe)
    assert torch.equal(got, reference)


def test_remove_restores_the_original_processors(pipe: Any) -> None:
    before = [b.attn1.processor for b in pipe.transformer.blocks]
    fpstune.apply(pipe, _policy(CELLS))
    fpstune.apply(pipe, _policy(CELLS))  # a second apply replaces the first
    assert all(isinstance(b.attn1.processor, WanSelfAttention) for b in pipe.transformer.blocks)
    fpstune.remove(pipe)
    assert [b.attn1.processor for b in pipe.transformer.blocks] == before
    assert pipe.transformer._diffusers_hook.get_hook("fpstune") is None
    assert applied(pipe) is None


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"steps": STEPS + 2}, "steps: the pipeline runs 6 denoising steps, the policy was "
                               "tuned for 4"),
        ({"height": HEIGHT + 16}, "grid: the pipeline's latent-patch grid is 3x4x4, the policy was "
                                  "tuned for 3x3x4 (another resolution or frame count)"),
    ],
)  # fmt: skip
def test_another_step_count_or_resolution_is_refused_before_the_first_step(
    pipe: Any, kw: dict[str, Any], says: str, record: list[Any]
) -> None:
    fpstune.apply(pipe, _policy(CELLS))
    try:
        with pytest.raises(PolicyMismatch) as e:
            _generate(pipe, **kw)
    finally:
        fpstune.remove(pipe)
    assert str(e.value) == says
    assert record == []  # no attention call ran


def test_another_model_is_refused_at_apply(pipe: Any) -> None:
    policy = _policy({})
    other = policy.model.model_copy(update={"heads": 4})
    bad = Policy(model=other, hardware=policy.hardware, default=BF16)
    with pytest.raises(PolicyMismatch, match=r"^model.heads: the transformer has 2, the policy"):
        fpstune.apply(pipe, bad)
    assert applied(pipe) is None


def test_a_bare_transformer_outside_cache_context_says_what_to_do(pipe: Any) -> None:
    fpstune.apply(pipe.transformer, _policy(CELLS))
    try:
        x = torch.randn(1, CONFIG["in_channels"], 3, 6, 8)
        text = torch.randn(1, 5, CONFIG["text_dim"])
        with pytest.raises(RuntimeError, match="cache_context"):
            pipe.transformer(
                hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=text
            )
        with pipe.transformer.cache_context("cond", step_index=1, num_inference_steps=STEPS):
            out = pipe.transformer(
                hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=text
            )
        assert out.sample.shape == x.shape
    finally:
        fpstune.remove(pipe.transformer)


def test_torch_compile_runs_two_generations_without_recompiling(pipe: Any) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    fpstune.apply(pipe, _policy(CELLS))
    original = pipe.transformer
    pipe.transformer = torch.compile(original, backend="eager")
    try:
        # the first call compiles; any later guard failure (a step, a counter) is an error
        with torch._dynamo.config.patch(error_on_recompile=True):
            _generate(pipe)
            _generate(pipe)
    finally:
        pipe.transformer = original
        fpstune.remove(pipe)
        torch._dynamo.reset()
