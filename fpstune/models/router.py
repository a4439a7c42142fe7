"""Which attention spec each self-attention call runs: the (layer, step) lookup of a policy.

The denoising loop sets `step` before each transformer call; every patched self-attention layer
knows its own index and asks `spec_for(layer)`. With no policy every call runs BF16-dense (the
reference). With ``track_errors`` each call also runs the BF16-dense reference on the same
q, k, v and accumulates the relative L2 of the output per (layer, step): the "local" error of
the policy along its own trajectory, stored as trial attributes.

Joint text + video calls (HunyuanVideo, CogVideoX) pass `Text`: where the prompt's tokens sit
in the sequence and the prompt mask. A policy's ``model.text`` must be the call's text length
(`PolicyMismatch` at the first call otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fpstune.kernels import AttentionSpec, Mode, attention, prompt_key_mask
from fpstune.kernels.rope import Rope, rotate_qk

DENSE = AttentionSpec(mode=Mode.BF16_DENSE)


class PolicyMismatch(ValueError):
    """The pipeline is not what the policy was tuned for; ``str(e)`` names both values."""


@dataclass(frozen=True)
class Text:
    """The prompt's tokens inside a self-attention call: ``tokens`` of them after the video
    (``first``: before it), ``mask`` (batch, tokens) bool where the model masks padding."""

    tokens: int
    first: bool = False
    mask: torch.Tensor | None = None


@dataclass
class AttentionRouter:
    """policy: a `fpstune.kernels.Policy`, anything with its ``spec(layer=, step=)`` (benchmarks,
    tests; no text-length check then), or None: BF16-dense everywhere."""

    policy: Any = None
    grid: tuple[int, int, int] | None = None
    step: int = 0
    #: the CFG pass of the current call ("cond", "uncond") where the caller says it
    pass_name: str | None = None
    track_errors: bool = False
    #: called with (layer, step, q, k, v) before each call (attention-structure analysis, capture)
    observer: Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
    calls: dict[tuple[int, int], int] = field(default_factory=dict)
    #: (layer, step) -> [sum of squared error, sum of squared reference], kept on the device so
    #: tracking costs no host sync per call; read once by `cell_rel_l2`
    _err: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def spec_for(self, layer: int) -> AttentionSpec:
        if self.policy is None:
            return DENSE
        spec: AttentionSpec = self.policy.spec(layer=layer, step=self.step)
        return spec

    def run(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: Rope | None = None,
        text: Text | None = None,
    ) -> torch.Tensor:
        """Attention for ``layer`` at the current step; q, k, v as (batch, heads, tokens, dim).
        ``rope`` (cos, sin) over the video tokens: q and k are not rotated yet; `attention`
        rotates them (fused into the pre-pass on the GPU). An observer sees them rotated.
        ``text``: the call holds the prompt's tokens too (joint attention)."""
        if self.grid is None:
            raise RuntimeError("AttentionRouter.grid is not set: the loop sets it per video shape")
        n_text, first = (0, False) if text is None else (text.tokens, text.first)
        mask = None if text is None else text.mask
        model = getattr(self.policy, "model", None)  # a stand-in with only ``spec`` says none
        if model is not None and n_text != model.text:
            raise PolicyMismatch(
                f"model.text: the model attends to {n_text} text tokens with the video, the "
                f"policy ({model.name}) was tuned for {model.text}"
            )
        if self.observer is not None:
            if rope is not None:
                (q, k), rope = rotate_qk(q, k, rope, text=n_text, text_first=first), None
            self.observer(layer, self.step, q, k, v)
        spec = self.spec_for(layer)
        key = (layer, self.step)
        dtype = q.dtype
        if q.is_cuda and dtype != torch.bfloat16:  # the GPU kernels take bf16 (autocast may not)
            q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        self.calls[key] = self.calls.get(key, 0) + 1
        if spec.mode is Mode.BF16_DENSE:
            # The model's own attention, as diffusers runs it on every device (SDPA, RoPE in
            # the input dtype): a BF16 cell reproduces the unpatched model bit for bit.
            if rope is not None:
                q, k = rotate_qk(q, k, rope, text=n_text, text_first=first)
            key_mask = None if mask is None else prompt_key_mask(mask, q.shape[2], first)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask).to(dtype)
        joint = {"text": n_text, "text_first": first, "text_mask": mask}
        out = attention(q, k, v, grid=self.grid, spec=spec, rope=rope, **joint)
        if self.track_errors and spec.mode is not Mode.BF16_DENSE:
            ref = attention(q, k, v, grid=self.grid, spec=DENSE, rope=rope, **joint).float()
            sums = torch.stack(((out.float() - ref).square().sum(), ref.square().sum())).double()
            prev = self._err.get(key)
            self._err[key] = sums if prev is None else prev + sums
        return out.to(dtype)

    def reset(self) -> None:
        self.calls.clear()
        self._err.clear()
        self.step = 0

    def cell_rel_l2(self) -> list[list[Any]]:
        """``[[layer, step], rel_l2]`` for every tracked non-dense call (dense cells are 0)."""
        cells = sorted(self._err)
        if not cells:
            return []
        sums = torch.stack([self._err[c] for c in cells]).tolist()  # one host sync
        return [
            [[layer, step], (d2 / r2) ** 0.5 if r2 > 0 else 0.0]
            for (layer, step), (d2, r2) in zip(cells, sums, strict=True)
        ]


__all__ = ["DENSE", "AttentionRouter", "PolicyMismatch", "Text"]
