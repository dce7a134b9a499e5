"""Which NVIDIA GPUs this process may use, read from the driver's /proc entries without importing torch (seconds)
at plan time; CUDA_VISIBLE_DEVICES narrows what the driver shows."""

from __future__ import annotations

import os
from pathlib import Path

DRIVER = Path("/proc/driver/nvidia")


def _listed_devices() -> list[str] | None:
    """The devices CUDA_VISIBLE_DEVICES names (``-1`` and empty entries hide), None when it is unset."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    return [d for d in visible.split(",") if d.strip() and d.strip() != "-1"]


def nvidia_gpu_present() -> bool:
    """Whether this machine shows an NVIDIA GPU to this process: the driver's version entry, and
    CUDA_VISIBLE_DEVICES not hiding every device."""
    if _listed_devices() == []:
        return False
    return (DRIVER / "version").is_file()


def visible_gpu_count() -> int:
    """NVIDIA GPUs this process may use: the driver's list of GPUs, cut to CUDA_VISIBLE_DEVICES when that is set."""
    gpus = DRIVER / "gpus"
    present = len(list(gpus.iterdir())) if gpus.is_dir() else 0
    listed = _listed_devices()
    if listed is None:
        return present
    return min(present, len(listed)) if present else 0
