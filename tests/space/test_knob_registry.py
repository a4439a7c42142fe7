"""The recipe "add a kernel knob", done without editing the core: one `register_knob` call, and
the kernel stage searches the knob, its value travels in the spec (and a policy), feasibility
asks its check, and the launch receives it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from shared_helpers import install_plugin

from fpstune.kernels import AttentionSpec, KernelConfig, Mode, SpecError, infeasibility
from fpstune.kernels import knobs as kernel_knobs
from fpstune.spec import load_study
from fpstune.stages.kernel_space import (
    KernelBucket,
    feasible_kernel_points,
    kernel_from_params,
    suggest_kernel,
)

ROOT = Path(__file__).resolve().parents[2]
WAN = load_study(ROOT / "studies" / "wan2.1-t2v-14b-720p.yaml")
TOY = "toy_regs"


def _no_128_on_8_warps(config: KernelConfig, **_: Any) -> str | None:
    if config.knob(TOY) == 128 and config.num_warps == 8:
        return "128 registers are too few for 8 warps"
    return None


@pytest.fixture
def toy() -> Iterator[kernel_knobs.Knob]:
    knob = kernel_knobs.register_knob(
        TOY, (255, 128), 255, check=_no_128_on_8_warps, launch="maxnreg"
    )
    yield knob
    kernel_knobs.unregister_knob(TOY)


def test_toy_knob_is_suggested_and_carried_in_the_spec(toy: kernel_knobs.Knob) -> None:
    space = WAN.kernel_space
    bucket = KernelBucket(Mode.FP8_DENSE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        spec = suggest_kernel(trial, space, 128, bucket)
        assert spec.kernel is not None
        value = spec.kernel.knob(TOY)
        seen.add(value)
        assert value in toy.choices
        assert not (value == 128 and spec.kernel.num_warps == 8)  # its check was asked
        assert (f"_{TOY}-128" in spec.kernel.key) == (value == 128)
        # the chosen config is a suggested parameter, and the spec survives a policy's round trip
        assert any(spec.kernel.key == v for v in trial.params.values())
        assert kernel_from_params(trial.params, space, 128, bucket) == spec
        assert AttentionSpec.from_dict(spec.to_dict()) == spec
        study.tell(trial, 1.0)
    assert seen == {255, 128}
    # the default value is left out of the stored form: configs without the knob keep their keys
    plain = KernelConfig(block_m=64, block_n=128, num_warps=4, num_stages=5, knobs={TOY: 255})
    assert plain.model_dump() == {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 5}
    assert plain.key == "m64_n128_w4_s5"


def test_toy_knob_doubles_the_feasible_points_its_check_allows(toy: kernel_knobs.Knob) -> None:
    space = WAN.kernel_space
    with_toy = [p for p in feasible_kernel_points(space, 128) if p.config is not None]
    kernel_knobs.unregister_knob(TOY)
    without = [p for p in feasible_kernel_points(space, 128) if p.config is not None]
    kernel_knobs.register_knob(TOY, toy.choices, toy.default, check=toy.check, launch=toy.launch)
    eight = [p for p in without if p.config is not None and p.config.num_warps == 8]
    assert len(with_toy) == 2 * len(without) - len(eight)
    config = KernelConfig(block_m=128, block_n=128, num_warps=8, num_stages=3, knobs={TOY: 128})
    why = infeasibility(config, tile=(1, 8, 16), head_dim=128, mode=Mode.FP8_DENSE)
    assert why == [f"{TOY}=128: 128 registers are too few for 8 warps"]


def test_toy_knob_value_reaches_the_launch(
    toy: kernel_knobs.Knob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launch keyword reaches the Triton kernel's launch (a recorder stands in for it)."""
    pytest.importorskip("triton")
    from fpstune.kernels import triton_attention
    from fpstune.kernels.dispatch import attend
    from fpstune.kernels.patterns import KvList
    from fpstune.kernels.prepare import Prepared
    from fpstune.kernels.tiling import TileLayout

    launched: list[dict[str, Any]] = []

    class Recorder:
        def __getitem__(self, grid: object) -> Any:
            return lambda *args, **kwargs: launched.append(kwargs)

    monkeypatch.setattr(triton_attention, "_attn_kernel", Recorder())
    layout = TileLayout((1, 8, 16), (1, 8, 16))
    spec = AttentionSpec.from_dict({"mode": "bf16_sparse", "tile": (1, 8, 16),
                                    "sparsity": 0.5, "pattern": {"kind": "window"}})  # fmt: skip
    x = torch.zeros(1, 128, 64, dtype=torch.bfloat16)
    one = torch.ones(1, 1, 1, dtype=torch.int32)
    prep = Prepared(x, x, x, None, None, None, None, KvList(one, one, one), layout, spec,
                    (1, 1, 128, 64), torch.zeros(128))  # fmt: skip
    for value in toy.choices:
        config = KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=2, knobs={TOY: value})
        attend(prep, **config.model_dump(), scale=0.125, out_dtype=torch.bfloat16)
        assert launched[-1]["maxnreg"] == value
        assert launched[-1]["num_warps"] == 4


def test_unknown_knob_and_bad_registrations_are_refused() -> None:
    with pytest.raises(SpecError, match=f"kernel.knobs.{TOY}: unknown knob '{TOY}'"):
        AttentionSpec.from_dict({
            "mode": "fp8_dense", "kernel": {"block_m": 64, "block_n": 64, "knobs": {TOY: 128}},
        })  # fmt: skip
    with pytest.raises(ValueError, match="taken"):
        kernel_knobs.register_knob("block_m", (16, 32), 16)
    with pytest.raises(ValueError, match="default"):
        kernel_knobs.register_knob(TOY, (1, 2), 3)
    assert TOY not in [k.name for k in kernel_knobs.registered()]


def test_a_registered_knob_refuses_values_outside_its_choices(toy: kernel_knobs.Knob) -> None:
    with pytest.raises(SpecError, match=rf"kernel.knobs.{TOY}: 64 is not one of \[255, 128\]"):
        AttentionSpec.from_dict({
            "mode": "fp8_dense", "kernel": {"block_m": 64, "block_n": 64, "knobs": {TOY: 64}},
        })  # fmt: skip


def test_an_entry_point_registers_a_knob_in_every_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package's ``fpstune.knobs`` entry point is imported on the first knob lookup, so a Ray
    worker or the production runtime knows the knob a policy names; a broken one is skipped."""
    install_plugin(
        tmp_path / "site",
        monkeypatch,
        group=kernel_knobs.ENTRY_POINT_GROUP,
        entry_points={"toy": "toy_knobs_mod", "broken": "toy_knobs_missing"},
        modules={
            "toy_knobs_mod": "from fpstune.kernels.knobs import register_knob\n"
            f"register_knob({TOY!r}, (255, 128), 255, launch='maxnreg')\n"
        },
    )
    monkeypatch.setattr(kernel_knobs, "_plugins_loaded", False)
    try:
        with pytest.warns(RuntimeWarning, match=r"entry point 'broken' .* skipped"):
            assert kernel_knobs.get(TOY).choices == (255, 128)
        config = KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=2, knobs={TOY: 128})
        assert config.knob(TOY) == 128
    finally:
        kernel_knobs.unregister_knob(TOY)
