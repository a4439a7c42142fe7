"""Timing one GPU op the way fpstune stores it: warm-up, cold L2 (or rotating inputs), per-rep
CUDA events, median and IQR.

Why our own loop rather than ``triton.testing.do_bench``: do_bench takes warm-up and repetitions
as *milliseconds* and derives the counts itself, so the stored ``reps``/``warmup`` would be
estimates; it cannot rotate input sets; and it imports Triton, which the bf16_dense path (torch
SDPA) does not otherwise need. The method is the same as do_bench's: a 256 MB buffer is zeroed
before every rep outside the timed region (H100 L2 is 50 MB), and each rep is bracketed by its own
pair of CUDA events, with one synchronisation at the end so the CPU never stalls the stream.

The timed callable must be the whole op (``attention()`` including the pre-pass and block-index
building), so host-side work that keeps the GPU waiting is part of the figure.

On a CPU the same loop runs on ``time.perf_counter`` and says so: ``method="cpu-wallclock"``.
That path exists for tests; its figures are never GPU latencies.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

MIN_REPS = 20
L2_FLUSH_BYTES = 256 * 1024 * 1024
CPU_METHOD = "cpu-wallclock"

_flush_buffers: dict[torch.device, torch.Tensor] = {}


@dataclass(frozen=True)
class Timing:
    """Median and interquartile range of ``reps`` timed runs after ``warmup`` untimed ones.

    ``method`` says how: ``cuda-events+flush-l2``, ``cuda-events+rotate4`` (four input sets),
    both joined with ``+``, or ``cpu-wallclock``. ``samples_ms`` keeps every rep in call order.
    """

    median_ms: float
    iqr_ms: float
    reps: int
    warmup: int
    method: str
    samples_ms: tuple[float, ...] = field(default=(), repr=False)

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
) -> Timing:
    """Time ``fn``: ``fn()``, or ``fn(*rotate[i % len(rotate)])`` for rep i with ``rotate``.

    device: where ``fn`` runs; None means the current CUDA device if there is one, else the CPU.
    flush_l2: on CUDA, zero a 256 MB buffer before every rep (untimed). With ``rotate`` the input
      sets alone keep L2 cold when together they exceed it; flushing as well costs nothing timed.
    clock: the CPU path's clock, in seconds (tests pass a fake one); unused on CUDA.

    Raises ValueError for fewer than 20 reps, negative warm-up or an empty ``rotate``.
    """
    if reps < MIN_REPS:
        raise ValueError(
            f"reps={reps}: at least {MIN_REPS} repetitions are needed for a median/IQR"
        )
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be >= 0")
    if rotate is not None and len(rotate) == 0:
        raise ValueError("rotate: give at least one input set (or None)")
    dev = _resolve(device)
    calls = _calls(fn, rotate)
    if dev.type == "cuda":
        samples = _cuda_samples(calls, warmup, reps, dev, flush_l2)
        parts = ["cuda-events"]
        if flush_l2:
            parts.append("flush-l2")
        if rotate is not None:
            parts.append(f"rotate{len(rotate)}")
        method = "+".join(parts)
    else:
        samples = _cpu_samples(calls, warmup, reps, clock)
        method = CPU_METHOD
    return summarize(samples, warmup=warmup, method=method)


def summarize(samples_ms: Sequence[float], *, warmup: int, method: str) -> Timing:
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
    )


def _calls(fn: Callable[..., Any], rotate: Sequence[Sequence[Any]] | None) -> Callable[[int], Any]:
    if rotate is None:
        return lambda _i: fn()
    sets = [tuple(s) for s in rotate]
    return lambda i: fn(*sets[i % len(sets)])


def _cuda_samples(
    call: Callable[[int], Any], warmup: int, reps: int, dev: torch.device, flush_l2: bool
) -> list[float]:
    with torch.cuda.device(dev):
        buf = _flush_buffer(dev) if flush_l2 else None
        for i in range(warmup):
            call(i)
        torch.cuda.synchronize(dev)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if buf is not None:
                buf.zero_()
            starts[i].record()
            call(warmup + i)
            ends[i].record()
        torch.cuda.synchronize(dev)
        return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


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
    buf = _flush_buffers.get(dev)
    if buf is None:
        buf = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=dev)
        _flush_buffers[dev] = buf
    return buf


def _resolve(device: torch.device | str | None) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev
