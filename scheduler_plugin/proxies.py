"""Where HTTP proxies run: next to the scheduler, on every worker host, or nowhere.

A proxy is a ``daskserve.proxy.Proxy`` on some Dask server's event loop with its
own router. "HeadOnly" runs it in the scheduler process; "EveryNode" runs one per
host, in one of its workers, through that worker's plugin (``WorkerOp.START_PROXY``).
Each proxy's router identifies itself to the controller so that API calls wait until
every proxy routes by the change.

An EveryNode proxy listens on its host's address as the scheduler knows it (the
interface the worker already serves Dask on, and the address ``addresses`` reports),
not on ``http_options["host"]``: that one value cannot name each host's own address,
and a loopback proxy could not be reached from any other machine. Only a wildcard
``host`` ("0.0.0.0", "::") is taken as given, to listen on every interface of every
host. So EveryNode opens HTTP on no network the workers were not already on.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from daskserve.config import HTTPOptions
from daskserve.protocol import WorkerOp
from daskserve.proxy import Proxy
from daskserve.router import Router

from .placement import ResourceLedger

logger = logging.getLogger(__name__)

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
# A host whose workers could not take its proxy over (its port still held by a
# worker that was dropped but has not exited) is tried again, this often at most.
REHOME_RETRY_MAX_S = 5.0


class ProxyFleet:
    """The proxies of one serve instance and the listener ids of their routers."""

    def __init__(self, scheduler: Any, options: HTTPOptions, ledger: ResourceLedger):
        self._scheduler = scheduler
        self.options = options
        self.head: Proxy | None = None
        self._ledger = ledger
        # host -> worker address running a proxy; the ledger's own dict, so that
        # placement keeps replicas off those workers where it can.
        self.on_hosts = ledger.proxy_hosts
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

    def _bind_host(self, host: str) -> str:
        """The address an EveryNode proxy on ``host`` listens on (see the module)."""
        return self.options.host if self.options.host in WILDCARD_HOSTS else host

    async def add_worker(self, address: str, host: str) -> None:
        if self.options.location != "EveryNode" or host in self.on_hosts or self._stopped:
            return
        self.on_hosts[host] = address
        listener_id = f"proxy-{address}"
        options = {**self.options.to_dict(), "host": self._bind_host(host)}
        try:
            await self._on_worker(address, WorkerOp.START_PROXY)(
                options=options, listener_id=listener_id)
            self.listener_ids.add(listener_id)
        except Exception as exc:
            logger.warning("could not start a proxy on %s: %r", address, exc)
            if self.on_hosts.get(host) == address:  # not a proxy started meanwhile
                del self.on_hosts[host]

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
        until the one that ran its proxy goes. When none can start it (the port is
        still held by a worker the scheduler dropped but whose process has not
        exited yet), they are asked again, more slowly each round, until one
        does or none is left there; waiting for a new worker to join the host could
        leave it without HTTP for good.
        """
        delay = 0.5
        while not self._stopped and host not in self.on_hosts:
            workers = [a for a, s in list(self._scheduler.workers.items()) if s.host == host]
            if not workers:
                return  # the next worker to join there runs it
            for address in sorted(workers, key=self._replicas_on):  # emptiest first
                await self.add_worker(address, host)
            if host not in self.on_hosts:
                logger.warning("no live worker on %s could take over its HTTP proxy; "
                               "trying again in %.1f s", host, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, REHOME_RETRY_MAX_S)

    def _replicas_on(self, address: str) -> int:
        worker = self._ledger.workers.get(address)
        return worker.replicas if worker is not None else 0

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
