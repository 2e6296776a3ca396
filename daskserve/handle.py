"""Handles: call an endpoint from Python, in a driver or inside another backend.

A handle is only a name plus options; it finds the router of the process it is
used in (one per serve instance and event loop) the first time it is called, so
it can be pickled into another backend and work there. The router lives on the
"home" loop of this process: a worker's loop inside replicas, the Dask client's
loop in a driver.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Any

from distributed.core import ConnectionPool

from .context import current_replica
from .router import Router


@dataclass
class _Home:
    pool: ConnectionPool
    loop: asyncio.AbstractEventLoop
    router: Router | None = None


_homes: dict[str, _Home] = {}
_homes_lock = threading.Lock()


def register_home(scheduler_address: str, pool: ConnectionPool,
                  loop: asyncio.AbstractEventLoop) -> None:
    """Say which connection pool and loop this process uses to reach an instance."""
    with _homes_lock:
        home = _homes.get(scheduler_address)
        if home is None or home.loop.is_closed() or (home.router and home.router.closed):
            _homes[scheduler_address] = _Home(pool, loop)


def _router_for(scheduler_address: str) -> tuple[Router, asyncio.AbstractEventLoop]:
    with _homes_lock:
        home = _homes.get(scheduler_address)
        if home is None:
            replica = current_replica()
            if replica is not None:  # a handle pickled elsewhere, used inside a replica
                home = _homes.get(replica.scheduler_address)
        if home is None:
            raise RuntimeError(
                f"no connection to the serve instance at {scheduler_address}; call "
                f"serve.connect(dask_client) in this process first")
        if home.router is None or home.router.closed:
            home.router = Router(home.pool, scheduler_address)
        return home.router, home.loop


class _HandleBase:
    """``min_version`` and ``epoch`` name the newest routing table the creator's own
    changes produced (see ``protocol.TableVersion``): the first call waits until the
    router has it, so an endpoint created just before is found. A handle that outlives
    its controller instance (a restarted scheduler, a new ``serve.start``) waits for
    no version of the old one: that version may never come in the new one.
    """

    def __init__(self, scheduler_address: str, endpoint: str, *, method_name: str = "__call__",
                 shard_key: Any = None, min_version: int = -1, epoch: str | None = None):
        self.scheduler_address = scheduler_address
        self.endpoint_name = endpoint
        self.method_name = method_name
        self.shard_key = shard_key
        self.min_version = min_version
        self.epoch = epoch

    def options(self, *, method_name: str | None = None, shard_key: Any = None):
        """A copy of this handle calling another method and/or with a shard key."""
        return type(self)(self.scheduler_address, self.endpoint_name,
                          method_name=method_name or self.method_name,
                          shard_key=self.shard_key if shard_key is None else shard_key,
                          min_version=self.min_version, epoch=self.epoch)

    def __reduce__(self):
        return (_rebuild, (type(self), self.scheduler_address, self.endpoint_name,
                           self.method_name, self.shard_key, self.min_version, self.epoch))

    async def _call(self, router: Router, args: tuple, kwargs: dict,
                    near: str | None = None) -> Any:
        if router.version < self.min_version or \
                (self.epoch is not None and router.epoch != self.epoch):
            await router.wait_for_version(self.min_version, self.epoch)
        return await router.call(self.endpoint_name, self.method_name, args, kwargs,
                                 self.shard_key, near=near)

    def map_partitions(self, collection: Any, *args: Any, meta: Any = None,
                       **kwargs: Any) -> Any:
        """Score a Dask DataFrame, Bag or Array with this endpoint, lazily: one call
        per partition, made by the task that holds it (see ``daskserve.batch``)."""
        from .batch import map_partitions

        return map_partitions(self, collection, *args, meta=meta, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(endpoint={self.endpoint_name!r})"


def _rebuild(cls, address, endpoint, method_name, shard_key, min_version, epoch=None):
    return cls(address, endpoint, method_name=method_name, shard_key=shard_key,
               min_version=min_version, epoch=epoch)


class ServeHandle(_HandleBase):
    """Synchronous handle: ``remote`` returns a future with ``result(timeout)``."""

    def remote(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        router, loop = _router_for(self.scheduler_address)
        if _on_loop_thread(loop):
            raise RuntimeError(
                "a sync handle cannot wait on the event loop it runs on; in async code "
                "use get_handle(..., sync=False) and await handle.remote(...)")
        return asyncio.run_coroutine_threadsafe(self._call(router, args, kwargs), loop)


class AsyncServeHandle(_HandleBase):
    """Asyncio handle: ``await handle.remote(...)`` gives the result."""

    async def remote(self, *args: Any, **kwargs: Any) -> Any:
        router, loop = _router_for(self.scheduler_address)
        if asyncio.get_running_loop() is loop:
            return await self._call(router, args, kwargs)
        future = asyncio.run_coroutine_threadsafe(self._call(router, args, kwargs), loop)
        return await asyncio.wrap_future(future)


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
