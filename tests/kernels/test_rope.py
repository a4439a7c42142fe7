"""Rotary embedding handed to `attention()` (fused into the GPU pre-pass; rotated first on the
other paths): the rotation itself, the tables' checks, and the CPU paths. The pre-pass fusion is
checked under the interpreter (`test_triton_interpret.py`, ``rope_*`` cases) and on the GPU."""

from __future__ import annotations

import pytest
import torch
from test_triton_interpret import wan_rope_tables

from fpstune.kernels import AttentionSpec, attention
from fpstune.kernels.rope import rotary, tables

GRID = (3, 5, 7)
B, H, N, D = 2, 3, 105, 64


def test_rotary_is_the_complex_rotation() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, N, H, D, generator=gen, dtype=torch.float64)
    cos, sin = wan_rope_tables(N, D, gen)
    got = rotary(x, cos.double(), sin.double())
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    turn = torch.complex(cos[..., 0::2].double(), sin[..., 0::2].double())  # e^{i angle}
    want = torch.view_as_real(z * turn).flatten(-2)
    assert torch.allclose(got, want, atol=1e-6)


def test_tables_flatten_and_refuse_other_sizes() -> None:
    gen = torch.Generator().manual_seed(2)
    cos, sin = wan_rope_tables(N, D, gen)
    c, s = tables((cos, sin), N, D, torch.device("cpu"))
    assert c.shape == s.shape == (N, D) and c.is_contiguous() and c.dtype == torch.float32
    assert torch.equal(c, cos.reshape(N, D))
    with pytest.raises(ValueError, match=r"rope cos has shape \(1, 104, 1, 64\)"):
        tables((cos[:, :104], sin), N, D, torch.device("cpu"))
    with pytest.raises(ValueError, match="rope sin has shape"):
        tables((cos, sin[..., :32]), N, D, torch.device("cpu"))


@pytest.mark.parametrize("mode", ["bf16_dense", "fp8_dense", "fp8_window"])
def test_reference_path_rotates_in_fp32(mode: str) -> None:
    """On CPU, attention(q, k, v, rope=...) is attention on q and k rotated in fp32."""
    window = {
        "mode": "fp8_sparse",
        "sparsity": 0.5,
        "tile": [1, 2, 4],
        "pattern": {"kind": "window"},
    }
    spec = AttentionSpec.from_dict(window if mode == "fp8_window" else {"mode": mode})
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, N, D, generator=gen).bfloat16() for _ in range(3))
    cos, sin = wan_rope_tables(N, D, gen)
    out = attention(q, k, v, grid=GRID, spec=spec, rope=(cos, sin))
    c, s = cos.reshape(N, D), sin.reshape(N, D)
    rq, rk = rotary(q.float(), c, s), rotary(k.float(), c, s)
    want = attention(rq, rk, v.float(), grid=GRID, spec=spec).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)
    plain = attention(q, k, v, grid=GRID, spec=spec)
    assert not torch.equal(out, plain)  # the rotation was applied


def test_bad_tables_name_the_table() -> None:
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 1, N, D, generator=gen) for _ in range(3))
    cos, sin = wan_rope_tables(N - 1, D, gen)
    with pytest.raises(ValueError, match="rope cos has shape"):
        attention(q, k, v, grid=GRID, spec=AttentionSpec.from_dict({"mode": "fp8_dense"}),
                  rope=(cos, sin))  # fmt: skip
