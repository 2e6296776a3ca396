"""Batch prediction: ``handle.map_partitions`` over Dask DataFrames, Bags and Arrays.

The calls leave from the Dask tasks on the workers, so these tests look at what
replicas saw (their process ids and tags) rather than trusting the results alone.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster, get_task_stream

import daskserve as serve
from daskserve.errors import ServeError
from daskserve.router import ReplicaLink, _Backend, _WaitQueue
from conftest import wait_until

TIMEOUT = 60


# -- backends -----------------------------------------------------------------------------
BUILT: dict[str, int] = {}  # replica tag -> constructions, in each worker process


class LinearModel:
    """Counts its constructions: the model must be built once per replica, not per task."""

    def __init__(self, weights):
        self.weights = np.asarray(weights, dtype="f8")
        self.replica = serve.get_replica_context().replica_tag
        BUILT[self.replica] = BUILT.get(self.replica, 0) + 1

    def __call__(self, X):
        return np.asarray(X) @ self.weights

    def predict(self, df, bias=0.0):
        return pd.Series(df.to_numpy() @ self.weights + bias, index=df.index, name="score")

    def proba(self, X):
        z = np.asarray(X) @ self.weights
        return np.stack([1 - 1 / (1 + np.exp(-z)), 1 / (1 + np.exp(-z)), np.zeros_like(z)],
                        axis=1)

    def where(self, df):
        """Which process scored the rows, with which model object."""
        return pd.DataFrame({"replica_pid": os.getpid(), "model": id(self),
                             "built": BUILT[self.replica]}, index=df.index)

    def words(self, items, suffix=""):
        return [f"{item}{suffix}" for item in items]


def backend_name(items):
    return [serve.get_replica_context().backend_tag] * len(items)


def fail_on_sevens(items):
    if 7 in items:
        raise ValueError(f"cannot score {items}")
    return items


@serve.accept_batch
def batched_sizes(partitions):
    return [[len(partitions)] * len(p) for p in partitions]


class Gate:
    """Holds its only slot while a call named 'block' runs, until the worker dies."""

    def __call__(self, items):
        if items == ["block"]:
            threading.Event().wait(TIMEOUT)
            return items
        return [(item, serve.get_replica_context().replica_tag) for item in items]


# -- helpers ----------------------------------------------------------------------------
def _deploy(client, name, backend, *init_args, **kwargs):
    client.create_backend(name, backend, *init_args, **kwargs)
    client.create_endpoint(name, backend=name)
    return client.get_handle(name)


def _frame(n_partitions=4, rows=5):
    pdf = pd.DataFrame({"a": np.arange(n_partitions * rows, dtype="f8"),
                        "b": np.ones(n_partitions * rows)})
    return pdf, dd.from_pandas(pdf, npartitions=n_partitions)


def _rows(i):
    return pd.DataFrame({"x": [1.0, 2.0, 3.0]}, index=[3 * i, 3 * i + 1, 3 * i + 2])


# -- the three collection kinds -----------------------------------------------------------
def test_dataframe_scores_every_row_lazily_with_meta(serve_client):
    handle = _deploy(serve_client, "linear", LinearModel, [2.0, 1.0])
    pdf, ddf = _frame()
    scores = handle.options(method_name="predict").map_partitions(ddf, meta=("score", "f8"))
    assert isinstance(scores, dd.Series) and scores.npartitions == ddf.npartitions
    assert scores.name == "score" and scores.dtype == np.float64
    expected = pdf["a"] * 2 + pdf["b"]
    pd.testing.assert_series_equal(scores.compute(), expected.rename("score"))
    # kwargs reach the handler; a second map_partitions never reuses the first's keys
    shifted = handle.options(method_name="predict").map_partitions(ddf, bias=10.0,
                                                                  meta=("score", "f8"))
    assert set(shifted.__dask_keys__()).isdisjoint(scores.__dask_keys__())
    pd.testing.assert_series_equal(shifted.compute(), (expected + 10).rename("score"))


def test_dataframe_meta_is_inferred_as_dask_does(serve_client):
    handle = _deploy(serve_client, "linear", LinearModel, [1.0, 1.0])
    pdf, ddf = _frame()
    scores = handle.options(method_name="predict").map_partitions(ddf)
    assert isinstance(scores, dd.Series) and scores.name == "score"
    assert scores.compute().tolist() == (pdf["a"] + 1).tolist()


def test_bag_partitions_are_lists(serve_client):
    handle = _deploy(serve_client, "linear", LinearModel, [1.0])
    bag = db.from_sequence(range(10), npartitions=3).map(lambda x: x * 2)  # lazy partitions
    words = handle.options(method_name="words").map_partitions(bag, suffix="!")
    assert isinstance(words, db.Bag) and words.npartitions == 3
    assert words.compute() == [f"{2 * i}!" for i in range(10)]
    with pytest.raises(TypeError, match="Bag has no meta"):
        handle.map_partitions(bag, meta=("x", "f8"))


def test_array_chunks_follow_meta(serve_client):
    handle = _deploy(serve_client, "linear", LinearModel, [1.0, 2.0, 3.0])
    x = np.arange(30, dtype="f8").reshape(10, 3)
    X = da.from_array(x, chunks=(4, 3))
    scores = handle.map_partitions(X, meta=np.empty((0,), "f8"))
    assert isinstance(scores, da.Array) and scores.chunks == ((4, 4, 2),)
    np.testing.assert_allclose(scores.compute(), x @ [1.0, 2.0, 3.0])
    # Without meta the handler is asked once for the shape of a row's result.
    proba = handle.options(method_name="proba").map_partitions(X)
    assert proba.chunks == ((4, 4, 2), (3,)) and proba.dtype == np.float64
    assert proba[:, 2].sum().compute() == 0 and proba.compute().shape == (10, 3)
    with pytest.raises(ValueError, match="rechunk"):
        handle.map_partitions(da.from_array(x, chunks=(4, 2)), meta=np.empty((0,), "f8"))


def test_not_a_dask_collection_is_refused(serve_client):
    handle = _deploy(serve_client, "linear", LinearModel, [1.0])
    with pytest.raises(TypeError, match="dask DataFrame"):
        handle.map_partitions(pd.DataFrame({"a": [1.0]}))


# -- one call per partition, near the data, through the serving path ----------------------
def test_calls_leave_from_the_task_to_a_replica_on_its_worker(serve_client):
    handle = _deploy(serve_client, "linear", LinearModel, [1.0],
                     config={"num_replicas": 2})
    dask_client = serve_client.dask_client
    rows = dd.from_map(_rows, range(12))
    scored = handle.options(method_name="where").map_partitions(
        rows, meta={"replica_pid": "i8", "model": "i8", "built": "i8"})
    with get_task_stream(dask_client) as stream:
        seen = scored.compute()
    # The task stream says where each partition's call left from.
    pid_of = dask_client.run(os.getpid)
    sender = {task["key"][1]: pid_of[task["worker"]] for task in stream.data
              if isinstance(task["key"], tuple) and task["key"][0].startswith("serve-")}
    assert sorted(sender) == list(range(12))
    assert set(seen["replica_pid"]) == set(pid_of.values())  # one replica on each worker
    for partition, rows_seen in seen.groupby(seen.index // 3):
        assert set(rows_seen["replica_pid"]) == {sender[partition]}  # never left its worker
    # One model object per replica served all its partitions: built once, never per task.
    assert (seen.groupby("replica_pid")["model"].nunique() == 1).all()
    assert set(seen["built"]) == {1}


def test_locality_prefers_the_worker_then_the_host_then_any_free_replica():
    def link(tag, address):
        return ReplicaLink("b", tag, address, None, lambda *_: None)

    here, same_host, elsewhere = (link("here", "tcp://10.0.0.1:4001"),
                                  link("same_host", "tcp://10.0.0.1:4002"),
                                  link("elsewhere", "tcp://10.0.0.2:4001"))
    backend = _Backend("b", {"max_concurrent_queries": 2}, [elsewhere, same_host, here],
                       _WaitQueue())
    worker = "tcp://10.0.0.1:4001"
    assert all(backend.pick(set(), worker) is here for _ in range(20))
    here.in_flight = 2  # at max_concurrent_queries: not free
    assert all(backend.pick(set(), worker) is same_host for _ in range(20))
    assert all(backend.pick({"same_host"}, worker) is elsewhere for _ in range(20))
    same_host.in_flight = 2
    assert all(backend.pick(set(), worker) is elsewhere for _ in range(20))
    elsewhere.in_flight = 2
    assert backend.pick(set(), worker) is None
    assert backend.pick(set(), "tcp://10.0.0.3:4001") is None


def test_method_name_and_batching_apply(serve_client):
    handle = _deploy(serve_client, "sizes", batched_sizes,
                     config={"max_batch_size": 4, "batch_wait_timeout": 0.05})
    sizes = handle.map_partitions(db.from_sequence(range(8), npartitions=8)).compute()
    assert len(sizes) == 8 and all(1 <= size <= 4 for size in sizes)


def test_shard_key_sends_every_partition_to_one_backend(serve_client):
    for tag in ("a", "b"):
        serve_client.create_backend(tag, backend_name)
    serve_client.create_endpoint("split", backend="a")
    serve_client.set_traffic("split", {"a": 0.5, "b": 0.5})
    handle = serve_client.get_handle("split")
    bag = db.from_sequence(range(24), npartitions=24)
    # 24 partitions split 50/50 land on a single backend with probability 2**-23.
    assert set(handle.map_partitions(bag).compute()) == {"a", "b"}
    keyed = handle.options(shard_key="customer-42")
    expected = keyed.remote([0]).result(timeout=TIMEOUT)[0]
    assert set(keyed.map_partitions(bag).compute()) == {expected}


# -- failures -----------------------------------------------------------------------------
def test_handler_error_fails_the_task_naming_backend_replica_and_partition(serve_client):
    handle = _deploy(serve_client, "sevens", fail_on_sevens)
    bag = db.from_sequence(range(12), npartitions=4)  # 7 is in partition 2
    with pytest.raises(ValueError, match=r"cannot score \[6, 7, 8\]") as info:
        handle.map_partitions(bag).compute()
    notes = "\n".join(info.value.__notes__)
    assert "backend 'sevens', replica 'sevens#" in notes
    assert "partition 2 of 'sevens'.map_partitions" in notes


def test_partition_waiting_for_a_replica_that_dies_is_retried():
    """A partition whose call waits for the only replica (held by another call) when
    that replica's worker is killed is not lost: the router sends it to the
    replacement, and the task, on a worker that survives, never fails."""
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as dask_client:
        client = serve.start(dask_client, http_options={"location": "NoServer"})
        try:
            handle = _deploy(client, "gate", Gate, config={"max_concurrent_queries": 1})
            first = handle.remote([0]).result(timeout=TIMEOUT)[0][1]
            pids = dask_client.run(_pid_and_actors)
            doomed, pid = next((a, pid) for a, (pid, actors) in pids.items() if actors)
            survivor = next(a for a in pids if a != doomed)

            def load():
                return dask_client.run(_router_load, "gate", workers=[survivor])[survivor]

            # Both of the survivor's threads: one call holds the replica, one waits.
            blocker = dask_client.compute(
                handle.map_partitions(db.from_sequence(["block"], npartitions=1)),
                workers=[survivor])
            wait_until(lambda: load() == 1, timeout=TIMEOUT, what="the blocking call")
            job = dask_client.compute(
                handle.map_partitions(db.from_sequence(range(6), npartitions=6)),
                workers=[survivor])
            wait_until(lambda: load() == 2, timeout=TIMEOUT, what="a partition to wait")

            os.kill(pid, signal.SIGKILL)

            results = job.result(timeout=TIMEOUT)
            assert [item for item, _ in results] == list(range(6))
            assert first not in {replica for _, replica in results}
            with pytest.raises(ServeError, match="gate"):  # it was running: it fails
                blocker.result(timeout=TIMEOUT)
        finally:
            client.shutdown()


def _pid_and_actors(dask_worker):
    return os.getpid(), list(dask_worker.state.actors)


def _router_load(backend, dask_worker):
    from daskserve.handle import _homes

    home = _homes.get(dask_worker.scheduler.address)
    return home.router.load(backend) if home is not None and home.router else 0


async def sleep_then_echo(seconds):
    await asyncio.sleep(seconds)
    return seconds


def test_calls_to_a_replica_in_the_same_process_skip_the_connection():
    """Workers in this very process (processes=False): calls reach the replica without
    a connection, and a slow call's result still comes back by ticket."""
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as dask_client:
        client = serve.start(dask_client, http_options={"location": "NoServer"})
        try:
            handle = _deploy(client, "sleepy", sleep_then_echo)
            slow, fast = handle.remote(0.3), handle.remote(0.0)  # one message, one tick
            assert fast.result(timeout=TIMEOUT) == 0.0
            assert slow.result(timeout=TIMEOUT) == 0.3
            with pytest.raises(AttributeError, match="no method 'missing'"):
                handle.options(method_name="missing").remote(1).result(timeout=TIMEOUT)
            (worker,) = cluster.workers.values()
            pool = dask_client.rpc
            assert not pool.available.get(worker.address) and \
                not pool.occupied.get(worker.address)
        finally:
            client.shutdown()


def test_local_scheduler_calls_through_the_clients_own_router(serve_client):
    """Without a worker (Dask's threaded scheduler), tasks use the client's router."""
    handle = _deploy(serve_client, "linear", LinearModel, [3.0])
    bag = db.from_sequence([1.0, 2.0], npartitions=2)
    with dask.config.set(scheduler="threads"):
        assert handle.options(method_name="words").map_partitions(bag).compute() == \
            ["1.0", "2.0"]
