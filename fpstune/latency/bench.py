"""What the scripts under ``benchmarks/`` share with the tuner: the Wan2.1 attention shapes, the
fp8 kernel configs they compare, timing on top of `measure`, and one JSON result per run.

Timing, two ways, both from here:

- `time_calls`: one op (an attention call) issued back to back with CUDA events around each
  call and one synchronisation at the end (`measure` with no L2 flush and one call per sample),
  as inside a model where the host runs ahead; reps from a time budget. The host (Python) time
  per call is measured after it, so a call that makes the host wait for the GPU shows up.
- `wall_ms`: a whole forward or generation, synchronised after each call, wall clock.

Every result file carries the command, `environment()` (the `HardwareFingerprint` of
``fpstune.kernels.fingerprint`` plus cuDNN and Python versions) and the payload, under
``benchmarks/results/<date>-<gpu>-<name>.json`` unless ``--out`` names a file.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from fpstune.kernels.fingerprint import HardwareFingerprint, current_fingerprint
from fpstune.latency.measure import Timing, measure

#: name: (batch, heads, latent patch grid (frames, height, width), head_dim) of a model's video
#: self-attention: Wan2.1 at 81 frames (1.3B at 480p and 720p, 14B at 720p); HunyuanVideo 720p
#: (129 frames; ``hunyuan-720p-video``: its video tokens alone, to price the text); CogVideoX-5B
#: (49 frames, 720x480); LTX-Video (161 frames, 704x480).
SHAPES: dict[str, tuple[int, int, tuple[int, int, int], int]] = {
    "480p": (1, 12, (21, 30, 52), 128),
    "720p": (1, 12, (21, 45, 80), 128),
    "720p-14b": (1, 40, (21, 45, 80), 128),
    "hunyuan-720p": (1, 24, (33, 45, 80), 128),
    "hunyuan-720p-video": (1, 24, (33, 45, 80), 128),
    "cogvideox-5b": (1, 48, (13, 30, 45), 64),
    "ltx-video": (1, 32, (21, 15, 22), 64),
}
#: name: (text tokens, text before the video) of the shapes whose attention call holds the
#: prompt's tokens too (joint attention; the rest attend to the text in a separate call).
TEXT: dict[str, tuple[int, bool]] = {
    "hunyuan-720p": (256, False),
    "cogvideox-5b": (226, True),
}
#: --kernel: the fp8 kernel config a benchmark puts on every fp8 spec (None: the runtime's
#: default config); gluon_ws is the fastest config of the kernel space on Hopper.
KERNELS: dict[str, dict[str, Any] | None] = {
    "default": None,
    "gluon_ws": {
        "block_m": 128,
        "block_n": 256,
        "num_warps": 8,
        "num_stages": 2,
        "impl": "gluon_ws",
    },
}
TIME_CALLS_METHOD = (
    "CUDA events around each call, calls back to back (one sync at the end), 2 warm-up calls, "
    "reps = clamp(budget / estimate, 5, 100), median and IQR; host ms per call measured after"
)


def flops(shape: str) -> float:
    """Dense-equivalent FLOPs of one attention call at ``shape``: 4·B·H·N²·D."""
    b, h, grid, d = SHAPES[shape]
    n = grid[0] * grid[1] * grid[2] + TEXT.get(shape, (0, False))[0]
    return 4.0 * b * h * n * n * d


def time_calls(
    fn: Callable[[], object], *, budget_s: float, min_reps: int = 5, max_reps: int = 100
) -> tuple[Timing, float]:
    """Time ``fn`` back to back on the current CUDA device; returns the timing and the host
    (Python) ms per call. On a CPU, `measure`'s wall-clock path (its figures are no GPU's)."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    est_ms = (time.perf_counter() - t0) * 1e3
    reps = max(min_reps, min(max_reps, int(budget_s * 1e3 / max(est_ms, 1e-3))))
    timing = measure(fn, warmup=0, reps=reps, flush_l2=False, min_sample_ms=0, min_reps=min_reps)
    host = []
    for _ in range(min(reps, 10)):
        h0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - h0) * 1e3)
    sync()
    return timing, statistics.median(host)


def wall_ms(fn: Callable[[], object], reps: int) -> list[float]:
    """Wall time per call (ms), synchronised after each; one untimed warm-up call first."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """The fingerprint of ``device`` (default: the current GPU, else the CPU) and what else
    moves a figure: cuDNN, Python, the host's OS."""
    fp = current_fingerprint(device)
    env: dict[str, Any] = fp.model_dump(mode="json")
    env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    env["python"] = platform.python_version()
    env["platform"] = platform.platform()
    return env


def result_args(ap: argparse.ArgumentParser) -> None:
    """``--out`` (a file) and ``--results`` (the folder a file is named in by default)."""
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the JSON result file (default: RESULTS/<date>-<gpu>-<name>.json)",
    )
    ap.add_argument(
        "--results",
        type=Path,
        default=Path("benchmarks/results"),
        help="folder of result files named by date, GPU and benchmark (default: %(default)s)",
    )


def result_path(name: str, folder: Path, *, gpu: str | None = None, when: datetime | None = None
                ) -> Path:  # fmt: skip
    """``folder/<YYYY-MM-DD>-<gpu>-<name>.json``, the GPU as its short lower-case model
    (``NVIDIA H200`` -> ``h200``, ``NVIDIA H100 80GB HBM3`` -> ``h100``; a CPU: ``cpu``)."""
    gpu = gpu if gpu is not None else current_fingerprint().gpu
    day = (when or datetime.now(UTC)).strftime("%Y-%m-%d")
    return folder / f"{day}-{short_gpu_name(gpu)}-{name}.json"


def command(argv: list[str] | None = None) -> str:
    """This process's command line as one would retype it: ``python3 -m benchmarks.x ...``
    when run as a module, else the script path."""
    argv = sys.argv if argv is None else argv
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = f"python3 -m {spec.name}" if spec is not None else f"python3 {argv[0]}"
    return " ".join([head, shlex.join(argv[1:])]).strip()


def short_gpu_name(gpu: str) -> str:
    words = [w for w in re.split(r"[^a-z0-9]+", gpu.lower()) if w and w not in ("nvidia", "tesla")]
    return words[0] if words else "gpu"


def write_result(
    name: str,
    payload: dict[str, Any],
    *,
    out: Path | None = None,
    folder: Path = Path("benchmarks/results"),
    env: dict[str, Any] | None = None,
    argv: list[str] | None = None,
) -> Path:
    """Write ``{"benchmark", "command", "environment", "fingerprint", "written", **payload}`` as
    JSON to ``out`` or to `result_path` in ``folder``; returns the path. Call it again to update
    a partial run. ``fingerprint`` is the `HardwareFingerprint` policies and latency rows carry
    (``environment`` repeats its fields beside cuDNN, Python and the OS)."""
    env = env if env is not None else environment()
    path = out if out is not None else result_path(name, folder, gpu=env.get("gpu"))
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "command": command(argv),
        "environment": env,
        "fingerprint": {k: env.get(k) for k in HardwareFingerprint.model_fields},
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        **payload,
    }
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path


__all__ = [
    "KERNELS",
    "SHAPES",
    "TEXT",
    "TIME_CALLS_METHOD",
    "command",
    "environment",
    "flops",
    "result_args",
    "result_path",
    "short_gpu_name",
    "time_calls",
    "wall_ms",
    "write_result",
]
