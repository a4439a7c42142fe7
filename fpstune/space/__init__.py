"""From search spaces to Optuna suggestions: kernel points per bucket, schedules as policies."""

from __future__ import annotations

from .kernel import (
    Bucket,
    KernelBucket,
    KernelPoint,
    bucket_points,
    feasible_kernel_points,
    kernel_buckets,
    kernel_from_params,
    suggest_kernel,
)
from .schedule import phase_params, schedule_from_params, suggest_schedule

__all__ = [
    "Bucket",
    "KernelBucket",
    "KernelPoint",
    "bucket_points",
    "feasible_kernel_points",
    "kernel_buckets",
    "kernel_from_params",
    "phase_params",
    "schedule_from_params",
    "suggest_kernel",
    "suggest_schedule",
]
