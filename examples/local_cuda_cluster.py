"""Serve on GPU nodes with dask-cuda: replicas on whole GPUs and on halves of one.

``LocalCUDACluster`` starts one Dask worker per GPU of this machine and pins each to
its GPU through ``CUDA_VISIBLE_DEVICES`` (its own GPU first). The workers declare no
``GPU`` resource: daskserve counts the GPU each one computes on, so ``num_gpus=1``
takes a worker's GPU and two ``num_gpus=0.5`` replicas share one. Each replica
reports the ``CUDA_VISIBLE_DEVICES`` it was started with and what nvidia-ml-py says
about that GPU.

Needs NVIDIA GPUs and ``pip install 'daskserve[gpu]'``. Where either is missing it
prints why on stderr and exits with status 1 without starting anything.

Run: python examples/local_cuda_cluster.py
(The file is not called dask_cuda.py: run as a script, it would shadow the package.)
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from collections import defaultdict
from urllib.request import urlopen

import pynvml
from distributed import Client

import daskserve as serve

PORT = int(os.environ.get("DASKSERVE_PORT", "8000"))


def gpu_problem() -> str | None:
    """Why this machine cannot run the example, or None."""
    try:
        pynvml.nvmlInit()
        try:
            found = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        return f"no NVIDIA GPU: nvidia-ml-py cannot reach the driver ({exc})"
    if not found:
        return "no NVIDIA GPU: nvidia-ml-py finds none"
    try:
        importlib.import_module("dask_cuda")
    except ImportError as exc:
        return f"dask-cuda cannot be imported ({exc}): pip install 'daskserve[gpu]'"
    return None


def describe(device: str) -> dict:
    """Name and memory of one ``CUDA_VISIBLE_DEVICES`` entry, from nvidia-ml-py.

    Like dask-cuda, this reads an index as NVML's (CUDA numbers GPUs the same way
    under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``); a UUID is unambiguous.
    """
    handle = (pynvml.nvmlDeviceGetHandleByIndex(int(device)) if device.isdigit()
              else pynvml.nvmlDeviceGetHandleByUUID(device))
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return {"uuid": pynvml.nvmlDeviceGetUUID(handle), "name": pynvml.nvmlDeviceGetName(handle),
            "memory_used_mib": memory.used >> 20, "memory_total_mib": memory.total >> 20}


class GpuReport:
    """A stand-in model that says which GPU it was given."""

    def __init__(self):
        # Read in the constructor: CUDA_VISIBLE_DEVICES is this replica's own now, and
        # a CUDA library imported here (torch, cupy) reads it when it first starts.
        self.visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        pynvml.nvmlInit()

    def __call__(self, *request):
        return {"replica": serve.get_replica_context().replica_tag,
                "CUDA_VISIBLE_DEVICES": self.visible,
                "gpus": [describe(d) for d in self.visible.split(",") if d]}


def line(answer: dict) -> str:
    gpus = "; ".join(f"{g['name']} {g['uuid'][:12]}, {g['memory_used_mib']} of "
                     f"{g['memory_total_mib']} MiB in use" for g in answer["gpus"])
    return (f"replica {answer['replica']} sees "
            f"CUDA_VISIBLE_DEVICES={answer['CUDA_VISIBLE_DEVICES']}: {gpus}")


def every_replica(handle, replicas: int) -> dict[str, dict]:
    """One answer from each replica: calls go to whichever replica the router picks."""
    answers: dict[str, dict] = {}
    for _ in range(100 * replicas):
        answer = handle.remote().result(timeout=60)
        answers[answer["replica"]] = answer
        if len(answers) == replicas:
            break
    return answers


def by_gpu(answers: dict[str, dict]) -> dict[str, list[str]]:
    replicas = defaultdict(list)
    for answer in answers.values():
        for gpu in answer["gpus"]:
            replicas[gpu["uuid"]].append(answer["replica"])
    return replicas


def main() -> None:
    problem = gpu_problem()
    if problem:
        sys.exit(f"{os.path.basename(__file__)} cannot run here: {problem}")
    from dask_cuda import LocalCUDACluster

    # Two threads per worker: a worker offers as many CPUs, one per half-GPU replica.
    with LocalCUDACluster(threads_per_worker=2, dashboard_address=":0") as cluster, \
            Client(cluster) as dask_client:
        gpus = len(cluster.workers)
        print(f"LocalCUDACluster: {gpus} worker(s), one per GPU")
        client = serve.start(dask_client, http_options={"port": PORT})

        # A whole GPU for each replica: one replica per GPU.
        client.create_backend("whole", GpuReport, config={"num_replicas": gpus},
                              replica_options={"num_gpus": 1})
        client.create_endpoint("whole", backend="whole", route="/whole")
        url = f"http://127.0.0.1:{PORT}/whole"
        print(f"$ curl {url}")
        with urlopen(url, timeout=60) as reply:
            print("over HTTP:", line(json.loads(reply.read())))
        answers = every_replica(client.get_handle("whole"), gpus)
        for answer in answers.values():
            print("via a handle:", line(answer))
        print("whole: each replica has a GPU of its own:",
              sorted(map(len, by_gpu(answers).values())) == [1] * gpus)
        client.delete_endpoint("whole")
        client.delete_backend("whole")  # returns once its replicas are gone, GPUs free

        # Half a GPU each: two replicas per GPU.
        client.create_backend("shared", GpuReport, config={"num_replicas": 2 * gpus},
                              replica_options={"num_gpus": 0.5})
        client.create_endpoint("shared", backend="shared", route="/shared")
        answers = every_replica(client.get_handle("shared"), 2 * gpus)
        for answer in answers.values():
            print("via a handle:", line(answer))
        print("shared: each GPU serves two half-GPU replicas:",
              sorted(map(len, by_gpu(answers).values())) == [2] * gpus)
        client.shutdown()


if __name__ == "__main__":
    main()
