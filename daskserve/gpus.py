"""NVIDIA GPU discovery through nvidia-ml-py (the ``pynvml`` module).

Only used when a worker declares no ``GPU`` resource: then its GPUs are the ones
NVML can see. Without the NVIDIA driver this finds none, which is the truth on a
machine without NVIDIA GPUs, not an error.
"""
from __future__ import annotations

import os


def count_gpus() -> int:
    """Number of NVIDIA GPUs this process may use (respects CUDA_VISIBLE_DEVICES)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return 0
    try:
        total = pynvml.nvmlDeviceGetCount()
    except Exception:
        return 0
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return total
    return len([d for d in visible.split(",") if d.strip()])


def visible_devices(slots: list[int]) -> str:
    """``CUDA_VISIBLE_DEVICES`` for the given slots of this worker's own GPU list.

    Slots index the GPUs the worker may use, so a worker that dask-cuda already
    pinned to ``CUDA_VISIBLE_DEVICES=3,0`` maps slot 0 to device 3.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else None
    return ",".join(devices[i] if devices else str(i) for i in slots)
