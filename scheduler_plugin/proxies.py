"""Where HTTP proxies run: next to the scheduler, on every worker host, or nowhere.

A proxy is a ``daskserve.proxy.Proxy`` on some Dask server's event loop with its
own router. "HeadOnly" runs it in the scheduler process; "EveryNode" runs one per
host, in one of its workers, through that worker's plugin (``WorkerOp.START_PROXY``).
Each proxy's router identifies itself to the controller so that API calls wait until
every proxy routes by the change.
"""
from __future__ import annotations

import asyncio
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
        self._stopped = False

    async def start(self) -> None:
        if self.options.location == "HeadOnly":
            router = Router(self._scheduler.rpc, self._scheduler.address, "proxy-head")
            self.head = Proxy(router, self.options)
            await self.head.start()
            self.listener_ids.add(router.listener_id)

    def _on_worker(self, address: str, op: str) -> Any:
        return getattr(self._scheduler.rpc(address), op)

    async def add_worker(self, address: str, host: str) -> None:
        if self.options.location != "EveryNode" or host in self.on_hosts or self._stopped:
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

    def lose_worker(self, address: str) -> list[str]:
        """Forget the proxy of a worker that left; returns the hosts it leaves
        without a proxy (for ``rehome``)."""
        orphaned = []
        for host, worker in list(self.on_hosts.items()):
            if worker == address:
                del self.on_hosts[host]
                self.listener_ids.discard(f"proxy-{address}")
                orphaned.append(host)
        return orphaned

    async def rehome(self, host: str) -> None:
        """Run a host's proxy on another of its live workers.

        A host keeps serving HTTP as long as any of its workers lives, not only
        until the one that ran its proxy goes. A worker that cannot start it (its
        port still held by the process that lost contact, say) is passed over.
        """
        for address, state in list(self._scheduler.workers.items()):
            if host in self.on_hosts:
                return  # started meanwhile, on a worker that joined
            if state.host == host:
                await self.add_worker(address, host)
        if host not in self.on_hosts:
            logger.warning("no live worker on %s could take over its HTTP proxy; the "
                           "next worker to join there will run it", host)

    def addresses(self) -> list[str]:
        """URLs of the running proxies."""
        urls = []
        if self.head is not None:
            urls.append(f"http://{self.options.host}:{self.head.port}")
        urls += [f"http://{host}:{self.options.port}" for host in self.on_hosts]
        return urls

    async def stop(self) -> None:
        self._stopped = True  # workers joining or proxies moving start nothing now
        if self.head is not None:
            await self.head.stop()
            self.head = None
        await asyncio.gather(*(self._stop_on(address) for address in self.on_hosts.values()))
        self.on_hosts.clear()
        self.listener_ids.clear()

    async def _stop_on(self, address: str) -> None:
        """Stop a worker's proxy; it drains its requests first (``Proxy.stop``)."""
        try:
            await self._on_worker(address, WorkerOp.STOP_PROXY)()
        except Exception as exc:  # a worker that is going away anyway
            logger.info("stopping the proxy on %s: %r", address, exc)
