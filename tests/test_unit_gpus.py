"""Which GPUs a worker offers and which one a replica sees: the logic needs no GPU.

NVML's count comes in as a number, so every case here runs on any machine; the
worker cases use real Dask workers.
"""
from __future__ import annotations

import os

import pytest
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin

from daskserve.gpus import (own_devices, parse_visible, select, started_by_dask_cuda,
                            worker_setting)
from daskserve.worker_plugin import ServeWorkerPlugin


def dask_cuda_rotation(worker: int, gpus: int) -> str:
    """The CUDA_VISIBLE_DEVICES dask-cuda gives its ``worker``-th worker: every GPU,
    that worker's first."""
    order = list(range(gpus))
    return ",".join(map(str, order[worker:] + order[:worker]))


# -- CUDA_VISIBLE_DEVICES as CUDA reads it ----------------------------------------------------
def test_unset_means_every_gpu_nvml_finds():
    assert parse_visible(None, 3) == ["0", "1", "2"]


def test_no_driver_means_no_gpu_whatever_the_variable_says():
    assert parse_visible(None, 0) == []
    assert parse_visible("0,1", 0) == []
    assert parse_visible("GPU-5d1f2a6e-0000-1111-2222-333344445555", 0) == []


def test_order_and_subset_are_kept():
    assert parse_visible("2,0", 4) == ["2", "0"]
    assert parse_visible(" 1 , 0 ", 2) == ["1", "0"]


@pytest.mark.parametrize("value", ["", "-1", "foo,0", "4", ",0"])
def test_a_first_entry_naming_no_device_hides_every_gpu(value):
    assert parse_visible(value, 4) == []


def test_the_list_ends_at_the_first_entry_naming_no_device():
    assert parse_visible("0,7,1", 2) == ["0"]
    assert parse_visible("1,-1,0", 2) == ["1"]


def test_uuids_are_kept_as_written_and_may_mix_with_indices():
    gpu = "GPU-5d1f2a6e-0000-1111-2222-333344445555"
    mig = "MIG-0a1b2c3d-4444-5555-6666-777788889999"
    assert parse_visible(f"{gpu},1,{mig}", 2) == [gpu, "1", mig]


# -- a worker's own GPUs ----------------------------------------------------------------------
def test_a_plain_worker_offers_every_visible_gpu():
    assert own_devices("3,1", 4, dask_cuda=False) == ["3", "1"]
    assert own_devices(None, 2, dask_cuda=False) == ["0", "1"]


def test_each_dask_cuda_worker_offers_its_own_gpu_and_together_each_gpu_once():
    offered = [own_devices(dask_cuda_rotation(i, 4), 4, dask_cuda=True) for i in range(4)]
    assert offered == [["0"], ["1"], ["2"], ["3"]]


def test_a_dask_cuda_worker_pinned_to_a_uuid_offers_that_gpu():
    gpu = "GPU-5d1f2a6e-0000-1111-2222-333344445555"
    assert own_devices(f"{gpu},GPU-ffff", 2, dask_cuda=True) == [gpu]


def test_a_dask_cuda_worker_without_a_usable_gpu_offers_none():
    assert own_devices("-1", 2, dask_cuda=True) == []
    assert own_devices("0", 0, dask_cuda=True) == []


# -- what a replica sees ----------------------------------------------------------------------
def test_slots_are_named_in_the_workers_own_terms():
    assert select(["3", "0", "1", "2"], [0]) == "3"
    assert select(["3", "0", "1", "2"], [1, 3]) == "0,2"
    assert select(["GPU-a", "GPU-b"], [1]) == "GPU-b"
    assert select(["3"], []) == ""


def test_a_slot_past_the_workers_gpus_is_refused_not_renamed():
    with pytest.raises(ValueError, match=r"slot\(s\) \[1\].*1 GPU\(s\) \(3\)"):
        select(["3"], [0, 1])
    with pytest.raises(ValueError, match=r"0 GPU\(s\) \(none\)"):
        select([], [0])


# -- telling dask-cuda's workers apart, on real workers ---------------------------------------
class Unrelated(WorkerPlugin):
    pass


def test_plugins_of_other_origins_are_not_dask_cuda():
    assert not started_by_dask_cuda([])
    assert not started_by_dask_cuda([Unrelated(), ServeWorkerPlugin()])


def test_dask_cuda_plugins_mark_a_dask_cuda_worker():
    plugins = pytest.importorskip("dask_cuda.plugins", reason="dask-cuda is not installed")
    assert started_by_dask_cuda([Unrelated(), plugins.PreImport(None)])


def test_a_worker_reports_its_own_setting(dask_client):
    expected = os.environ.get("CUDA_VISIBLE_DEVICES")  # the workers inherit it
    assert set(dask_client.run(worker_setting).values()) == {(expected, False)}


def test_a_worker_set_up_like_dask_cudas_reports_its_rotation():
    plugins = pytest.importorskip("dask_cuda.plugins", reason="dask-cuda is not installed")
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0",
                      env={"CUDA_VISIBLE_DEVICES": "1,0"},
                      plugins={plugins.PreImport(None)}) as cluster, Client(cluster) as client:
        assert list(client.run(worker_setting).values()) == [("1,0", True)]


def test_a_replicas_own_setting_does_not_narrow_its_workers(dask_client, serve_client):
    """A replica sets CUDA_VISIBLE_DEVICES in its worker process; the worker's GPUs
    are still the ones it had before, so the next replica gets the slot it was given."""
    def narrowed_then_own(dask_worker):
        plugin = ServeWorkerPlugin.on(dask_worker)
        before = worker_setting(dask_worker)
        plugin.set_environment("gpu-test#narrow", {"CUDA_VISIBLE_DEVICES": "7"})
        try:
            return os.environ["CUDA_VISIBLE_DEVICES"], worker_setting(dask_worker) == before
        finally:
            plugin.remove_replica("gpu-test#narrow")

    assert set(dask_client.run(narrowed_then_own).values()) == {("7", True)}
