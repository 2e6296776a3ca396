"""The controller: a Dask scheduler plugin that owns a serve instance.

It keeps the desired state (backends, endpoints, traffic, shadows), turns it into
replicas through ``ReplicaManager``, exposes the client API as scheduler handlers
(``daskserve_<op>``), and publishes routing tables to routers by long-poll. API
calls that change routing return only after every proxy has applied the change,
so an HTTP request sent right after ``create_endpoint`` returns is routed.

Nothing here unpickles user data: backend code and ``user_config`` arrive as
bytes pickled by the calling Python client and go to replicas as they are.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from daskserve.config import (
    BackendConfig,
    HTTPOptions,
    ReplicaOptions,
    normalize_methods,
)
from daskserve.protocol import CONTROLLER_PREFIX, LISTEN
from daskserve.tasks import spawn
from daskserve.traffic import validate_traffic

from .proxies import ProxyFleet
from .replicas import ReplicaManager
from .state import BackendState, EndpointState, routing_table

logger = logging.getLogger(__name__)

PLUGIN_NAME = "daskserve"
LISTEN_TIMEOUT_S = 15.0
PROXY_ACK_TIMEOUT_S = 10.0


def _check_name(kind: str, name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{kind} name must be a non-empty string, got {name!r}")


class ServeController(SchedulerPlugin):
    """Scheduler plugin holding one daskserve instance."""

    name = PLUGIN_NAME
    idempotent = True  # a second ``serve.start`` attaches instead of replacing

    def __init__(self, http_options: dict | None = None):
        self.http_options = HTTPOptions.coerce(http_options).to_dict()

    # -- plugin hooks -------------------------------------------------------------
    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.backends: dict[str, BackendState] = {}
        self.endpoints: dict[str, EndpointState] = {}
        self.version = 0
        self._changed = asyncio.Event()
        self._acked = asyncio.Event()
        self._acks: dict[str, int] = {}
        self._shut_down = False
        self._background: set[asyncio.Future] = set()
        self._joining: set[asyncio.Future] = set()
        self.replicas = ReplicaManager(scheduler, self._publish)
        self.proxies = ProxyFleet(scheduler, HTTPOptions(**self.http_options))
        await self.proxies.start()
        for name in dir(self):
            if name.startswith("op_"):
                scheduler.handlers[CONTROLLER_PREFIX + name[3:]] = getattr(self, name)
        for address in list(scheduler.workers):
            self.add_worker(scheduler, address)
        await self._workers_settled()

    def add_worker(self, scheduler: Any, worker: str) -> None:
        task = self._spawn(self._worker_joined(worker))
        self._joining.add(task)
        task.add_done_callback(self._joining.discard)

    async def _workers_settled(self) -> None:
        """Wait for workers that joined to be measured, so placement sees them."""
        if self._joining:
            await asyncio.gather(*self._joining, return_exceptions=True)

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self.proxies.lose_worker(worker)
        if self.replicas.lose_worker(worker, self.backends):
            self._spawn(self._publish_and_reconcile())

    async def close(self) -> None:
        await self._teardown()

    # -- background work ----------------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Future:
        task = spawn(coro)
        self._background.add(task)  # tracked here too, to cancel at shutdown
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)
        return task

    async def _worker_joined(self, address: str) -> None:
        await self.replicas.add_worker(address)
        state = self.scheduler.workers.get(address)
        if state is not None:
            await self.proxies.add_worker(self.replicas.client, address, state.host)
        await self._reconcile_all()

    async def _publish_and_reconcile(self) -> None:
        await self._publish()
        await self._reconcile_all()

    async def _reconcile_all(self) -> None:
        for backend in list(self.backends.values()):
            if any(r.status == "pending" for r in backend.replicas.values()) or \
                    len(backend.replicas) < backend.num_replicas:
                await self.replicas.reconcile(backend)

    # -- routing table ------------------------------------------------------------------
    def table(self) -> dict[str, Any]:
        return routing_table(self.version, self.backends, self.endpoints)

    async def _publish(self) -> None:
        """Announce a new table and wait until every proxy routes by it."""
        self.version += 1
        version = self.version
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROXY_ACK_TIMEOUT_S
        while any(self._acks.get(p, -1) < version for p in self.proxies.listener_ids):
            remaining = deadline - loop.time()
            if remaining <= 0:
                logger.warning("proxies %s did not apply routing table %d in time",
                               sorted(self.proxies.listener_ids), version)
                return
            try:
                await asyncio.wait_for(self._acked.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def op_listen(self, version: int, listener: str) -> dict[str, Any]:
        """Long-poll: return the table once it is newer than ``version``."""
        self._acks[listener] = version
        acked, self._acked = self._acked, asyncio.Event()
        acked.set()
        if self._shut_down:
            return {"version": self.version, "shutdown": True}
        if version >= self.version:
            try:
                await asyncio.wait_for(self._changed.wait(), LISTEN_TIMEOUT_S)
            except asyncio.TimeoutError:
                pass
        if self._shut_down:
            return {"version": self.version, "shutdown": True}
        return self.table()

    # -- backends ---------------------------------------------------------------
    async def op_create_backend(self, tag: str, spec: bytes, config: dict,
                                replica_options: dict) -> int:
        _check_name("backend", tag)
        BackendConfig.validate_wire(config)
        ReplicaOptions(**replica_options)
        await self._workers_settled()
        if tag in self.backends:
            raise ValueError(f"backend {tag!r} already exists")
        backend = BackendState(tag, spec, config, replica_options)
        self.backends[tag] = backend
        errors = await self.replicas.reconcile(backend)
        if errors:
            await self.replicas.remove_backend(backend)
            self.backends.pop(tag, None)
            await self._publish()
            raise RuntimeError(f"backend {tag!r} failed to start: {errors[0]}")
        return self.version

    def _backend(self, tag: str) -> BackendState:
        try:
            return self.backends[tag]
        except KeyError:
            raise ValueError(f"backend {tag!r} does not exist") from None

    async def op_list_backends(self) -> dict[str, dict]:
        return {tag: b.describe() for tag, b in self.backends.items()}

    async def op_get_backend_config(self, tag: str) -> dict:
        return self._backend(tag).config

    async def op_update_backend_config(self, tag: str, config: dict) -> int:
        backend = self._backend(tag)
        BackendConfig.validate_wire(config)
        old = backend.config
        backend.config = config
        try:
            await self.replicas.push_config(
                backend, reconfigure=config["user_config"] != old["user_config"])
        except Exception:
            backend.config = old
            raise
        await self._publish()
        await self._workers_settled()
        errors = await self.replicas.reconcile(backend)
        if errors:
            raise RuntimeError(f"backend {tag!r}: new replicas failed to start: {errors[0]}")
        return self.version

    async def op_delete_backend(self, tag: str) -> int:
        backend = self._backend(tag)
        for endpoint in self.endpoints.values():
            if tag in endpoint.traffic or tag in endpoint.shadows:
                raise ValueError(
                    f"backend {tag!r} is used by endpoint {endpoint.name!r}; change that "
                    f"endpoint's traffic (or stop shadowing) before deleting the backend")
        del self.backends[tag]
        await self.replicas.remove_backend(backend)
        return self.version

    # -- endpoints --------------------------------------------------------------------
    def _endpoint(self, name: str) -> EndpointState:
        try:
            return self.endpoints[name]
        except KeyError:
            raise ValueError(f"endpoint {name!r} does not exist") from None

    async def op_create_endpoint(self, name: str, backend: str | None, route: str | None,
                                 methods: list[str]) -> int:
        _check_name("endpoint", name)
        if name in self.endpoints:
            raise ValueError(f"endpoint {name!r} already exists")
        if route is not None:
            if not isinstance(route, str) or not route.startswith("/"):
                raise ValueError(f"route must be a path starting with '/', got {route!r}")
            if route.startswith("/-/"):
                raise ValueError(f"route {route!r} is reserved for built-in routes")
            for other in self.endpoints.values():
                if other.route == route:
                    raise ValueError(f"route {route!r} is already used by endpoint "
                                     f"{other.name!r}")
        if backend is not None:
            self._backend(backend)
        self.endpoints[name] = EndpointState(
            name, route, normalize_methods(methods), {backend: 1.0} if backend else {})
        await self._publish()
        return self.version

    async def op_delete_endpoint(self, name: str) -> int:
        self._endpoint(name)
        del self.endpoints[name]
        await self._publish()
        return self.version

    async def op_list_endpoints(self) -> dict[str, dict]:
        return {name: e.describe() for name, e in self.endpoints.items()}

    async def op_set_traffic(self, endpoint: str, traffic: dict) -> int:
        state = self._endpoint(endpoint)
        state.traffic = validate_traffic(endpoint, traffic, set(self.backends))
        await self._publish()
        return self.version

    async def op_shadow_traffic(self, endpoint: str, backend: str, proportion: float) -> int:
        state = self._endpoint(endpoint)
        self._backend(backend)
        if isinstance(proportion, bool) or not isinstance(proportion, (int, float)) or \
                not 0 <= proportion <= 1:
            raise ValueError(f"shadow proportion must be a number in [0, 1], got {proportion!r}")
        if proportion == 0:
            state.shadows.pop(backend, None)
        else:
            state.shadows[backend] = float(proportion)
        await self._publish()
        return self.version

    # -- instance -----------------------------------------------------------------
    async def op_info(self) -> dict[str, Any]:
        return {"version": self.version, "http_options": self.http_options,
                "proxies": self.proxies.addresses(),
                "workers": self.replicas.ledger.snapshot()}

    async def op_shutdown(self) -> None:
        await self._teardown()
        if self.scheduler.plugins.get(PLUGIN_NAME) is self:
            self.scheduler.remove_plugin(PLUGIN_NAME)

    async def _teardown(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        self._changed.set()  # routers learn of the shutdown and stop polling
        await self.proxies.stop(self.replicas.client)
        self.endpoints.clear()
        for backend in list(self.backends.values()):
            await self.replicas.remove_backend(backend)
        self.backends.clear()
        for task in list(self._background):
            task.cancel()
        await self.replicas.close()
        for name in list(self.scheduler.handlers):
            if name.startswith(CONTROLLER_PREFIX) and name != LISTEN:
                del self.scheduler.handlers[name]


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("daskserve controller task failed", exc_info=task.exception())
