"""Batch prediction: score a Dask collection with the replicas that serve live traffic.

``handle.map_partitions(collection, *args, meta=None, **kwargs)`` builds a lazy
collection of the same kind whose every task makes one handle call with its
partition. The call leaves from the task itself, through the router of the worker
process the task runs in, so a partition is never gathered to the client, the model
is never loaded in a task, and everything a handle call gets applies to partitions
too: traffic policy and shard keys, ``max_concurrent_queries`` back-pressure,
batching, retries when a replica dies before running a call, metrics.

Locality: the call names the task's worker (``Query.near``), and the router sends it
to a replica on that worker, or else on that host, when one is under
``max_concurrent_queries``; only otherwise does it cross the network. The Dask config
key ``daskserve.batch.locality`` (default true) turns that preference off.

Each partition is pickled once, by the router, in the message that carries it (and
the result once, by the replica); nothing here copies or pickles it. A replica in the
task's own process gets the message in process, with no connection or copies.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import math
import uuid
from typing import Any

import dask

from .handle import _HandleBase, _on_loop_thread, _router_for, register_home

LOCALITY_CONFIG = "daskserve.batch.locality"
# Keys of the tasks that start replicas (scheduler_plugin/replicas.py names them).
REPLICA_TASK_PREFIX = "daskserve-replica-"
ROOM_CHECK_S = 0.1


def map_partitions(handle: _HandleBase, collection: Any, *args: Any, meta: Any = None,
                   **kwargs: Any) -> Any:
    """The collection of ``handler(partition, *args, **kwargs)`` results, lazily.

    ``args`` go through Dask as they would to ``collection.map_partitions``: Dask
    collections among them are aligned partition by partition, delayed objects are
    computed first. ``kwargs`` travel as they are, inside the task, so no name of
    theirs can collide with a keyword Dask itself takes (``token``, ``chunks``...).
    """
    kind = _kind(collection)
    if kind == "dataframe":
        from dask.dataframe.utils import no_default

        return collection.map_partitions(_FrameCall(handle, kwargs), *args,
                                         meta=no_default if meta is None else meta)
    if kind == "bag":
        if meta is not None:
            raise TypeError("meta applies to dask DataFrames and Arrays; a dask Bag has "
                            "no meta")
        import dask.bag as db

        n = collection.npartitions
        # One index per partition, aligned with it by Dask, names the partition in errors.
        numbers = db.from_sequence(range(n), npartitions=n)
        return collection.map_partitions(_BagCall(handle, kwargs), numbers, *args)
    return _map_blocks(handle, collection, args, kwargs, meta)


def _kind(collection: Any) -> str:
    """Which of the three collection kinds; imports only the one it is."""
    module = type(collection).__module__
    kinds = (("dataframe", "dask.dataframe", ("DataFrame", "Series", "Index")),
             ("bag", "dask.bag", ("Bag",)),
             ("array", "dask.array", ("Array",)))
    for kind, package, names in kinds:
        if module.startswith(package + "."):
            mod = importlib.import_module(package)
            if isinstance(collection, tuple(getattr(mod, n) for n in names)):
                return kind
    raise TypeError(f"map_partitions takes a dask DataFrame, Series, Index, Bag or Array, "
                    f"got {module}.{type(collection).__name__}")


# -- arrays -------------------------------------------------------------------------
def _map_blocks(handle: _HandleBase, x: Any, args: tuple, kwargs: dict, meta: Any) -> Any:
    """One call per chunk, the result's chunk grid following the input's.

    Dask cannot know the shape of what a model returns, so the output's chunks are
    read from ``meta``: axis 0 keeps the input's row chunks (one result row per input
    row, as ``predict`` gives); a further axis keeps the input's chunks where ``meta``
    is empty along it, and takes ``meta``'s size where it is not
    (``np.empty((0, 3))`` for three class probabilities per row). Trailing input
    axes the result drops must be one chunk each, so that every call sees whole rows.
    Without ``meta`` the handler is called once, now, on one row of ones shaped like
    the first chunk's rows, the way Dask infers ``map_blocks`` dtypes.
    """
    import numpy as np

    if meta is None:
        sample = np.ones((1,) + tuple(c[0] for c in x.chunks[1:]), dtype=x.dtype)
        result = np.asarray(_call(handle, sample, None, args, kwargs))
        meta = np.empty((0,) + result.shape[1:], dtype=result.dtype)
    elif not hasattr(meta, "ndim") or not hasattr(meta, "dtype"):
        meta = np.empty((0,), dtype=np.dtype(meta))  # a dtype, as dask's map_blocks takes
    if meta.ndim == 0:
        raise ValueError("meta for a dask Array must have at least one axis (axis 0 "
                         "holds one result per input row)")
    dropped = list(range(meta.ndim, x.ndim))
    split = [axis for axis in dropped if len(x.chunks[axis]) > 1]
    if split:
        raise ValueError(
            f"the result (meta has {meta.ndim} axes) drops axes {dropped} of the input, "
            f"but axes {split} are split into several chunks, so one call would see part "
            f"of a row; rechunk them first: x.rechunk({{{split[0]}: -1}})")
    chunks = [x.chunks[0]]
    for axis in range(1, meta.ndim):
        size = meta.shape[axis]
        if axis < x.ndim and (size == 0 or len(x.chunks[axis]) > 1):
            chunks.append(x.chunks[axis])
        else:
            chunks.append((size if size else math.nan,))
    new_axis = list(range(x.ndim, meta.ndim)) or None
    whole_rows = all(len(c) == 1 for c in x.chunks[1:])
    return x.map_blocks(_ArrayCall(handle, kwargs, whole_rows), *args, chunks=tuple(chunks),
                        drop_axis=dropped or None, new_axis=new_axis, meta=meta,
                        dtype=meta.dtype)


# -- what each task runs ----------------------------------------------------------------
class _PartitionCall:
    """The function in every task of one ``map_partitions``; carries the handle.

    Its Dask token is random, so two ``map_partitions`` over the same input never
    share keys: a served model is not a pure function (a new version, a canary), and
    Dask must not hand back an earlier run's results as this one's.
    """

    def __init__(self, handle: _HandleBase, kwargs: dict):
        self.handle = handle
        self.kwargs = kwargs
        self._token = uuid.uuid4().hex

    def __dask_tokenize__(self):
        return type(self).__name__, self._token

    def __repr__(self) -> str:  # Dask names tasks after their function
        return f"serve-{self.handle.endpoint_name}-{self.handle.method_name}"


class _FrameCall(_PartitionCall):
    # Dask fills in ``partition_info`` because this signature names it.
    def __call__(self, partition, *args, partition_info=None):
        number = partition_info["number"] if partition_info else None
        return _call(self.handle, partition, number, args, self.kwargs)


class _BagCall(_PartitionCall):
    def __call__(self, partition, numbers, *args):
        if not isinstance(partition, list):  # bag partitions may be lazy iterators
            partition = list(partition)
        return _call(self.handle, partition, next(iter(numbers)), args, self.kwargs)


class _ArrayCall(_PartitionCall):
    def __init__(self, handle: _HandleBase, kwargs: dict, whole_rows: bool):
        super().__init__(handle, kwargs)
        self.whole_rows = whole_rows  # chunks split axis 0 only: name them by one number

    # Dask fills in ``block_id`` because this signature names it.
    def __call__(self, block, *args, block_id=None):
        index = block_id[0] if block_id is not None and self.whole_rows else block_id
        return _call(self.handle, block, index, args, self.kwargs)


def _call(handle: _HandleBase, partition: Any, index: Any, args: tuple,
          kwargs: dict) -> Any:
    """One handle call from the current thread: on a worker, through that worker's
    router (registered as this process's home for the instance if nothing was yet),
    naming the worker as the place to prefer; elsewhere (Dask's local schedulers, the
    meta inference Dask runs in the client) through the caller's own home."""
    worker = _current_worker()
    near = None
    if worker is not None:
        address = worker.scheduler.address
        register_home(address, worker.rpc, worker.loop.asyncio_loop)
        if dask.config.get(LOCALITY_CONFIG, True):
            near = worker.address
    else:
        address = handle.scheduler_address
    router, loop = _router_for(address)
    if _on_loop_thread(loop):
        raise RuntimeError("map_partitions tasks must not run on the event loop of "
                           "the process's serve router")
    future = asyncio.run_coroutine_threadsafe(
        handle._call(router, (partition, *args), kwargs, near=near), loop)
    try:
        if worker is not None:
            _wait_making_room_for_replicas(future, worker)
        return future.result()
    except Exception as exc:
        if index is not None and hasattr(exc, "add_note"):
            exc.add_note(f"raised for partition {index} of "
                         f"{handle.endpoint_name!r}.map_partitions "
                         f"(method {handle.method_name!r})")
        raise


def _wait_making_room_for_replicas(future: concurrent.futures.Future, worker: Any) -> None:
    """Wait for a call, leaving the worker's thread pool if a replica needs a thread.

    A replica starts as a Dask task (its actor's creation). When every thread of a
    worker holds a partition waiting for a replica that is to start on that same
    worker (the replacement of one that died, say), neither could ever proceed; so a
    waiting task secedes then, and the replica start, which the controller submits
    with a high priority, takes the thread. Otherwise a task keeps its thread, so a
    worker never holds more partitions in flight than it has threads.
    """
    while not concurrent.futures.wait([future], timeout=ROOM_CHECK_S).done:
        if _replica_start_waits(worker) and _secede():
            return  # the caller waits for the rest outside the pool


def _secede() -> bool:
    from distributed import secede

    try:
        secede()
    except Exception:  # not one of the worker's task threads: it holds no slot
        return False
    return True


def _replica_start_waits(worker: Any) -> bool:
    try:  # read from this thread while the worker's loop may change the sets
        waiting = [*worker.state.ready, *worker.state.constrained]
    except RuntimeError:
        return False
    return any(isinstance(ts.key, str) and ts.key.startswith(REPLICA_TASK_PREFIX)
               for ts in waiting)


def _current_worker() -> Any:
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None
