"""The model-adapter registry: built-ins, lookups, a plug-in through an entry point, and that the
built-in adapters give what the functions they delegate to give."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from shared_helpers import install_plugin
from wan_helpers import CONFIG, FRAMES, GRID, HEIGHT, WIDTH

import fpstune
from fpstune.kernels import AttentionSpec, Mode, Policy
from fpstune.kernels.fingerprint import current_fingerprint
from fpstune.kernels.policy import ModelShape
from fpstune.models import adapters, mini, wan
from fpstune.models.apply import PolicyMismatch
from fpstune.models.processor import WanSelfAttention
from fpstune.models.router import AttentionRouter
from fpstune.spec import BadInput, load_study

ROOT = Path(__file__).resolve().parents[2]
BUILTIN = (
    "cogvideox",
    "hunyuanvideo",
    "hunyuanvideo-1.5",
    "ltx-video",
    "mini",
    "synthetic",
    "wan-diffusers",
)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A private copy of the registry, entry points not yet read."""
    monkeypatch.setattr(adapters, "_registry", dict(adapters._registry))
    monkeypatch.setattr(adapters, "_broken", {})
    monkeypatch.setattr(adapters, "_plugins_loaded", False)
    yield


class Toy(adapters.SyntheticAdapter):
    name = "toy"


def test_registry_round_trip(registry: None) -> None:
    assert adapters.names() == BUILTIN
    toy = Toy()
    assert adapters.register(toy) is toy
    assert adapters.get("toy") is toy
    assert adapters.names() == tuple(sorted((*BUILTIN, "toy")))
    with pytest.raises(ValueError, match=r"^adapter 'toy' is already registered \(Toy\)$"):
        adapters.register(Toy())
    again = adapters.register(Toy(), replace=True)
    assert adapters.get("toy") is again is not toy
    with pytest.raises(TypeError, match=r"^object is not a ModelAdapter \(missing name, "):
        adapters.register(object())  # type: ignore[arg-type]


def test_unknown_name_is_one_line_listing_the_registered(registry: None) -> None:
    with pytest.raises(adapters.UnknownAdapter) as e:
        adapters.get("hf")
    assert str(e.value) == f"unknown adapter 'hf' (registered: {', '.join(BUILTIN)})"


def test_synthetic_has_no_model() -> None:
    synthetic = adapters.get("synthetic")
    assert not synthetic.end_to_end and adapters.get("mini").end_to_end
    with pytest.raises(adapters.NoModel, match=r"^adapter synthetic has no model"):
        synthetic.load(None)
    assert not synthetic.serves(torch.nn.Linear(2, 2))


# -- a plug-in through the entry point group ----------------------------------------------------

