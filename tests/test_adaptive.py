"""Adaptive Dask clusters and replicas, on private LocalClusters.

``cluster.adapt()`` grows the cluster for replicas that fit on no worker and shrinks
it once they are gone; a worker that hosts replicas is retired only after they moved
(started elsewhere, then drained), whether Adaptive, ``cluster.scale`` or the
controller's own packing empties it. Handle callers run throughout and every request
must succeed.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter

import cloudpickle
import dask
import requests
from distributed import Client, LocalCluster

import daskserve as serve
from conftest import wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 90                  # safety limit per wait: worker processes start slowly here
MAX_CALLS_PER_THREAD = 20000  # bounds the load loops whatever the timing


def where(*args):
    time.sleep(0.005)
    return serve.get_replica_context().replica_tag


class Callers:
    """A few handle callers in threads, counting answers and failures."""

    def __init__(self, handle, threads: int = 3):
        self.handle = handle
        self.counts: Counter = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True)
                        for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        for _ in range(MAX_CALLS_PER_THREAD):
            if self._stop.is_set():
                return
            try:
                self.handle.remote().result(timeout=TIMEOUT)
                self.counts["ok"] += 1
            except Exception as exc:
                self.counts["failed"] += 1
                self.errors.append(repr(exc))

    def more_answers(self, count: int) -> None:
        target = self.counts["ok"] + count
        wait_until(lambda: self.counts["ok"] >= target, TIMEOUT, what=f"{count} answers")

    def stop(self) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(timeout=TIMEOUT)


class Private:
    """A LocalCluster of its own with a serve instance (no HTTP)."""

    def __init__(self, n_workers: int, threads_per_worker: int, http_api: bool = False):
        routes = dask.config.get("distributed.scheduler.http.routes")
        if http_api:  # the scheduler's HTTP API, as the Kubernetes operator uses it
            routes = [*routes, "distributed.http.scheduler.api"]
        with dask.config.set({"distributed.scheduler.http.routes": routes}):
            self.cluster = LocalCluster(n_workers=n_workers,
                                        threads_per_worker=threads_per_worker,
                                        processes=True, dashboard_address="127.0.0.1:0")
        self.client = Client(self.cluster)
        self.serve = serve.start(self.client, http_options={"location": "NoServer"})

    def workers(self) -> int:
        return len(self.client.scheduler_info(n_workers=-1)["workers"])

    def hosts(self) -> set[str]:
        """Workers whose ledger entry books anything (they host replicas)."""
        return {address for address, booked in self.serve.info()["workers"].items()
                if booked["used"].get("CPU")}

    def close(self) -> None:
        try:
            self.serve.shutdown()
        finally:
            self.client.close()
            self.cluster.close()


def test_adaptive_cluster_grows_for_replicas_and_shrinks_after_them():
    env = Private(n_workers=1, threads_per_worker=1)  # one one-CPU replica per worker
    callers = None
    try:
        env.cluster.adapt(minimum=1, maximum=3, interval="200ms", wait_count=2)
        # One replica fits; two wait, and the cluster grows for them.
        env.serve.create_backend("b", where, config={"num_replicas": 3})
        env.serve.create_endpoint("b", backend="b")
        callers = Callers(env.serve.get_handle("b"))
        wait_until(lambda: env.serve.list_backends()["b"]["replicas"] == {"running": 3},
                   TIMEOUT, interval=0.2, what="3 running replicas")
        assert env.workers() == 3 and len(env.hosts()) == 3
        callers.more_answers(20)

        # Down to one replica: the two workers left empty are retired.
        env.serve.update_backend_config("b", {"num_replicas": 1})
        wait_until(lambda: env.workers() == 1, TIMEOUT, interval=0.2,
                   what="the cluster to shrink to 1 worker")
        callers.more_answers(20)
        entry = env.serve.list_backends()["b"]
        assert entry["replicas"] == {"running": 1} and entry["status"] == "RUNNING"
        assert env.serve.get_handle("b").remote().result(TIMEOUT).startswith("b#")
    finally:
        if callers is not None:
            callers.stop()
        env.close()
    assert callers.counts["failed"] == 0, callers.errors[:5]


def test_retired_and_packed_workers_lose_no_request():
    env = Private(n_workers=2, threads_per_worker=2)
    callers = None
    try:
        env.serve.create_backend("b", where, config={"num_replicas": 2})
        env.serve.create_endpoint("b", backend="b")
        assert len(env.hosts()) == 2  # a fixed cluster spreads replicas
        callers = Callers(env.serve.get_handle("b"))
        callers.more_answers(20)

        # cluster.scale retires a worker that hosts a replica: it moves first.
        env.cluster.scale(1)
        wait_until(lambda: env.workers() == 1, TIMEOUT, interval=0.2, what="1 worker")
        assert env.serve.list_backends()["b"]["replicas"] == {"running": 2}
        callers.more_answers(20)

        # Spread again over two workers: 1 replica, then 2 (the second goes to the
        # empty worker).
        env.cluster.scale(2)
        env.client.wait_for_workers(2, timeout=TIMEOUT)
        wait_until(lambda: len(env.serve.info()["workers"]) == 2, TIMEOUT,
                   what="the controller to see the new worker")
        env.serve.update_backend_config("b", {"num_replicas": 1})
        env.serve.update_backend_config("b", {"num_replicas": 2})
        assert len(env.hosts()) == 2
        callers.more_answers(20)

        # Adaptive wants one worker; both replicas fit on one, so the controller
        # moves one and the emptied worker is retired.
        env.cluster.adapt(minimum=1, maximum=2, interval="200ms", wait_count=2)
        wait_until(lambda: env.workers() == 1, TIMEOUT, interval=0.2,
                   what="replicas packed onto 1 worker and the other retired")
        assert env.serve.list_backends()["b"]["replicas"] == {"running": 2}
        assert len(env.hosts()) == 1
        callers.more_answers(20)
    finally:
        if callers is not None:
            callers.stop()
        env.close()
    assert callers.counts["failed"] == 0, callers.errors[:5]


def test_scheduler_http_api_counts_and_moves_replicas():
    """The scheduler's HTTP API (what the Kubernetes operator's autoscaler calls)
    asks the same questions as Adaptive and gets the same answers."""
    env = Private(n_workers=2, threads_per_worker=2, http_api=True)
    callers = None
    try:
        api = f"{env.cluster.dashboard_link.rsplit('/', 1)[0]}/api/v1"
        # Five one-CPU replicas on two two-CPU workers: one waits for a third worker.
        env.serve.create_backend("b", where, config={"num_replicas": 5})
        env.serve.create_endpoint("b", backend="b")
        assert env.serve.list_backends()["b"]["replicas"] == {"running": 4, "pending": 1}
        assert requests.get(f"{api}/adaptive_target", timeout=TIMEOUT).json() == {"workers": 3}

        # One replica, then two: a fixed cluster spreads them, one per worker.
        env.serve.update_backend_config("b", {"num_replicas": 1})
        env.serve.update_backend_config("b", {"num_replicas": 2})
        callers = Callers(env.serve.get_handle("b"))
        callers.more_answers(20)
        leaving, staying = sorted(env.hosts())
        reply = requests.post(f"{api}/retire_workers", json={"workers": [leaving]},
                              timeout=TIMEOUT)
        assert reply.status_code == 200 and leaving in reply.json(), reply.text
        assert env.hosts() == {staying}
        assert env.serve.list_backends()["b"]["replicas"] == {"running": 2}
        callers.more_answers(20)
    finally:
        if callers is not None:
            callers.stop()
        env.close()
    assert callers.counts["failed"] == 0, callers.errors[:5]
