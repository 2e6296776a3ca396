"""Where HTTP proxies run: next to the scheduler, on every worker host, or nowhere.

A proxy is a ``daskserve.proxy.Proxy`` on some Dask server's event loop with its
own router. "HeadOnly" runs it in the scheduler process; "EveryNode" runs one per
host, in one of its workers, through that worker's plugin (``WorkerOp.START_PROXY``).
Each proxy's router identifies itself to the controller so that API calls wait until
every proxy routes by the change.
"""
from __future__ import annotations

import logging
from typing import Any

from daskserve.config import HTTPOptions
from daskserve.protocol import WorkerOp
from daskserve.proxy import Proxy
from daskserve.router import Router

logger = logging.getLogger(__name__)


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

    def _on_worker(self, address: str, op: str) -> Any:
        return getattr(self._scheduler.rpc(address), op)

    async def add_worker(self, address: str, host: str) -> None:
        if self.options.location != "EveryNode" or host in self.on_hosts:
            return
        self.on_hosts[host] = address
        listener_id = f"proxy-{address}"
        try:
            await self._on_worker(address, WorkerOp.START_PROXY)(
                options=self.options.to_dict(), listener_id=listener_id)
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

    async def stop(self) -> None:
        if self.head is not None:
            await self.head.stop()
            self.head = None
        for address in self.on_hosts.values():
            try:
                await self._on_worker(address, WorkerOp.STOP_PROXY)()
            except Exception as exc:  # a worker that is going away anyway
                logger.info("stopping the proxy on %s: %r", address, exc)
        self.on_hosts.clear()
        self.listener_ids.clear()