PLUGIN = """
    import torch
    from fpstune.models.adapters import SyntheticAdapter

    class ToyNet(torch.nn.Module):
        pass

    class ToyAdapter(SyntheticAdapter):
        name = "toy-video"
        end_to_end = True

        def serves(self, transformer):
            return isinstance(transformer, ToyNet)
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: None) -> Any:
    """A distribution on sys.path (``toy-fpstune``) whose entry points name a toy adapter and a
    broken one; nothing in fpstune is edited."""
    install_plugin(
        tmp_path / "site",
        monkeypatch,
        group=adapters.ENTRY_POINT_GROUP,
        entry_points={
            "toy-video": "toy_fpstune_adapter:ToyAdapter",
            "broken": "toy_fpstune_adapter:missing",
        },
        modules={"toy_fpstune_adapter": PLUGIN},
    )
    return importlib.import_module("toy_fpstune_adapter")


def test_an_entry_point_plugs_in_an_adapter(plugin: Any) -> None:
    with pytest.warns(RuntimeWarning, match=r"entry point 'broken' .* skipped"):
        assert adapters.names() == tuple(sorted((*BUILTIN, "toy-video")))
    toy = adapters.get("toy-video")
    assert type(toy).__name__ == "ToyAdapter"
    assert adapters.for_transformer(plugin.ToyNet()) is toy
    with pytest.raises(adapters.UnknownAdapter, match=r"its entry point failed to load: .*missing"):
        adapters.get("broken")
    assert adapters.names() == tuple(sorted((*BUILTIN, "toy-video")))  # read once


def test_a_study_names_a_plugged_in_adapter_with_end_to_end(plugin: Any, tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "studies" / "mini.yaml").read_text())
    for key in ("kernel_space", "schedule_space"):
        data[key] = str((ROOT / "studies" / data[key]).resolve())
    data["model"]["adapter"] = "toy-video"
    data["end_to_end"] = {"seeds": [0]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.warns(RuntimeWarning):
        assert load_study(path).model.adapter == "toy-video"
    data["model"]["adapter"] = "wan-diffusers"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(BadInput) as e:
        load_study(path)
    assert str(e.value) == (
        f"{path}: end_to_end: needs a captured calibration.source with its replay record "
        "(fpstune capture); calibration.source is synthetic"
    )
    data["model"]["adapter"] = "synthetic"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(BadInput, match=r"adapters that do: mini, toy-video, wan-diffusers\)"):
        load_study(path)


# -- the built-ins give what today's functions give ---------------------------------------------


def test_wan_adapter_shape_and_load_are_wans(checkpoint: Path) -> None:
    adapter = adapters.get("wan-diffusers")
    config = adapter.config(checkpoint)
    assert config == wan.transformer_config(checkpoint)
    size: dict[str, Any] = {"height": HEIGHT, "width": WIDTH, "frames": FRAMES}
    shape = adapter.shape(config, name="tiny", steps=4, cfg=2, **size)
    assert shape == wan.model_shape(config, name="tiny", steps=4, cfg=2, **size)
    assert (shape.heads, shape.head_dim, shape.layers, shape.grid) == (2, 16, 2, GRID)
    transformer, scheduler = adapter.load(checkpoint)
    assert type(scheduler).__name__ == "UniPCMultistepScheduler"
    assert adapters.for_transformer(transformer) is adapter
    compiled = SimpleNamespace(_orig_mod=transformer)  # what torch.compile wraps it in
    assert adapters.for_transformer(SimpleNamespace(transformer=compiled)) is adapter


def test_mini_adapter_shape_is_the_mini_studys() -> None:
    adapter = adapters.get("mini")
    shape = adapter.shape(
        adapter.config(None),
        name="mini",
        height=mini.HEIGHT,
        width=mini.WIDTH,
        frames=mini.FRAMES,
        steps=mini.STEPS,
        cfg=2,
    )
    study = load_study(ROOT / "studies" / "mini-e2e.yaml")
    assert shape == study.model.shape()
    assert shape.grid == mini.GRID
    model = mini.build_mini(random_init=True)
    assert adapters.for_transformer(model) is adapter  # a Wan transformer of the mini's config


def test_install_and_remove_routing(checkpoint: Path) -> None:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    adapter = adapters.get("wan-diffusers")
    transformer, _ = adapter.load(checkpoint)
    assert adapter.install(transformer, AttentionRouter()) == CONFIG["num_layers"]
    assert all(isinstance(b.attn1.processor, WanSelfAttention) for b in transformer.blocks)
    adapter.remove(transformer)
    assert all(isinstance(b.attn1.processor, WanAttnProcessor) for b in transformer.blocks)


# -- fpstune.apply asks the registry --------------------------------------------------------------


def test_apply_refuses_a_transformer_no_adapter_serves() -> None:
    class OtherTransformer3DModel(torch.nn.Module):
        """A video transformer class no built-in adapter knows."""

    other = OtherTransformer3DModel()
    shape = ModelShape(name="x", heads=2, head_dim=8, layers=1, grid=(2, 4, 4), steps=2, cfg=1)
    policy = Policy(
        model=shape,
        hardware=current_fingerprint(torch.device("cpu")),
        default=AttentionSpec(mode=Mode.BF16_DENSE),
    )
    with pytest.raises(PolicyMismatch) as e:
        fpstune.apply(other, policy)
    assert str(e.value) == (
        "OtherTransformer3DModel: no fpstune adapter serves this model class "
        f"(registered adapters: {', '.join(BUILTIN)})"
    )
    assert adapters.for_transformer(other) is None


def test_capture_and_replay_through_the_adapter(checkpoint: Path, tmp_path: Path) -> None:
    from fpstune.models.capture import initial_latents
    from fpstune.models.loop import Conditions, Sampling

    adapter = adapters.get("wan-diffusers")
    transformer, scheduler = adapter.load(checkpoint)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 5, CONFIG["text_dim"], generator=g)
    latents = initial_latents(
        [0], wan.latent_shape(CONFIG, height=HEIGHT, width=WIDTH, frames=FRAMES)
    )
    conditions = Conditions(latents, text[:1], text[1:])
    cap = adapter.capture(
        transformer,
        Sampling(scheduler, 2, 5.0),
        conditions,
        out=tmp_path / "c.safetensors",
        name="tiny",
        seeds=[0],
        layers=[1],
        steps=[0],
    )
    assert torch.equal(adapter.replay(transformer, cap.record), cap.record.final)
