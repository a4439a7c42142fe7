"""What a measurement or a policy was made on: GPU type, driver and software versions.

Two fingerprints are the *same GPU type* when name, compute capability and SM count agree; a
policy tuned on one GPU type is not trusted on another. Driver, torch, triton and fpstune versions
may move latency but not correctness, so a difference there is worth a warning, not a refusal.
"""

from __future__ import annotations

import importlib.metadata
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

GPU_TYPE_FIELDS = ("gpu", "capability", "sm_count")
SOFTWARE_FIELDS = ("driver", "torch", "triton", "fpstune")

_Count = Annotated[int, Field(strict=True, ge=0)]


class HardwareFingerprint(BaseModel):
    """GPU name, SM count, capability and versions; a CPU reads ``gpu="cpu"``, 0 SMs, (0, 0).

    ``driver`` is the NVIDIA driver version where it can be read cheaply (``"550.54.15"``), else
    the CUDA version the driver supports (``"cuda 12.4"``), else None.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu: str = Field(min_length=1)
    sm_count: _Count
    capability: tuple[_Count, _Count]
    driver: str | None = None
    torch: str = Field(min_length=1)
    triton: str | None = None
    fpstune: str = Field(min_length=1)

    @property
    def is_cpu(self) -> bool:
        return self.gpu == "cpu"


def current_fingerprint(device: torch.device | str | int | None = None) -> HardwareFingerprint:
    """This machine's fingerprint for ``device`` (default: the current CUDA device, else CPU)."""
    import torch

    dev = _resolve(device)
    versions: dict[str, Any] = {
        "torch": torch.__version__,
        "triton": _version("triton", "pytorch-triton", "pytorch-triton-rocm"),
        "fpstune": _version("fpstune") or "unknown",
    }
    if dev.type != "cuda":
        return HardwareFingerprint(gpu="cpu", sm_count=0, capability=(0, 0), **versions)
    props = torch.cuda.get_device_properties(dev)
    return HardwareFingerprint(
        gpu=props.name,
        sm_count=props.multi_processor_count,
        capability=(props.major, props.minor),
        driver=_driver_version(),
        **versions,
    )


def device_identity(device: torch.device | str | int | None = None) -> dict[str, Any]:
    """Which physical GPU ``device`` is: ``{"gpu_uuid": "GPU-…", "gpu_index": n}``, the index as
    the host numbers it (the first ``CUDA_VISIBLE_DEVICES`` entry the device maps to, as Ray
    sets it for an actor with one GPU); empty for a CPU. Two GPUs of one fingerprint differ
    here, so a measurement can be traced to the card it ran on."""
    import torch

    dev = _resolve(device)
    if dev.type != "cuda":
        return {}
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    host_index = int(visible[index]) if index < len(visible) and visible[index].isdigit() else index
    uuid = str(torch.cuda.get_device_properties(dev).uuid)
    return {"gpu_uuid": uuid if uuid.startswith("GPU-") else f"GPU-{uuid}", "gpu_index": host_index}


def differences(a: HardwareFingerprint, b: HardwareFingerprint) -> dict[str, tuple[Any, Any]]:
    """``{field: (a's value, b's value)}`` for every field that differs, in field order."""
    return {
        name: (getattr(a, name), getattr(b, name))
        for name in HardwareFingerprint.model_fields
        if getattr(a, name) != getattr(b, name)
    }


def same_gpu_type(a: HardwareFingerprint, b: HardwareFingerprint) -> bool:
    return not differences(a, b).keys() & set(GPU_TYPE_FIELDS)


def describe_differences(a: HardwareFingerprint, b: HardwareFingerprint) -> str:
    """One line, e.g. ``gpu: NVIDIA H100 80GB HBM3 vs NVIDIA A100-SXM4-80GB; torch: 2.11 vs 2.13``
    (empty when they agree)."""
    return "; ".join(
        f"{name}: {format_value(name, x)} vs {format_value(name, y)}"
        for name, (x, y) in differences(a, b).items()
    )


def format_value(field: str, value: Any) -> str:
    if field == "capability":
        return f"{value[0]}.{value[1]}"
    return "none" if value is None else str(value)


def _resolve(device: torch.device | str | int | None) -> torch.device:
    import torch

    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _version(*dists: str) -> str | None:
    # importlib.metadata, never an import: triton must stay unloaded until a kernel runs.
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@lru_cache(maxsize=1)
def _driver_version() -> str | None:
    import torch

    # Cheap sources only (no nvidia-smi subprocess): NVML if installed, the kernel module's
    # version file, then the CUDA version the driver supports as torch reports it.
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        pass
    try:
        # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 ..."
        first_line = Path("/proc/driver/nvidia/version").read_text().partition("\n")[0]
        for word in first_line.split():
            if "." in word and word.replace(".", "").isdigit():
                return word
    except OSError:
        pass
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    if get is not None:
        try:
            v = int(get())
            return f"cuda {v // 1000}.{v % 1000 // 10}"
        except Exception:
            return None
    return None
