"""Which attention kernel runs a fused (non-``bf16_dense``) call, whether it can, and its launch.

The one place that chooses between the kernels, as FlashAttention's
``flash_attn/cute/interface.py`` picks its per-architecture kernel: `KernelConfig.impl` names
the kernel, `impl_infeasibility` holds each kernel's own limits (`config.infeasibility` adds the
rules they share), and `attend` launches it on what `prepare.prepare` wrote.

- ``triton`` (`triton_attention`): every mode but ``bf16_dense``, on any GPU Triton supports
  and in its CPU interpreter.
- ``gluon`` / ``gluon_ws`` (`gluon_attention`): the fp8 modes on Hopper (sm_90), head_dim 128.

The kernel modules import Triton, and torch is imported only when a kernel runs, so that
validating a policy or a study (`config`, `fpstune.spec`) starts no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .knobs import Scalar, launch_options
from .spec import AttentionSpec, KernelConfig, Mode

if TYPE_CHECKING:
    import torch

    from .config import DeviceLimits
    from .patterns import BlockIndex
    from .prepare import Prepared
    from .rope import Rope
    from .tiling import TileLayout

# What `gluon_attention`'s kernels are written for: (block_m, block_n, num_warps) -> least stages.
# gluon: one warpgroup of 64 rows that refills its own ring, so >= 3 slots (the slot refilled in
# iteration j must not be the one QK(j+1) reads). gluon_ws: two warpgroups of 64 rows and a
# producer warp; a slot is refilled once both have released it, so 2 slots cannot deadlock;
# block_n=256 takes two 128-key blocks per softmax step, a stage holding the pair.
_GLUON_SHAPES = {
    "gluon": {(64, 128, 4): 3},
    "gluon_ws": {(128, 128, 8): 2, (128, 256, 8): 2},
}


def kv_block(config: KernelConfig) -> int:
    """The keys ``config.impl`` loads as one block, each within one tile: ``block_n``, but
    gluon_ws's 256-key steps are two 128-key blocks."""
    return min(config.block_n, 128) if config.impl == "gluon_ws" else config.block_n


def impl_infeasibility(
    config: KernelConfig, *, head_dim: int, mode: Mode, limits: DeviceLimits
) -> list[str]:
    """Why ``config.impl`` cannot run this config. The Gluon kernels: 64-row warpgroups, 128-key
    TMA blocks of 128-byte rows, Hopper's wgmma."""
    impl = config.impl
    if impl == "triton":
        return []
    shapes = _GLUON_SHAPES[impl]
    reasons = []
    if not mode.fp8:
        reasons.append(f"impl={impl} runs the fp8 modes only, not {mode.value}")
    least = shapes.get((config.block_m, config.block_n, config.num_warps))
    if least is None:
        least = min(shapes.values())
        named = " or ".join(f"block_m={m}, block_n={n}, num_warps={w}" for m, n, w in shapes)
        reasons.append(f"impl={impl} needs {named}")
    if head_dim != 128:
        reasons.append(f"impl={impl} needs head_dim=128, got {head_dim}")
    if config.num_stages < least:
        reasons.append(f"impl={impl} needs num_stages >= {least}, got {config.num_stages}")
    if limits.capability[0] != 9:
        reasons.append(f"impl={impl} needs an sm_90 GPU (Hopper), the GPU has {limits.capability}")
    return reasons


def attend(
    prep: Prepared,
    *,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    scale: float,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    impl: str = "triton",
    knobs: Mapping[str, Scalar] | None = None,
) -> torch.Tensor:
    """Run the attention kernel ``impl`` on a `Prepared`; returns (B, H, N, D) in model order.
    Takes a `KernelConfig`'s fields (``**config.model_dump()``); ``knobs``' registered launch
    keywords go to the launch."""
    import torch

    from .prepare import launch_args, wgmma_keys

    if impl != "triton" and not prep.q.is_cuda:
        raise ValueError(f"kernel impl={impl} runs on a CUDA (sm_90) GPU only")
    if prep.spec.mode.fp8 and wgmma_keys(impl) != wgmma_keys(prep.impl):
        raise ValueError(f"V was prepared for impl={prep.impl}; run prepare(..., impl={impl!r})")
    B, H, N, D = prep.shape
    if out is None:
        out = torch.empty((B, H, N, D), dtype=out_dtype, device=prep.q.device)
    elif out.shape != (B, H, N, D) or out.dtype != out_dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be ({B}, {H}, {N}, {D}) {out_dtype} with unit last stride")
    grid, rest = launch_args(prep, block_m=block_m, scale=scale, out=out)
    options = launch_options(knobs or {})
    if impl == "triton":
        from . import triton_attention

        triton_attention.launch(
            prep, grid, rest, block_m=block_m, block_n=block_n, num_warps=num_warps,
            num_stages=num_stages, options=options,
        )  # fmt: skip
    else:
        from . import gluon_attention

        gluon_attention.launch(
            prep, grid, rest, block_m=block_m, block_n=block_n, num_stages=num_stages,
            warp_specialize=impl == "gluon_ws", options=options,
        )  # fmt: skip
    return out


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: TileLayout,
    spec: AttentionSpec,
    config: KernelConfig,
    scale: float,
    blocks: BlockIndex | None = None,
    out: torch.Tensor | None = None,
    rope: Rope | None = None,
    text_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole op for every non-``bf16_dense`` mode: pre-pass, block index, attention.
    ``rope``: q and k are rotated in the pre-pass (`prepare.prepare`).

    q, k, v: (B, H, N, D) in model order, bf16/fp16, any strides; returns (B, H, N, D) in q's
    dtype. ``config`` must have passed `config.check_feasible`. ``blocks`` (tests) replaces
    the pattern's block index; ``out`` (tests poison it) receives the result. ``text_mask``
    (B, layout.text) bool: the prompt mask of a joint layout; batch elements whose masks differ
    run one launch each (the padding bias the kernels read has no batch dimension).
    """
    import torch

    from .prepare import prepare

    if spec.mode.fp8 and not hasattr(torch, "float8_e4m3fn"):
        raise RuntimeError("fp8 modes need torch.float8_e4m3fn")
    if text_mask is not None and q.shape[0] > 1 and not bool((text_mask == text_mask[:1]).all()):
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        for b in range(q.shape[0]):
            one = slice(b, b + 1)
            fused_attention(
                q[one], k[one], v[one], layout=layout, spec=spec, config=config, scale=scale,
                blocks=None if blocks is None else _batch(blocks, b), out=out[one], rope=rope,
                text_mask=text_mask[one],
            )  # fmt: skip
        return out
    mask = None if text_mask is None else text_mask[0]
    prep = prepare(
        q, k, v, layout=layout, spec=spec, blocks=blocks, impl=config.impl, rope=rope,
        text_mask=mask,
    )  # fmt: skip
    return attend(prep, **config.model_dump(), scale=scale, out_dtype=q.dtype, out=out)


def _batch(blocks: BlockIndex, b: int) -> BlockIndex:
    """Batch element ``b`` of a block index whose batch dimension may broadcast."""
    from .patterns import BlockIndex

    i = slice(b, b + 1) if blocks.kv_index.shape[0] > 1 else slice(0, 1)
    j = slice(b, b + 1) if blocks.kv_count.shape[0] > 1 else slice(0, 1)
    return BlockIndex(blocks.kv_index[i], blocks.kv_count[j])
