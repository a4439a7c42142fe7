"""End-to-end quality: a policy's generated videos against the BF16-dense ones, same seeds.

`EndToEndProbe` owns one diffusers Wan transformer with fpstune's processor installed and a
fixed set of conditions (initial noise and prompts from seeds). The BF16-dense generation is the
reference: computed once, kept in memory, and cached on disk (safetensors keyed by the weights,
seeds, steps, guidance and device type) so every worker of a study, and every later run, reuses
it. For each policy it runs the denoising loop and reports, over the videos (frames as images):

- ``psnr`` (mean over videos, capped at `PSNR_CAP` dB: identical outputs would be +inf),
  ``psnr_min`` (the worst video), ``ssim`` (mean) — torchmetrics, data range 2 (pixels in [-1, 1]);
- attrs: per-video PSNR and, per (layer, step), the relative L2 of each attention output against
  the BF16-dense attention of the same inputs along the policy's own trajectory (``cell_rel_l2``).

`ReplayProbe` does the same for a checkpoint model from a capture's replay record (its prompt
embeddings, initial latents, scheduler, steps and guidance; no text encoder) and compares final
*latents*: ``psnr`` and ``psnr_min``, each video's PSNR with the data range of its BF16-dense
reference latents (max - min), unclamped. When the checkpoint has a VAE it also decodes both (as
the pipeline does) and scores the frames: ``frame_psnr`` and ``ssim`` (data range 2).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from fpstune.kernels import InfeasibleConfig, SpecError
from fpstune.models.loop import Conditions, Sampling, denoise
from fpstune.models.processor import install
from fpstune.models.router import AttentionRouter
from fpstune.quality.probe import QualityResult
from fpstune.stages.evaluation import CandidateError

PSNR_CAP = 100.0
DATA_RANGE = 2.0


def cache_dir() -> Path:
    return Path(os.environ.get("FPSTUNE_CACHE", Path.home() / ".cache" / "fpstune"))


def latent_psnr(out: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """PSNR per video of (n, ...) latents, each against its reference's own range (max - min),
    capped at `PSNR_CAP`."""
    out, ref = out.float().flatten(1), ref.float().flatten(1)
    mse = (out - ref).square().mean(1)
    span = (ref.amax(1) - ref.amin(1)).clamp(min=1e-12)
    psnr = 10 * torch.log10(span.square() / mse)
    return [float(p) for p in torch.nan_to_num(psnr, posinf=PSNR_CAP).clamp(max=PSNR_CAP)]


def video_metrics(out: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """PSNR per video and SSIM over all frames, for (n, C, F, H, W) videos in [-1, 1]."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    out, ref = out.float().clamp(-1, 1), ref.float().clamp(-1, 1)
    psnr = peak_signal_noise_ratio(
        out, ref, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3, 4)
    )
    psnr = torch.nan_to_num(psnr, posinf=PSNR_CAP).clamp(max=PSNR_CAP)

    def frames(x: torch.Tensor) -> torch.Tensor:  # (n, C, F, H, W) -> (n * F, C, H, W)
        return x.permute(0, 2, 1, 3, 4).flatten(0, 1)

    ssim = structural_similarity_index_measure(frames(out), frames(ref), data_range=DATA_RANGE)
    return {"psnr": [float(p) for p in psnr], "ssim": float(ssim)}  # type: ignore[arg-type]


class EndToEndProbe:
    """PSNR / SSIM of a policy's generations against the BF16-dense generations.

    transformer: a diffusers ``WanTransformer3DModel`` (its self-attention gets patched);
    key: identifies the weights for the disk cache (e.g. their checksum); None disables it.
    """

    names: tuple[str, ...] = ("psnr", "psnr_min", "ssim")

    def __init__(
        self,
        transformer: Any,
        conditions: Conditions,
        sampling: Sampling,
        *,
        key: str | None = None,
        track_errors: bool = True,
    ) -> None:
        self.transformer = transformer
        self.conditions = conditions
        self.sampling = sampling
        self.router = AttentionRouter(track_errors=track_errors)
        install(transformer, self.router)
        self.device = next(transformer.parameters()).device
        self.key = key
        self.reference = self._reference()

    def measure(self, policy: Any) -> QualityResult:
        self.router.reset()
        self.router.policy = policy
        try:
            out = denoise(self.transformer, self.router, self.conditions, self.sampling)
        except (SpecError, InfeasibleConfig) as e:
            raise CandidateError(f"end-to-end run: {' '.join(str(e).split())}") from None
        finally:
            self.router.policy = None
        if not bool(torch.isfinite(out).all()):
            raise CandidateError("end-to-end run: the generated video holds NaN or Inf")
        psnr, extra = self._scores(out)
        return QualityResult(
            values={"psnr": math.fsum(psnr) / len(psnr), "psnr_min": min(psnr), **extra},
            attrs={
                "video_psnr": [round(p, 3) for p in psnr],
                "cell_rel_l2": [[c, float(f"{e:.4g}")] for c, e in self.router.cell_rel_l2()],
                "e2e": {
                    "videos": len(psnr),
                    "steps": self.sampling.steps,
                    "guidance": self.sampling.guidance,
                },
            },
        )

    def _scores(self, out: torch.Tensor) -> tuple[list[float], dict[str, float]]:
        """(PSNR per video, other values) of ``out`` against the reference."""
        m = video_metrics(out, self.reference)
        return m["psnr"], {"ssim": m["ssim"]}

    # -- the reference ------------------------------------------------------------------------

    def _reference(self) -> torch.Tensor:
        path = self._cache_path()
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            try:
                return load_file(str(path))["reference"].to(self.device)
            except Exception:  # a torn cache file is rebuilt, never trusted
                path.unlink(missing_ok=True)
        self.router.reset()
        self.router.policy = None
        ref = denoise(self.transformer, self.router, self.conditions, self.sampling)
        if not bool(torch.isfinite(ref).all()):
            raise ValueError("the BF16-dense reference generation is not finite")
        if path is not None:
            from safetensors.torch import save_file

            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({"reference": ref.cpu().contiguous()}, str(tmp))
            tmp.replace(path)
        return ref

    def _cache_path(self) -> Path | None:
        if self.key is None:
            return None
        c = self.conditions
        digest = hashlib.sha256()
        digest.update(
            json.dumps(
                {
                    "key": self.key,
                    "steps": self.sampling.steps,
                    "guidance": self.sampling.guidance,
                    "scheduler": dict(self.sampling.scheduler.config),
                    "device": self.device.type,
                },
                sort_keys=True,
                default=str,
            ).encode()
        )
        for t in (c.latents, c.prompt, c.negative):
            if t is not None:
                digest.update(t.detach().cpu().float().numpy().tobytes())
        return cache_dir() / "references" / f"{digest.hexdigest()[:32]}.safetensors"


