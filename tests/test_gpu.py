"""Serving on real GPUs through dask-cuda's ``LocalCUDACluster``.

Whole and fractional GPU placement, the ``CUDA_VISIBLE_DEVICES`` a replica sees, and
nvidia-ml-py's figures in ``/-/metrics``. These run where NVML finds an NVIDIA GPU and
dask-cuda imports; elsewhere they skip and say which is missing. Nothing here stands
in for a GPU.
"""
from __future__ import annotations

import importlib
import os
from collections import Counter

import pytest
from distributed import Client, get_worker

import daskserve as serve
from daskserve.gpus import count_gpus, worker_devices

from conftest import free_port, wait_until
from test_observability import scrape, total

TIMEOUT = 60


def gpu_problem() -> str | None:
    """Why the GPU tests cannot run here, or None."""
    if not count_gpus():
        return "no NVIDIA GPU here (nvidia-ml-py finds none): GPU tests run only on GPUs"
    try:
        importlib.import_module("dask_cuda")
    except ImportError as exc:
        return f"dask-cuda cannot be imported ({exc}); pip install '.[gpu]'"
    return None


pytestmark = pytest.mark.skipif(gpu_problem() is not None, reason=str(gpu_problem()))


@pytest.fixture(scope="module")
def cuda_client():
    from dask_cuda import LocalCUDACluster

    # Two threads per worker: as many CPUs, one per half-GPU replica.
    with LocalCUDACluster(threads_per_worker=2, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        yield client


@pytest.fixture
def gpu_serve(cuda_client):
    port = free_port()
    client = serve.start(cuda_client, http_options={"port": port})
    yield client, f"http://127.0.0.1:{port}"
    client.shutdown()


class Report:
    """Where a replica landed and the CUDA_VISIBLE_DEVICES it was built with."""

    def __init__(self):
        self.worker = get_worker().address
        self.visible = os.environ.get("CUDA_VISIBLE_DEVICES")

    def __call__(self, *request):
        return {"replica": serve.get_replica_context().replica_tag,
                "worker": self.worker, "visible": self.visible}


def every_replica(handle, replicas: int) -> dict[str, dict]:
    answers: dict[str, dict] = {}
    for _ in range(100 * replicas):
        answer = handle.remote().result(TIMEOUT)
        answers[answer["replica"]] = answer
        if len(answers) == replicas:
            break
    assert len(answers) == replicas, f"only {sorted(answers)} answered"
    return answers


def scale_past_the_gpus(client, name: str, running: int) -> None:
    """One replica more than the GPUs hold waits: placement never doubles a booking."""
    client.update_backend_config(name, {"num_replicas": running + 1})
    wait_until(lambda: client.list_backends()[name]["replicas"] == {"running": running,
                                                                     "pending": 1},
               timeout=TIMEOUT, what=f"{running} replicas of {name} running, one pending")


def serve_report(client, name: str, replicas: int, num_gpus: float) -> dict[str, dict]:
    client.create_backend(name, Report, config={"num_replicas": replicas},
                          replica_options={"num_gpus": num_gpus})
    client.create_endpoint(name, backend=name)
    return every_replica(client.get_handle(name), replicas)


def test_each_dask_cuda_worker_offers_its_own_gpu(cuda_client):
    devices = cuda_client.run(worker_devices)
    assert all(len(own) == 1 for own in devices.values()), devices
    assert len({own[0] for own in devices.values()}) == len(devices) == count_gpus()


def test_whole_gpus_one_replica_each_and_never_more(cuda_client, gpu_serve):
    client, _ = gpu_serve
    own = cuda_client.run(worker_devices)  # one GPU per worker
    gpus = len(own)
    answers = serve_report(client, "whole", gpus, 1)
    # Each replica sees exactly its worker's own GPU, named as the worker names it.
    assert sorted(a["visible"] for a in answers.values()) == sorted(d[0] for d in own.values())
    assert all([a["visible"]] == own[a["worker"]] for a in answers.values())
    scale_past_the_gpus(client, "whole", gpus)


def test_half_gpus_two_replicas_share_each_and_never_more(cuda_client, gpu_serve):
    client, _ = gpu_serve
    own = cuda_client.run(worker_devices)  # one GPU per worker
    gpus = len(own)
    answers = serve_report(client, "half", 2 * gpus, 0.5)
    assert all([a["visible"]] == own[a["worker"]] for a in answers.values())
    assert sorted(Counter(a["visible"] for a in answers.values()).values()) == [2] * gpus
    scale_past_the_gpus(client, "half", 2 * gpus)


def test_gpu_figures_per_worker_in_metrics(cuda_client, gpu_serve):
    _, base_url = gpu_serve

    def memory_total(dask_worker) -> int:
        import pynvml

        pynvml.nvmlInit()
        device = worker_devices(dask_worker)[0]
        handle = (pynvml.nvmlDeviceGetHandleByIndex(int(device)) if device.isdigit()
                  else pynvml.nvmlDeviceGetHandleByUUID(device))
        return pynvml.nvmlDeviceGetMemoryInfo(handle).total

    expected = cuda_client.run(memory_total)
    s = scrape(f"{base_url}/-/metrics")
    for worker, memory in expected.items():
        assert total(s, "serve_gpu_memory_total_bytes", worker=worker, gpu="0") == memory
        assert total(s, "serve_gpu_memory_used_bytes", worker=worker, gpu="0") >= 0
        assert 0 <= total(s, "serve_gpu_utilization_percent", worker=worker, gpu="0") <= 100
    # Each worker reports its own GPU only: each GPU of the node appears once.
    assert total(s, "serve_gpu_memory_total_bytes") == sum(expected.values())
