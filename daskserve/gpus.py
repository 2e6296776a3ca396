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
