"""How many ``def`` handler calls a replica runs at once (``BackendConfig.sync_threads``)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from daskserve import BackendConfig


class Overlap:
    """Counts how many calls run at the same moment."""

    def __init__(self):
        self._lock = threading.Lock()
        self._now = 0
        self.most = 0

    def __call__(self, seconds: float) -> int:
        with self._lock:
            self._now += 1
            self.most = max(self.most, self._now)
        time.sleep(seconds)
        with self._lock:
            self._now -= 1
        return self.most

    def peak(self) -> int:
        return self.most


def _peak_overlap(serve_client, tag: str, calls: int) -> int:
    handle = serve_client.get_handle(tag)
    # Once a call has run, lone calls take the thread lane and the rest the handler
    # pool (daskserve/lane.py): the limit holds for both together.
    handle.remote(0).result(timeout=60)
    with ThreadPoolExecutor(calls) as pool:
        list(pool.map(lambda _: handle.remote(0.3).result(timeout=60), range(calls)))
    return handle.options(method_name="peak").remote().result(timeout=30)


def test_default_is_one_more_thread_than_the_replicas_cpus(serve_client):
    serve_client.create_backend("overlap_default", Overlap, replica_options={"num_cpus": 1})
    serve_client.create_endpoint("overlap_default", backend="overlap_default")
    assert _peak_overlap(serve_client, "overlap_default", 8) == 2


def test_sync_threads_sets_the_pool_and_updates_live(serve_client):
    serve_client.create_backend("overlap_set", Overlap, config={"sync_threads": 5},
                                replica_options={"num_cpus": 1})
    serve_client.create_endpoint("overlap_set", backend="overlap_set")
    assert _peak_overlap(serve_client, "overlap_set", 8) == 5
    serve_client.update_backend_config("overlap_set", {"sync_threads": 8})
    assert _peak_overlap(serve_client, "overlap_set", 8) == 8


def test_sync_threads_never_exceeds_max_concurrent_queries(serve_client):
    serve_client.create_backend("overlap_capped", Overlap,
                                config={"sync_threads": 6, "max_concurrent_queries": 3},
                                replica_options={"num_cpus": 1})
    serve_client.create_endpoint("overlap_capped", backend="overlap_capped")
    assert _peak_overlap(serve_client, "overlap_capped", 8) == 3


@pytest.mark.parametrize("value,error", [(0, ValueError), (1.5, TypeError), ("4", TypeError)])
def test_sync_threads_is_validated(value, error):
    with pytest.raises(error, match="sync_threads"):
        BackendConfig(sync_threads=value)
