"""The controller: a Dask scheduler plugin that owns a serve instance.

It changes the desired state (``state.DesiredState``) on behalf of the client API,
turns it into replicas through ``ReplicaManager`` (which keeps the observed state),
exposes the API as the scheduler handlers named in ``protocol.ControllerOp``, and
publishes routing tables to routers by long-poll. An API call that changes routing
waits until every proxy has applied the change (up to ``PROXY_ACK_TIMEOUT_S``, then
logs which proxies lag and returns), so an HTTP request sent right after
``create_endpoint`` returns is routed.

Nothing here unpickles user data: backend code and ``user_config`` arrive as
bytes pickled by the calling Python client and go to replicas as they are.

The autoscaler (``autoscaler.py``) sizes autoscaling backends from the loads routers
report, and the adaptive bridge (``adaptive.py``) lets an adaptive Dask cluster grow
for replicas and shrink around them; both change replicas only through the same
desired state and replica manager as API calls. The health monitor (``health.py``)
finds replicas that stay wedged; the replica manager replaces them.

With a checkpoint path, the desired state is restored from it before anything
serves, and every API call that changed it returns only once the new state is in
the file (``checkpoint.py`` says what is stored and when a file is refused). A
change made outside an API call must ``await self.checkpoint.save(self.desired)``.
The state emptied by a closing scheduler is not saved, so a restart serves again;
an explicit ``shutdown`` is, so a restart after it starts empty.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections import defaultdict
from typing import Any, Callable

from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps

from daskserve.config import BackendConfig, HTTPOptions
from daskserve.protocol import ControllerOp, RoutingTable, TableVersion
from daskserve.tasks import spawn
from daskserve.worker_plugin import PLUGIN_NAME as WORKER_PLUGIN_NAME
from daskserve.worker_plugin import ServeWorkerPlugin

from .adaptive import AdaptiveBridge
from .autoscaler import Autoscaler
from .checkpoint import CheckpointStore
from .dashboard import ServeObservability
from .health import HealthMonitor
from .proxies import ProxyFleet
from .replicas import ReplicaManager
from .state import (BackendSpec, ObservedState, ReplicaState, describe_backend,
                    routing_table)

logger = logging.getLogger(__name__)

PLUGIN_NAME = "daskserve"
LISTEN_TIMEOUT_S = 15.0
PROXY_ACK_TIMEOUT_S = 10.0


class ServeController(SchedulerPlugin):
    """Scheduler plugin holding one daskserve instance."""

    name = PLUGIN_NAME
    idempotent = True  # a second ``serve.start`` attaches instead of replacing

    def __init__(self, http_options: dict | None = None, checkpoint_path: str | None = None):
        self.http_options = HTTPOptions.coerce(http_options).to_dict()
        self.checkpoint_path = checkpoint_path  # resolved in ``start``, on the scheduler

    def handlers(self) -> dict[str, Callable]:
        """The client API and the routers' long-poll, as scheduler handlers."""
        handlers = {
            ControllerOp.LISTEN: self.listen,
            ControllerOp.INFO: self.info,
            ControllerOp.SHUTDOWN: self.shutdown,
            ControllerOp.CREATE_BACKEND: self.create_backend,
            ControllerOp.LIST_BACKENDS: self.list_backends,
            ControllerOp.GET_BACKEND_CONFIG: self.get_backend_config,
            ControllerOp.UPDATE_BACKEND_CONFIG: self.update_backend_config,
            ControllerOp.DELETE_BACKEND: self.delete_backend,
            ControllerOp.CREATE_ENDPOINT: self.create_endpoint,
            ControllerOp.DELETE_ENDPOINT: self.delete_endpoint,
            ControllerOp.LIST_ENDPOINTS: self.list_endpoints,
            ControllerOp.SET_TRAFFIC: self.set_traffic,
            ControllerOp.SHADOW_TRAFFIC: self.shadow_traffic,
            ControllerOp.ENV_PREPARE: self.env_prepare,
            ControllerOp.ENV_HOLD: self.env_hold,
            ControllerOp.REPLICA_EXITED: self.replica_exited,
            ControllerOp.REPORT_LOAD: self.report_load,
        }
        return {op: handler if op in _READ_ONLY else self._checkpointed(handler)
                for op, handler in handlers.items()}

    # -- plugin hooks -------------------------------------------------------------
    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.checkpoint = CheckpointStore(self.checkpoint_path)
        self.checkpoint_path = self.checkpoint.path
        self.desired = await self.checkpoint.restore()  # before anything serves
        self.observed = ObservedState()
        # Routing tables are named by (epoch, version); a new epoch per start tells
        # routers that outlived the previous instance to drop its tables.
        self.epoch = uuid.uuid4().hex
        self.version = 0
        self._changed = asyncio.Event()
        self._acked = asyncio.Event()
        self._acks: dict[str, int] = {}
        self._shut_down = False  # routers have been told the instance is gone
        self._teardown_task: asyncio.Future | None = None
        self._background: set[asyncio.Future] = set()
        self._joining: set[asyncio.Future] = set()
        self._config_turns: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Workers get the worker plugin before they run any task, joining ones too.
        await scheduler.register_worker_plugin(None, dumps(ServeWorkerPlugin()),
                                               name=WORKER_PLUGIN_NAME, idempotent=True)
        self.replicas = ReplicaManager(scheduler, self.observed, self._publish)
        self.autoscaler = Autoscaler(self.desired, self._config_turns, self._save,
                                     self._reconcile_backend, self._spawn)
        self.adaptive = AdaptiveBridge(scheduler, self.replicas.ledger, self.desired,
                                       self.observed, self._migrate)
        self.proxies = ProxyFleet(scheduler, HTTPOptions(**self.http_options),
                                  self.replicas.ledger)
        await self.proxies.start()
        scheduler.handlers.update(self.handlers())
        self.observability = await ServeObservability(self).start()  # metrics, /serve page
        self.adaptive.install()
        self._spawn(self.autoscaler.run())
        self._spawn(self.adaptive.run())
        self._spawn(HealthMonitor(scheduler.rpc, self.desired, self.observed,
                                  self._replace_unhealthy).run())
        for address in list(scheduler.workers):
            self.add_worker(scheduler, address)
        await self._workers_settled()
        await self._reconcile_all()  # restored replicas that fit nowhere yet show as pending

    def add_worker(self, scheduler: Any, worker: str) -> None:
        task = self._spawn(self._worker_joined(worker))
        self._joining.add(task)
        task.add_done_callback(self._joining.discard)

    async def _workers_settled(self) -> None:
        """Wait for workers that joined to be measured, so placement sees them."""
        if self._joining:
            await asyncio.gather(*self._joining, return_exceptions=True)

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        for host in self.proxies.lose_worker(worker):
            self._spawn(self.proxies.rehome(host))
        if self.replicas.lose_worker(worker):
            self._spawn(self._publish_and_reconcile())

    async def close(self) -> None:
        await self._teardown()

    def valid_workers_downscaling(self, scheduler: Any, workers: list) -> list:
        """Dask asks which workers it may close: none that hosts a replica."""
        adaptive = getattr(self, "adaptive", None)  # None before ``start``
        return adaptive.valid_workers_downscaling(workers) if adaptive else workers

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
            await self.proxies.add_worker(address, state.host)
        await self._reconcile_all()

    def _replace_unhealthy(self, replica: ReplicaState, reason: str, drain: bool) -> None:
        self._spawn(self._replace(replica, reason, drain))

    async def _replace(self, replica: ReplicaState, reason: str, drain: bool) -> None:
        spec = self.desired.backends.get(replica.backend)
        if spec is not None and await self.replicas.replace_unhealthy(spec, replica, reason,
                                                                       drain):
            await self._reconcile_all()  # a replacement may have waited for its resources

    async def _publish_and_reconcile(self) -> None:
        await self._publish()
        await self._reconcile_all()

    async def _reconcile_all(self) -> None:
        for spec in list(self.desired.backends.values()):
            observed = self.observed.of(spec.tag)
            if any(r.status == "pending" for r in observed.replicas.values()) or \
                    len(observed.replicas) < spec.num_replicas:
                await self.replicas.reconcile(spec)

    async def _save(self) -> None:
        """Checkpoint a change made outside an API call (the autoscaler's)."""
        if self.scheduler.status not in (Status.closing, Status.closed):
            await self.checkpoint.save(self.desired)

    async def _reconcile_backend(self, spec: BackendSpec) -> None:
        await self._workers_settled()
        errors = await self.replicas.reconcile(spec)
        if errors:
            logger.warning("backend %r: replicas failed to start: %s", spec.tag, errors[0])
        if spec.tag not in self.desired.backends:
            # Deleted while this scaled it: drain what reconcile may have started.
            await self.replicas.remove_backend(spec.tag)

    async def _migrate(self, tag: str, worker: str) -> None:
        spec = self.desired.backends.get(tag)
        if spec is not None:
            await self.replicas.migrate(spec, worker)

    def _checkpointed(self, handler: Callable) -> Callable:
        """``handler``, returning only once the state it changed is checkpointed."""
        @functools.wraps(handler)
        async def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return await handler(*args, **kwargs)
            finally:
                if self.scheduler.status not in (Status.closing, Status.closed):
                    # (a closing scheduler's teardown emptied the state: not saved)
                    await self.checkpoint.save(self.desired)
        return call

    # -- routing table ------------------------------------------------------------------
    def table(self) -> RoutingTable:
        return routing_table(self.epoch, self.version, self.desired, self.observed)

    def stamp(self) -> TableVersion:
        """The table that includes every change made so far: what changes return."""
        return {"epoch": self.epoch, "version": self.version}

    async def _publish(self) -> None:
        """Announce a new table and wait until every proxy routes by it."""
        self.version += 1
        version = self.version
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        for gone in self._acks.keys() - self.proxies.listener_ids:
            del self._acks[gone]  # proxies whose worker left
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

    async def listen(self, version: int, listener: str,
                     epoch: str | None = None) -> RoutingTable:
        """Long-poll: return the table once it is newer than ``version``.

        A router holding another epoch's table (or none) gets ours at once: its
        version number says nothing about this instance's tables.

        Only proxies' acknowledgements are kept: API calls wait for proxies alone, and
        every process that ever used a handle polls too, so keeping theirs would grow
        without bound.
        """
        current = epoch == self.epoch
        if current and listener in self.proxies.listener_ids:
            self._acks[listener] = version
            acked, self._acked = self._acked, asyncio.Event()
            acked.set()
        if current and version >= self.version and not self._shut_down:
            try:
                await asyncio.wait_for(self._changed.wait(), LISTEN_TIMEOUT_S)
            except asyncio.TimeoutError:
                pass
        if self._shut_down:
            return {**self.stamp(), "shutdown": True}
        return self.table()

    # -- backends ---------------------------------------------------------------
    async def create_backend(self, tag: str, spec: bytes, config: dict,
                             replica_options: dict) -> TableVersion:
        await self._workers_settled()
        backend = self.desired.add_backend(tag, spec, config, replica_options)
        _warn_if_slow(tag, backend.config)
        errors = await self.replicas.reconcile(backend)
        if errors:
            self.desired.remove_backend(tag)
            await self.replicas.remove_backend(tag)
            await self._publish()
            raise RuntimeError(f"backend {tag!r} failed to start: {errors[0]}")
        return self.stamp()

    async def list_backends(self) -> dict[str, dict]:
        return {tag: describe_backend(spec, self.observed.of(tag),
                                      self.autoscaler.status(spec))
                for tag, spec in self.desired.backends.items()}

    async def get_backend_config(self, tag: str) -> dict:
        return self.desired.backend(tag).config

    async def update_backend_config(self, tag: str, changes: dict,
                                    replace: bool = False) -> TableVersion:
        """Apply some fields of a backend's config (all of them with ``replace``).

        Updates of one backend take turns, each until its config has reached the
        replicas, so replicas get configs in the order they were made and a failed one
        is undone without undoing another's.
        """
        async with self._config_turns[tag]:
            old = self.desired.update_backend_config(tag, changes, replace)
            backend = self.desired.backend(tag)
            _warn_if_slow(tag, backend.config)
            try:
                await self.replicas.push_config(
                    backend, reconfigure=backend.config["user_config"] != old["user_config"])
            except Exception:
                self.desired.update_backend_config(tag, old, replace=True)
                raise
            self.autoscaler.config_changed(tag, old, backend.config)
            await self._publish()
        await self._workers_settled()
        errors = await self.replicas.reconcile(backend)
        if errors:
            raise RuntimeError(f"backend {tag!r}: new replicas failed to start: {errors[0]}")
        return self.stamp()

    async def delete_backend(self, tag: str) -> TableVersion:
        self.desired.remove_backend(tag)
        self._config_turns.pop(tag, None)
        await self.replicas.remove_backend(tag)
        return self.stamp()

    # -- endpoints --------------------------------------------------------------------
    async def create_endpoint(self, name: str, backend: str | None, route: str | None,
                              methods: list[str]) -> TableVersion:
        self.desired.add_endpoint(name, backend, route, methods)
        await self._publish()
        return self.stamp()

    async def delete_endpoint(self, name: str) -> TableVersion:
        self.desired.remove_endpoint(name)
        await self._publish()
        return self.stamp()

    async def list_endpoints(self) -> dict[str, dict]:
        return {name: e.describe() for name, e in self.desired.endpoints.items()}

    async def set_traffic(self, endpoint: str, traffic: dict) -> TableVersion:
        self.desired.set_traffic(endpoint, traffic)
        await self._publish()
        return self.stamp()

    async def shadow_traffic(self, endpoint: str, backend: str, proportion: float) -> TableVersion:
        self.desired.set_shadow(endpoint, backend, proportion)
        await self._publish()
        return self.stamp()

    # -- packed environments and replica processes -------------------------------------
    async def env_prepare(self, sha256: str, nchunks: int) -> list[int]:
        return self.replicas.envs.prepare(sha256, nchunks)

    async def env_hold(self, sha256: str, keys: list[str]) -> None:
        self.replicas.envs.hold(sha256, keys)

    async def replica_exited(self, replica: str, reason: str) -> None:
        if self.replicas.lose_replica(replica, reason):
            self._spawn(self._publish_and_reconcile())

    # -- load --------------------------------------------------------------------------
    async def report_load(self, listener: str, loads: dict) -> None:
        """A router's requests in flight and waiting per backend (``LoadReport``)."""
        self.autoscaler.report(listener, loads)

    # -- instance -----------------------------------------------------------------
    async def info(self) -> dict[str, Any]:
        return {**self.stamp(), "http_options": self.http_options,
                "checkpoint_path": self.checkpoint_path,
                "proxies": self.proxies.addresses(),
                "workers": self.replicas.ledger.snapshot(),
                "envs": self.replicas.envs.status()}

    async def shutdown(self) -> None:
        await self._teardown()
        if self.scheduler.plugins.get(PLUGIN_NAME) is self:
            self.scheduler.remove_plugin(PLUGIN_NAME)

    async def _teardown(self) -> None:
        """Shut down once, however many callers (a client's ``shutdown``, the
        scheduler closing) ask; each returns when it is done."""
        if self._teardown_task is None:
            self._teardown_task = asyncio.ensure_future(self._stop_serving())
        await asyncio.shield(self._teardown_task)

    async def _stop_serving(self) -> None:
        """Stop without dropping work already accepted: proxies stop accepting and
        finish their requests, replicas drain, and only then are routers told that
        the instance is gone (a router that knows fails what it still holds)."""
        self.adaptive.uninstall()
        await self.proxies.stop()
        tags = list(self.desired.backends)
        self.desired.clear()
        await asyncio.gather(*(self.replicas.remove_backend(tag) for tag in tags))
        self._shut_down = True
        self._changed.set()  # routers learn of the shutdown and stop polling
        for task in list(self._background):
            task.cancel()
        await self.replicas.close()
        await self.observability.stop()  # observability
        if WORKER_PLUGIN_NAME in self.scheduler.worker_plugins:
            await self.scheduler.unregister_worker_plugin(None, name=WORKER_PLUGIN_NAME)
        for name in self.handlers():
            if name != ControllerOp.LISTEN:  # routers still polling learn of the shutdown
                self.scheduler.handlers.pop(name, None)


_READ_ONLY = frozenset({ControllerOp.LISTEN, ControllerOp.INFO, ControllerOp.LIST_BACKENDS,
                        ControllerOp.GET_BACKEND_CONFIG, ControllerOp.LIST_ENDPOINTS,
                        # (these change no desired state, so there is nothing to save)
                        ControllerOp.ENV_PREPARE, ControllerOp.ENV_HOLD,
                        ControllerOp.REPLICA_EXITED, ControllerOp.REPORT_LOAD})


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("daskserve controller task failed", exc_info=task.exception())


def _warn_if_slow(tag: str, config: dict) -> None:
    for reason in BackendConfig.slow_settings(config):
        logger.warning("backend %r is configured to run slowly: %s", tag, reason)
