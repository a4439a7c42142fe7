"""The diffusers Wan adapter and `fpstune capture` on a tiny random-config checkpoint (CPU)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from wan_helpers import FRAMES, GRID, HEIGHT, LATENT, STEPS, WIDTH

from fpstune.cli.commands import main
from fpstune.kernels import AttentionSpec, Mode
from fpstune.models import wan
from fpstune.models.capture import capture, initial_latents, load_record, record_path, replay
from fpstune.models.loop import Conditions, Sampling, denoise
from fpstune.models.processor import install
from fpstune.models.prompts import load_prompt_embeds
from fpstune.models.router import AttentionRouter
from fpstune.quality.calibration import (
    CalibrationSet,
    check_fits,
    load_calibration,
    query_rows,
)

SEEDS = (0, 1)
LAYERS = 2


def _inputs(checkpoint: Path, prompt_file: Path) -> tuple[Conditions, Sampling]:
    config = wan.transformer_config(checkpoint)
    pos, neg = load_prompt_embeds(
        prompt_file, text_dim=config["text_dim"], videos=len(SEEDS), guided=True
    )
    sampling = Sampling(wan.load_scheduler(checkpoint), STEPS, guidance=5.0)
    return Conditions(initial_latents(SEEDS, LATENT), pos, neg), sampling


def test_model_shape_at_a_resolution(checkpoint: Path) -> None:
    config = wan.transformer_config(checkpoint)
    shape = wan.model_shape(
        config, name="tiny", height=HEIGHT, width=WIDTH, frames=FRAMES, steps=STEPS, cfg=2
    )
    assert (shape.heads, shape.head_dim, shape.layers, shape.grid) == (2, 16, LAYERS, GRID)
    # Wan 2.1 at 480p and 720p (patch 1x2x2, VAE 4x8x8): the grids DESIGN.md names.
    wan21 = {**config, "in_channels": 16}
    for (h, w), grid in (((480, 832), (21, 30, 52)), ((720, 1280), (21, 45, 80))):
        s = wan.model_shape(wan21, name="w", height=h, width=w, frames=81, steps=50, cfg=2)
        assert s.grid == grid


def test_hooks_reach_every_self_attention_call(checkpoint: Path, prompt_file: Path) -> None:
    transformer, _ = wan.load_wan(checkpoint)
    conditions, sampling = _inputs(checkpoint, prompt_file)
    seen: list[tuple[int, int, int]] = []
    router = AttentionRouter(
        observer=lambda layer, step, q, k, v: seen.append((layer, step, q.shape[0]))
    )
    install(transformer, router)
    # Independent count: diffusers' own forward hooks on every self-attention module.
    attn1_calls: list[int] = []
    for block in transformer.blocks:
        block.attn1.register_forward_pre_hook(lambda *_: attn1_calls.append(router.step))
    denoise(transformer, router, conditions, sampling)
    batch = 2 * len(SEEDS)  # uncond + cond batched in one call
    assert seen == [(layer, step, batch) for step in range(STEPS) for layer in range(LAYERS)]
    assert router.calls == {(layer, step): 1 for layer in range(LAYERS) for step in range(STEPS)}
    assert attn1_calls == [step for step in range(STEPS) for _ in range(LAYERS)]


def test_reference_run_is_bit_stable(checkpoint: Path, prompt_file: Path, tmp_path: Path) -> None:
    conditions, sampling = _inputs(checkpoint, prompt_file)
    runs = []
    for i in range(2):
        transformer, _ = wan.load_wan(checkpoint)
        out = tmp_path / f"{i}.safetensors"
        runs.append(
            capture(
                transformer,
                sampling,
                conditions,
                out=out,
                name="t",
                seeds=SEEDS,
                dtype=torch.float32,
            )
        )
    a, b = runs
    assert torch.equal(a.record.final, b.record.final)
    ca, cb = load_calibration(a.path), load_calibration(b.path)
    assert ca.tensors.keys() == cb.tensors.keys()
    for name, t in ca.tensors.items():
        assert torch.equal(t, cb.tensors[name]), name
    assert torch.isfinite(a.record.final).all() and a.record.final.abs().max() > 0


@pytest.mark.parametrize("fuse_rope", [True, False], ids=["rope-to-router", "rope-here"])
def test_processor_matches_diffusers_default(checkpoint: Path, fuse_rope: bool) -> None:
    transformer, _ = wan.load_wan(checkpoint)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, *LATENT, generator=g)
    text = torch.randn(2, 5, 16, generator=g)
    t = torch.tensor([900.0, 300.0])
    with torch.no_grad():
        ref = transformer(x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        router = AttentionRouter(grid=GRID)
        install(transformer, router, fuse_rope=fuse_rope)
        ours = transformer(x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert router.calls == {(layer, 0): 1 for layer in range(LAYERS)}
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, rel


def test_observer_sees_rotated_q_k_either_way(checkpoint: Path) -> None:
    """With the rotary tables handed to the router, an observer (capture) still gets q and k
    rotated, exactly as when the processor rotates them itself."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, *LATENT, generator=g)
    text = torch.randn(1, 5, 16, generator=g)
    seen: dict[bool, list[torch.Tensor]] = {}
    for fuse in (True, False):
        transformer, _ = wan.load_wan(checkpoint)
        got: list[torch.Tensor] = []
        router = AttentionRouter(grid=GRID, observer=lambda *a, got=got: got.extend(a[2:4]))
        install(transformer, router, fuse_rope=fuse)
        with torch.no_grad():
            transformer(x, timestep=torch.tensor([500.0]), encoder_hidden_states=text)
        seen[fuse] = got
    assert len(seen[True]) == 2 * LAYERS
    assert all(torch.equal(a, b) for a, b in zip(seen[True], seen[False], strict=True))


