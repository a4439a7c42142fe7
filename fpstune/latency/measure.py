"""Timing one GPU op the way fpstune stores it: warm-up, cold L2 (or rotating inputs), CUDA events
around each sample, median and IQR.

Why our own loop rather than ``triton.testing.do_bench``: do_bench takes warm-up and repetitions
as *milliseconds* and derives the counts itself, so the stored ``reps``/``warmup`` would be
estimates; it cannot rotate input sets; and it imports Triton, which the bf16_dense path (torch
SDPA) does not otherwise need. The method is the same as do_bench's: a 256 MB buffer is zeroed
before every sample outside the timed region (H100 L2 is 50 MB), and each sample is bracketed by its
own pair of CUDA events, with one synchronisation at the end so the CPU never stalls the stream.

A sample is ``calls_per_sample`` back-to-back calls (on rotating inputs when given), its time
divided by that count. Short ops (under ``min_sample_ms``, e.g. the mini model's 0.2 ms calls) get
several calls per sample, chosen from a timed probe call after warm-up: a single event pair around
one launch-bound call times the launch gap too, while a model runs its attention calls back to
back with the host ahead of the GPU, so per-call figures summed over a policy over-estimated the
end-to-end run (13.5 % on the mini model, H100). Long ops keep one call per sample.

The timed callable must be the whole op (``attention()`` including the pre-pass and block-index
building), so host-side work that keeps the GPU waiting is part of the figure.

On a CPU the same loop runs on ``time.perf_counter`` and says so: ``method="cpu-wallclock"``.
That path exists for tests; its figures are never GPU latencies.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


MIN_REPS = 20
#: Seconds of sustained load before a process's first GPU measurement. Measured on the H100: from
#: idle, SDPA at 720p ran 60.6 ms, settling at 63.0 ms after about 20 s of load (boost clocks
#: giving way to the sustained ones); the first minutes of a study were 4-5 % fast without this.
GPU_WARMUP_S = 20.0
MIN_SAMPLE_MS = 5.0
MAX_CALLS_PER_SAMPLE = 64
L2_FLUSH_BYTES = 256 * 1024 * 1024
CPU_METHOD = "cpu-wallclock"

_flush_buffers: dict[torch.device, torch.Tensor] = {}
_warmed: set[torch.device] = set()


@dataclass(frozen=True)
class Timing:
    """Median and interquartile range of ``reps`` timed runs after ``warmup`` untimed ones.

    ``method`` says how: ``cuda-events+flush-l2``, ``cuda-events+rotate4`` (four input sets),
    ``x8`` (eight back-to-back calls per sample), joined with ``+``, or ``cpu-wallclock``.
    ``samples_ms`` keeps every rep (per-call time of each sample) in order.
    """

    median_ms: float
    iqr_ms: float
    reps: int
    warmup: int
    method: str
    samples_ms: tuple[float, ...] = field(default=(), repr=False)
    calls_per_sample: int = 1

    @property
    def is_gpu(self) -> bool:
        return self.method.startswith("cuda-events")

    @property
    def relative_iqr(self) -> float:
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else float("inf")

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        """JSON-ready; ``samples=True`` keeps the per-rep list."""
        d = asdict(self)
        d["samples_ms"] = list(self.samples_ms)
        if not samples:
            del d["samples_ms"]
        return d


def measure(
    fn: Callable[..., Any],
    *,
    warmup: int = 10,
    reps: int = 50,
    rotate: Sequence[Sequence[Any]] | None = None,
    flush_l2: bool = True,
    device: torch.device | str | None = None,
    clock: Callable[[], float] = time.perf_counter,
    min_sample_ms: float = MIN_SAMPLE_MS,
    min_reps: int = MIN_REPS,
) -> Timing:
    """Time ``fn``: ``fn()``, or ``fn(*rotate[i % len(rotate)])`` for rep i with ``rotate``.

    device: where ``fn`` runs; None means the current CUDA device if there is one, else the CPU.
    flush_l2: on CUDA, zero a 256 MB buffer before every rep (untimed). With ``rotate`` the input
      sets alone keep L2 cold when together they exceed it; flushing as well costs nothing timed.
    clock: the CPU path's clock, in seconds (tests pass a fake one); unused on CUDA.
    min_sample_ms: on CUDA, calls shorter than this are timed several back to back per sample
      (0 times every call alone).
    min_reps: the fewest reps accepted; the tuner keeps the default 20, a benchmark timing a
      whole forward or generation may take fewer (at least 2).

    Raises ValueError for fewer than ``min_reps`` reps, negative warm-up or an empty ``rotate``.
    """
    if reps < max(2, min_reps):
        raise ValueError(
            f"reps={reps}: at least {max(2, min_reps)} repetitions are needed for a median/IQR"
        )
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be >= 0")
    if rotate is not None and len(rotate) == 0:
        raise ValueError("rotate: give at least one input set (or None)")
    dev = _resolve(device)
    calls = _calls(fn, rotate)
    per = 1
    if dev.type == "cuda":
        samples, per = _cuda_samples(calls, warmup, reps, dev, flush_l2, min_sample_ms)
        parts = ["cuda-events"]
        if flush_l2:
            parts.append("flush-l2")
        if rotate is not None:
            parts.append(f"rotate{len(rotate)}")
        if per > 1:
            parts.append(f"x{per}")
        method = "+".join(parts)
    else:
        samples = _cpu_samples(calls, warmup, reps, clock)
        method = CPU_METHOD
    return summarize(samples, warmup=warmup, method=method, calls_per_sample=per)


def summarize(
    samples_ms: Sequence[float], *, warmup: int, method: str, calls_per_sample: int = 1
) -> Timing:
    """Median and IQR (75th - 25th percentile, linear interpolation as numpy's default)."""
    if len(samples_ms) < 2:
        raise ValueError(f"need at least two samples, got {len(samples_ms)}")
    q1, _, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    return Timing(
        median_ms=float(statistics.median(samples_ms)),
        iqr_ms=float(max(0.0, q3 - q1)),
        reps=len(samples_ms),
        warmup=warmup,
        method=method,
        samples_ms=tuple(float(s) for s in samples_ms),
        calls_per_sample=calls_per_sample,
    )


def _calls(fn: Callable[..., Any], rotate: Sequence[Sequence[Any]] | None) -> Callable[[int], Any]:
    if rotate is None:
        return lambda _i: fn()
    sets = [tuple(s) for s in rotate]
    return lambda i: fn(*sets[i % len(sets)])


def _cuda_samples(
    call: Callable[[int], Any],
    warmup: int,
    reps: int,
    dev: torch.device,
    flush_l2: bool,
    min_sample_ms: float,
) -> tuple[list[float], int]:
    import torch

    with torch.cuda.device(dev):
        buf = _flush_buffer(dev) if flush_l2 else None
        for i in range(warmup):
            call(i)
        per = _calls_per_sample(call, warmup, min_sample_ms, dev)
        torch.cuda.synchronize(dev)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        n = warmup + 1
        for i in range(reps):
            if buf is not None:
                buf.zero_()
            starts[i].record()
            for _ in range(per):
                call(n)
                n += 1
            ends[i].record()
        torch.cuda.synchronize(dev)
        return [s.elapsed_time(e) / per for s, e in zip(starts, ends, strict=True)], per


def _calls_per_sample(
    call: Callable[[int], Any], i: int, min_sample_ms: float, dev: torch.device
) -> int:
    """Back-to-back calls per sample so that a sample lasts at least ``min_sample_ms``."""
    import torch

    if min_sample_ms <= 0:
        return 1
    torch.cuda.synchronize(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call(i)
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    return max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(min_sample_ms / once)))


def _cpu_samples(
    call: Callable[[int], Any], warmup: int, reps: int, clock: Callable[[], float]
) -> list[float]:
    for i in range(warmup):
        call(i)
    samples = []
    for i in range(reps):
        t0 = clock()
        call(warmup + i)
        samples.append((clock() - t0) * 1e3)
    return samples


def _flush_buffer(dev: torch.device) -> torch.Tensor:
    import torch

    buf = _flush_buffers.get(dev)
    if buf is None:
        buf = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=dev)
        _flush_buffers[dev] = buf
    return buf


def warm_gpu(device: torch.device | str, *, seconds: float = GPU_WARMUP_S) -> float:
    """Run bf16 matmuls for ``seconds`` so the GPU's clocks reach their sustained state before
    the first measurement; once per process and device. Returns the seconds spent (0: done)."""
    import torch

    dev = _resolve(device)
    if dev.type != "cuda" or seconds <= 0 or dev in _warmed:
        return 0.0
    with torch.cuda.device(dev):
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(20):
                a @ a
            torch.cuda.synchronize(dev)
        del a
    _warmed.add(dev)
    return time.perf_counter() - t0


def _resolve(device: torch.device | str | None) -> torch.device:
    import torch

    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev
