"""Where HTTP proxies run: next to the scheduler, on every worker host, or nowhere.

A proxy is a ``daskserve.proxy.Proxy`` on some Dask server's event loop with its
own router. "HeadOnly" runs it in the scheduler process; "EveryNode" runs one in
one worker process per host. Each proxy's router identifies itself to the
controller so that API calls return only once every proxy routes by the change.
"""
from __future__ import annotations

import logging
from typing import Any

from daskserve.config import HTTPOptions
from daskserve.proxy import Proxy
from daskserve.router import Router

logger = logging.getLogger(__name__)

_WORKER_ATTRIBUTE = "_daskserve_proxy"


async def _start_on_worker(options: dict, listener_id: str, dask_worker: Any = None) -> int:
    proxy = Proxy(Router(dask_worker.rpc, dask_worker.scheduler.address, listener_id),
                  HTTPOptions(**options))
    await proxy.start()
    setattr(dask_worker, _WORKER_ATTRIBUTE, proxy)
    return proxy.port


async def _stop_on_worker(dask_worker: Any = None) -> None:
    proxy = getattr(dask_worker, _WORKER_ATTRIBUTE, None)
    if proxy is not None:
        await proxy.stop()
        delattr(dask_worker, _WORKER_ATTRIBUTE)


class ProxyFleet:
    """The proxies of one serve instance and the listener ids of their routers."""

    def __init__(self, scheduler: Any, options: HTTPOptions):
        self._scheduler = scheduler
        self.options = options
        self.head: Proxy | None = None
        self.on_hosts: dict[str, str] = {}     # host -> worker address running a proxy
        self.listener_ids: set[str] = set()

    async def start(self) -> None:
        if self.options.location == "HeadOnly":
            router = Router(self._scheduler.rpc, self._scheduler.address, "proxy-head")
            self.head = Proxy(router, self.options)
            await self.head.start()
            self.listener_ids.add(router.listener_id)

    async def add_worker(self, client_getter: Any, address: str, host: str) -> None:
        if self.options.location != "EveryNode" or host in self.on_hosts:
            return
        self.on_hosts[host] = address
        listener_id = f"proxy-{address}"
        client = await client_getter()
        try:
            await client.run(_start_on_worker, self.options.to_dict(), listener_id,
                             workers=[address])
            self.listener_ids.add(listener_id)
        except Exception as exc:
            logger.warning("could not start a proxy on %s: %r", address, exc)
            self.on_hosts.pop(host, None)

    def lose_worker(self, address: str) -> None:
        for host, worker in list(self.on_hosts.items()):
            if worker == address:
                del self.on_hosts[host]
                self.listener_ids.discard(f"proxy-{address}")

    def addresses(self) -> list[str]:
        """URLs of the running proxies."""
        urls = []
        if self.head is not None:
            urls.append(f"http://{self.options.host}:{self.head.port}")
        urls += [f"http://{host}:{self.options.port}" for host in self.on_hosts]
        return urls

    async def stop(self, client_getter: Any) -> None:
        if self.head is not None:
            await self.head.stop()
            self.head = None
        if self.on_hosts:
            client = await client_getter()
            await client.run(_stop_on_worker, workers=list(self.on_hosts.values()))
            self.on_hosts.clear()
        self.listener_ids.clear()