def _run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["fpstune", *args])
    with pytest.raises(SystemExit) as exc:
        main()
        raise SystemExit(0)
    return int(exc.value.code or 0)


def _capture_args(checkpoint: Path, prompt_file: Path, out: Path) -> list[str]:
    return [
        "capture", str(checkpoint), "-o", str(out), "--prompt-embeds", str(prompt_file),
        "--height", str(HEIGHT), "--width", str(WIDTH), "--frames", str(FRAMES),
        "--steps", str(STEPS), "--seeds", "0,1", "--device", "cpu", "--qkv-dtype", "float32",
    ]  # fmt: skip


def test_capture_cli_writes_a_study_calibration_and_replays(
    checkpoint: Path, prompt_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "calib.safetensors"
    args = _capture_args(checkpoint, prompt_file, out)
    assert _run_cli([*args, "--sample-steps", "0,3"], monkeypatch) == 0
    shape = wan.model_shape(
        wan.transformer_config(checkpoint),
        name="tiny-wan", height=HEIGHT, width=WIDTH, frames=FRAMES, steps=STEPS, cfg=2,
    )  # fmt: skip
    cal = load_calibration(out, model=shape)  # what a study does with calibration.source
    check_fits(cal, shape)
    meta = cal.meta
    assert meta.source == "captured" and meta.grid == meta.model_grid == GRID
    assert meta.cells == tuple((layer, step) for layer in range(LAYERS) for step in (0, 3))
    assert meta.tensor_shape == (2 * len(SEEDS), 2, 36, 16)
    assert cal.select(layers=[1], steps=[3]).cells == ((1, 3),)

    # Replay needs only the transformer: a folder with nothing else in it.
    alone = tmp_path / "alone"
    shutil.copytree(checkpoint / "transformer", alone / "transformer")
    record = load_record(record_path(out))
    assert record.seeds == SEEDS and record.steps == STEPS
    transformer = wan.load_transformer(alone)
    assert torch.equal(replay(transformer, record), record.final)

    # Under another policy the same record gives a different (but close) result: the router is
    # really in the loop.
    class Fp8Everywhere:
        def spec(self, *, layer: int, step: int) -> AttentionSpec:
            return AttentionSpec(mode=Mode.FP8_DENSE)

    fp8 = replay(transformer, record, AttentionRouter(policy=Fp8Everywhere()))
    rel = ((fp8 - record.final).norm() / record.final.norm()).item()
    assert 0 < rel < 0.2, rel


def _capture_at(
    checkpoint: Path, prompt_file: Path, out: Path, **kw: Any
) -> tuple[CalibrationSet, torch.Tensor]:
    conditions, sampling = _inputs(checkpoint, prompt_file)
    conditions = Conditions(  # grid 5 x 5 x 6, larger than GRID
        initial_latents(SEEDS, (4, 5, 10, 12)), conditions.prompt, conditions.negative
    )
    transformer, _ = wan.load_wan(checkpoint)
    cap = capture(
        transformer, sampling, conditions, out=out, name="t", seeds=SEEDS, dtype=torch.float32, **kw
    )
    return load_calibration(cap.path), cap.record.final


def test_max_tokens_samples_whole_query_boxes_and_keeps_every_key(
    checkpoint: Path, prompt_file: Path, tmp_path: Path
) -> None:
    grid, box = (5, 5, 6), (2, 2, 3)
    full, final = _capture_at(checkpoint, prompt_file, tmp_path / "full.safetensors", steps=[1])
    small, final_small = _capture_at(
        checkpoint, prompt_file, tmp_path / "small.safetensors", steps=[1], max_tokens=40,
        query_box=box,
    )  # fmt: skip
    rows = query_rows(grid, box, 40)
    assert small.query_index is not None and torch.equal(small.query_index, rows)
    assert full.query_index is None and full.meta.queries is None
    m = small.meta
    assert m.grid == m.model_grid == grid and m.queries == rows.numel() <= 40
    assert m.query_box == box and m.q_shape == (2 * len(SEEDS), 2, rows.numel(), 16)
    # whole boxes: every picked box (aligned to the origin) is entirely in
    t, h, w = (rows // 30, rows // 6 % 5, rows % 6)
    ids = (t // 2) * 6 + (h // 2) * 2 + w // 3
    for i in ids.unique():
        bt, bh = int(i) // 6, int(i) // 2 % 3
        size = (min(2, 5 - 2 * bt)) * (min(2, 5 - 2 * bh)) * 3
        assert int((ids == i).sum()) == size
    for layer in range(LAYERS):
        qf, kf, vf = full.qkv(layer, 1)
        q, k, v = small.qkv(layer, 1)
        assert torch.equal(k, kf) and torch.equal(v, vf)
        assert torch.equal(q, qf[:, :, rows])
    assert torch.equal(final_small, final)


def test_capture_streams_each_cell_to_its_own_shard(
    checkpoint: Path, prompt_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "c.safetensors"
    written: list[int] = []

    def count(step: int) -> None:
        written.append(len(list(tmp_path.glob("c.cells-*/*.safetensors"))))

    cal, _ = _capture_at(checkpoint, prompt_file, out, on_step=count)
    # After step i, its cells are on disk but the last one (written when the next call comes).
    assert written == [LAYERS * (i + 1) - 1 for i in range(STEPS)]
    (folder,) = tmp_path.glob("c.cells-*")
    assert len(list(folder.iterdir())) == LAYERS * STEPS == len(cal.cells)
    # a second capture to the same name replaces the shards; a failed one leaves nothing
    _capture_at(checkpoint, prompt_file, out, steps=[0])
    assert len(list(tmp_path.glob("c.cells-*"))) == 1
    assert load_calibration(out).cells == tuple((layer, 0) for layer in range(LAYERS))

    def fail(step: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _capture_at(checkpoint, prompt_file, tmp_path / "x.safetensors", on_step=fail)
    assert not list(tmp_path.glob("x.*"))


# -- bad input ------------------------------------------------------------------------------


def _broken(checkpoint: Path, tmp_path: Path, how: str) -> tuple[Path, str]:
    """A copy of the checkpoint broken ``how``; returns (directory, what the error names)."""
    root = tmp_path / "ckpt"
    if how == "no-dir":
        return root, str(root)
    shutil.copytree(checkpoint, root)
    if how == "no-transformer":
        shutil.rmtree(root / "transformer")
        return root, str(root / "transformer")
    if how == "no-scheduler-config":
        (root / "scheduler" / "scheduler_config.json").unlink()
        return root, str(root / "scheduler" / "scheduler_config.json")
    if how == "truncated-weights":
        w = root / "transformer" / wan.WEIGHTS
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        return root, str(w)
    if how == "bad-scheduler-class":
        f = root / "scheduler" / "scheduler_config.json"
        f.write_text(f.read_text().replace("UniPCMultistepScheduler", "NoSuchScheduler"))
        return root, str(f)
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    ["no-dir", "no-transformer", "no-scheduler-config", "truncated-weights", "bad-scheduler-class"],
)
def test_broken_checkpoint_is_one_line_exit_2(
    checkpoint: Path,
    prompt_file: Path,
    tmp_path: Path,
    how: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, names = _broken(checkpoint, tmp_path, how)
    out = tmp_path / "calib.safetensors"
    assert _run_cli(_capture_args(root, prompt_file, out), monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and names in err, err
    assert list(tmp_path.glob("calib*")) == []


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        (["--height", "50"], "--height"),
        (["--frames", "8"], "--frames"),
        (["--layers", "0,2"], "--layers"),
        (["--seeds", "a"], "--seeds"),
        (["--prompt", "a cat"], "--prompt-embeds"),  # both given
    ],
)
def test_bad_options_are_one_line_exit_2(
    checkpoint: Path,
    prompt_file: Path,
    tmp_path: Path,
    extra: list[str],
    names: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "calib.safetensors"
    assert _run_cli([*_capture_args(checkpoint, prompt_file, out), *extra], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and names in err, err
    assert list(tmp_path.glob("calib*")) == []


def test_bad_prompt_embeddings_name_file_and_field(
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from safetensors.torch import save_file

    bad = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": torch.zeros(1, 5, 8)}, str(bad))  # no negative, wrong dim
    out = tmp_path / "calib.safetensors"
    assert _run_cli(_capture_args(checkpoint, bad, out), monkeypatch) == 2
    err = capsys.readouterr().err
    assert f"{bad}: negative_prompt_embeds: missing" in err and err.count("\n") == 1
    assert _run_cli([*_capture_args(checkpoint, bad, out), "--guidance", "1"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert f"{bad}: prompt_embeds: dim 8, the model's text_dim is 16" in err
    # --prompt without a text encoder in the checkpoint: says what is missing.
    args = [
        a if a != "--prompt-embeds" else "--prompt" for a in _capture_args(checkpoint, bad, out)
    ]
    args[args.index("--prompt") + 1] = "a cat"
    assert _run_cli(args, monkeypatch) == 2
    err = capsys.readouterr().err
    assert "--prompt needs the checkpoint's text encoder" in err and err.count("\n") == 1


def test_truncated_weights_as_a_user_sees_it(
    checkpoint: Path, prompt_file: Path, tmp_path: Path
) -> None:
    root, names = _broken(checkpoint, tmp_path, "truncated-weights")
    out = tmp_path / "calib.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "fpstune", *_capture_args(root, prompt_file, out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and names in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_capture_encodes_prompt_with_the_checkpoints_text_encoder(
    pipeline_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer, UMT5EncoderModel

    out = tmp_path / "calib.safetensors"
    args = [
        "capture", str(pipeline_dir), "-o", str(out), "--prompt", "a cat runs",
        "--negative-prompt", "blurry", "--height", str(HEIGHT), "--width", str(WIDTH),
        "--frames", str(FRAMES), "--steps", "2", "--device", "cpu",
    ]  # fmt: skip
    assert _run_cli(args, monkeypatch) == 0
    record = load_record(record_path(out))
    # Independently: the T5 encoder's states of the real tokens, zero-padded to 512 (Wan's way).
    tokenizer = AutoTokenizer.from_pretrained(pipeline_dir / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(pipeline_dir / "text_encoder").eval()
    for text, got in (
        ("a cat runs", record.conditions.prompt),
        ("blurry", record.conditions.negative),
    ):
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            states = encoder(ids).last_hidden_state[0]
        n = states.shape[0]
        assert got is not None and got.shape == (1, 512, 16)
        torch.testing.assert_close(got[0, :n], states)
        assert not got[0, n:].any()
    assert load_calibration(out).meta.model_steps == 2
