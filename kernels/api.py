"""`attention()`: the one entry point the model adapters and production call."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from .config import check_feasible, default_config, default_tile
from .rope import Rope, rotate_qk
from .spec import AttentionSpec, Mode
from .tiling import TileLayout, prompt_key_mask, tile_overhang

Backend = Literal["auto", "triton", "reference"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, int, int],
    spec: AttentionSpec,
    scale: float | None = None,
    backend: Backend = "auto",
    rope: Rope | None = None,
    text: int = 0,
    text_first: bool = False,
    text_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over a (T, H, W) latent-patch grid as ``spec`` says.

    q, k, v: (batch, heads, tokens, head_dim) in the model's token order (t, h, w row-major),
    tokens == T*H*W; returns the same layout, order and dtype. ``scale`` defaults to 1/sqrt(D).

    Joint text + video attention (HunyuanVideo, CogVideoX): ``text`` more tokens sit after the
    video tokens (``text_first``: before them), tokens == T*H*W + text. Video queries keep every
    text key plus the video tiles the spec keeps; text queries attend to everything; text tokens
    get FP8 scales as tiles of their own (`reference` module docstring). ``text_mask``
    (batch, text) bool is the model's prompt mask: False text tokens are keys no query sees.

    ``backend="auto"`` runs the Triton kernels on CUDA tensors and the PyTorch reference elsewhere;
    ``bf16_dense`` on CUDA goes to torch SDPA (cuDNN on Hopper).

    ``rope`` (cos, sin) over the video tokens: attend with q and k rotated as Wan does
    (`fpstune.kernels.rope`; text tokens are not rotated). The Triton path rotates inside its
    pre-pass, in fp32 as the FP8 scales are taken (no rotated copy of q and k is written); the
    other paths rotate first with `rope.rotary` (SDPA in the input dtype as diffusers does, the
    reference in fp32).

    Non-finite inputs are not checked (that would cost a device sync per call); they propagate as
    NaN and never as finite garbage. A NaN/Inf in q makes its row NaN; in k, every row that
    visits its key NaN; in v, that channel of every row that visits it. FP8 scales widen the
    reach: a bad q or k value spoils its whole 3D tile, a bad v value its whole channel (the
    per-channel scale), in every row of that (batch, head).
    """
    _check_inputs(q, k, v, grid, text)
    text_mask = _check_text_mask(text_mask, q, text)
    if spec.tile is not None and (problem := tile_overhang(grid, spec.tile)):
        raise ValueError(f"spec.{problem}")
    out_dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    use_triton = backend == "triton" or (backend == "auto" and q.is_cuda)
    fused = use_triton and spec.mode is not Mode.BF16_DENSE
    if rope is not None and not fused:
        if not use_triton:  # the reference rotates in fp32; SDPA takes the input dtype
            q, k = q.float(), k.float()
        q, k = rotate_qk(q, k, rope, text=text, text_first=text_first)
        rope = None
    if spec.mode is Mode.BF16_DENSE:
        if use_triton:
            mask = None if text_mask is None else prompt_key_mask(text_mask, q.shape[2], text_first)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        from .reference import reference_attention

        out = reference_attention(
            q, k, v, grid=grid, spec=spec, tile=(1, 1, 1), scale=scale, text=text,
            text_first=text_first, text_mask=text_mask,
        )  # fmt: skip
        return out.to(out_dtype)
    tile = spec.tile or default_tile(grid)
    if not use_triton:
        from .reference import reference_attention

        out = reference_attention(
            q, k, v, grid=grid, spec=spec, tile=tile, scale=scale, text=text,
            text_first=text_first, text_mask=text_mask,
        )  # fmt: skip
        return out.to(out_dtype)
    config = spec.kernel or default_config(tile, q.shape[-1], spec.mode)
    check_feasible(config, tile=tile, head_dim=q.shape[-1], mode=spec.mode)
    from .dispatch import fused_attention

    layout = TileLayout(grid, tile, text, text_first)
    return fused_attention(
        q, k, v, layout=layout, spec=spec, config=config, scale=scale, rope=rope,
        text_mask=text_mask,
    )  # fmt: skip


def _check_text_mask(
    text_mask: torch.Tensor | None, q: torch.Tensor, text: int
) -> torch.Tensor | None:
    """``text_mask`` as bool on q's device, None when it masks nothing; a wrong shape is refused."""
    if text_mask is None:
        return None
    if text_mask.shape != (q.shape[0], text):
        raise ValueError(
            f"text_mask must be (batch, text) = ({q.shape[0]}, {text}), "
            f"got {tuple(text_mask.shape)}"
        )
    mask = text_mask.to(device=q.device, dtype=torch.bool)
    return None if bool(mask.all()) else mask


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int], text: int
) -> None:
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must share one (batch, heads, tokens, head_dim) shape; got {shapes}"
        )
    if len(grid) != 3 or any(not isinstance(g, int) or g < 1 for g in grid):
        raise ValueError(
            f"grid must be three positive sizes (T, H, W), got {tuple(grid)} "
            f"for {q.shape[2]} tokens"
        )
    if not isinstance(text, int) or text < 0:
        raise ValueError(f"text must be a token count >= 0, got {text!r}")
    if math.prod(grid) + text != q.shape[2]:
        plus = f" + {text} text" if text else ""
        raise ValueError(
            f"grid {tuple(grid)} has {math.prod(grid)} tokens{plus}; inputs have {q.shape[2]}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