def mini_probe(
    *,
    seeds: tuple[int, ...],
    steps: int,
    guidance: float,
    device: torch.device | str,
    weights: str | None = None,
) -> EndToEndProbe:
    """The end-to-end probe of the embedded mini model (its packaged weights by default)."""
    from fpstune.models import mini

    path = Path(weights) if weights is not None else mini.packaged_weights()
    model = mini.build_mini(weights=path, device=device)
    key = hashlib.sha256(path.read_bytes()).hexdigest()
    return EndToEndProbe(
        model, mini.conditions(seeds), mini.sampling(steps=steps, guidance=guidance), key=key
    )


class ReplayProbe(EndToEndProbe):
    """`EndToEndProbe` over final latents: ``psnr`` / ``psnr_min`` (`latent_psnr`). With the
    checkpoint's ``vae`` it also decodes them as the pipeline does and scores the frames:
    ``frame_psnr`` (mean over videos) and ``ssim`` (`video_metrics`); the decoded reference is
    made once, from the cached reference latents."""

    names: tuple[str, ...] = ("psnr", "psnr_min")

    def __init__(self, *args: Any, vae: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vae = vae
        if vae is not None:
            from fpstune.models.wan import decode

            self.names = (*type(self).names, "frame_psnr", "ssim")
            self.reference_frames = decode(vae, self.reference)

    def _scores(self, out: torch.Tensor) -> tuple[list[float], dict[str, float]]:
        extra: dict[str, float] = {}
        if self.vae is not None:
            from fpstune.models.wan import decode

            m = video_metrics(decode(self.vae, out), self.reference_frames)
            extra = {"frame_psnr": math.fsum(m["psnr"]) / len(m["psnr"]), "ssim": m["ssim"]}
        return latent_psnr(out, self.reference), extra


def replay_probe(
    *,
    checkpoint: str | os.PathLike[str],
    record: str | os.PathLike[str],
    seeds: tuple[int, ...],
    device: torch.device | str,
) -> ReplayProbe:
    """The end-to-end probe of a diffusers Wan checkpoint, from a capture's replay record: the
    record's videos of ``seeds`` (each must be one of the record's), its steps and guidance;
    BF16 weights on a GPU, float32 on the CPU (as `fpstune capture` runs); the checkpoint's VAE
    (float32) when it has one, for frame metrics."""
    from fpstune.errors import BadInput
    from fpstune.models import wan
    from fpstune.models.capture import load_record

    rec = load_record(record)
    missing = [s for s in seeds if s not in rec.seeds]
    if missing:
        raise BadInput(f"{record}: seed {missing[0]} is not in the replay record {list(rec.seeds)}")
    rows = torch.tensor([rec.seeds.index(s) for s in seeds])
    c = rec.conditions
    conditions = Conditions(
        c.latents[rows], c.prompt[rows], None if c.negative is None else c.negative[rows]
    )
    sampling = rec.sampling()
    if not torch.equal(sampling.fresh_scheduler().timesteps.cpu(), rec.timesteps):
        raise BadInput(f"{record}: the recorded scheduler now gives other timesteps")
    root = Path(checkpoint)
    wan.check_checkpoint(root)
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer = wan.load_transformer(root, device=device, dtype=dtype)
    files = sorted((root / "transformer").iterdir())
    key = json.dumps(
        [
            str(root.resolve()),
            str(dtype),
            [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        ]
    )
    vae = wan.load_vae(root, device=device, dtype=torch.float32) if wan.has_vae(root) else None
    return ReplayProbe(transformer, conditions, sampling, key=key, vae=vae)


__all__ = [
    "PSNR_CAP",
    "EndToEndProbe",
    "ReplayProbe",
    "latent_psnr",
    "mini_probe",
    "replay_probe",
    "video_metrics",
]
