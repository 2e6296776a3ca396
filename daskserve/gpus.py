"""NVIDIA GPU discovery through nvidia-ml-py (the ``pynvml`` module).

A worker that declares no ``GPU`` resource offers the GPUs it may use; placement
hands a worker's GPUs out by slot, an index into that list, and a replica's
``CUDA_VISIBLE_DEVICES`` names the devices at its slots. Without the NVIDIA driver
this finds none, which is the truth on a machine without NVIDIA GPUs, not an error.

Which GPUs a worker may use is not simply what NVML sees, since NVML ignores
``CUDA_VISIBLE_DEVICES``:

- The variable narrows and orders the GPUs, as CUDA reads it.
- dask-cuda (``LocalCUDACluster``, ``dask cuda worker``) starts one worker per GPU
  and gives each a rotation of *every* GPU, its own first (``1,2,3,0``), the others
  staying visible for transfers between GPUs. Such a worker computes on its first GPU
  alone, so counting the whole list would offer each GPU of the node once per worker.
- Replicas in a worker process set ``CUDA_VISIBLE_DEVICES`` to their own GPUs, which
  narrows ``os.environ`` for the whole process; the worker's own list is the one
  from before any replica (``ServeWorkerPlugin.baseline_environment``).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from distributed import Worker, get_worker

from .worker_plugin import PLUGIN_NAME, ServeWorkerPlugin

UUID_PREFIXES = ("GPU-", "MIG-")


def parse_visible(value: str | None, found: int) -> list[str]:
    """The devices that ``CUDA_VISIBLE_DEVICES=value`` leaves usable where NVML finds
    ``found`` GPUs, as entries of the variable, in its order.

    Unset means every GPU. Entries are CUDA indices or UUIDs (``GPU-...``, ``MIG-...``);
    CUDA stops reading at the first entry that names no device, so ``-1`` or an empty
    value hides every GPU and ``0,7,1`` on a two-GPU machine leaves only ``0``.
    """
    if found <= 0:
        return []
    if value is None:
        return [str(index) for index in range(found)]
    devices = []
    for entry in (part.strip() for part in value.split(",")):
        if not (entry.startswith(UUID_PREFIXES) or (entry.isdigit() and int(entry) < found)):
            break
        devices.append(entry)
    return devices


def own_devices(visible: str | None, found: int, dask_cuda: bool) -> list[str]:
    """The GPUs a worker's replicas may be given, by slot: a dask-cuda worker's first
    visible GPU, any other worker's every visible GPU."""
    devices = parse_visible(visible, found)
    return devices[:1] if dask_cuda else devices


def started_by_dask_cuda(plugins: Iterable[Any]) -> bool:
    """Whether a worker with these plugins was started by dask-cuda, which sets up each
    of its workers with plugins of its own (CPU affinity, RMM, pre-imports) and sets no
    flag or resource that would tell otherwise."""
    return any(type(plugin).__module__.partition(".")[0] == "dask_cuda"
               for plugin in plugins)


def worker_devices(dask_worker: Worker | None = None) -> list[str]:
    """This worker's GPUs as ``CUDA_VISIBLE_DEVICES`` entries, in slot order.

    ``dask_worker`` is filled in by ``Client.run``; in a task the current worker is
    used, and outside any worker the process's own environment.
    """
    worker = dask_worker if dask_worker is not None else _current_worker()
    visible, dask_cuda = worker_setting(worker)
    return own_devices(visible, _nvml_count(), dask_cuda)


def worker_setting(dask_worker: Worker | None) -> tuple[str | None, bool]:
    """What decides a worker's GPUs besides NVML: its own ``CUDA_VISIBLE_DEVICES``,
    as it was before any replica of its process set one, and whether dask-cuda
    started it."""
    if dask_worker is None:
        return os.environ.get("CUDA_VISIBLE_DEVICES"), False
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    environment = (plugin.baseline_environment()
                   if isinstance(plugin, ServeWorkerPlugin) else os.environ)
    return (environment.get("CUDA_VISIBLE_DEVICES"),
            started_by_dask_cuda(dask_worker.plugins.values()))


def count_gpus(dask_worker: Worker | None = None) -> int:
    """Number of NVIDIA GPUs this worker may use (see ``worker_devices``)."""
    return len(worker_devices(dask_worker))


def visible_devices(slots: list[int], dask_worker: Worker | None = None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a replica given these slots of this worker's GPUs,
    named as the worker names them: a dask-cuda worker pinned to ``3,0,1,2`` maps
    slot 0 to device 3."""
    return select(worker_devices(dask_worker), slots)


def select(devices: list[str], slots: list[int]) -> str:
    """The devices at ``slots``, comma-separated. A slot past the list means the worker
    declared a ``GPU`` resource larger than the GPUs it can use; naming some other
    device instead would put the replica on a GPU it was not given."""
    beyond = [slot for slot in slots if not 0 <= slot < len(devices)]
    if beyond:
        raise ValueError(f"GPU slot(s) {beyond} asked of a worker that can use "
                         f"{len(devices)} GPU(s) ({','.join(devices) or 'none'}): its "
                         f"declared GPU resource exceeds the GPUs it has")
    return ",".join(devices[slot] for slot in slots)


def _current_worker() -> Worker | None:
    try:
        return get_worker()
    except ValueError:
        return None


def _nvml_count() -> int:
    """GPUs the NVIDIA driver reports on this machine, whatever the process may use."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    except Exception:
        return 0
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
