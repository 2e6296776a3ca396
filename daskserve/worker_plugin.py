"""Everything daskserve does on a Dask worker, owned by one ``WorkerPlugin``.

The controller registers the plugin once per instance; Dask then sets it up on every
worker, including workers that join later, before they run any task, so it is there
before the first replica is placed. It holds:

- the worker handlers of ``protocol.WorkerOp``, the request channel that serves the
  fast path routers call (``daskserve.channel``), and the thread lane beside it for
  ``def`` handlers (``daskserve.lane``);
- the registry of replica executors living in this process, keyed by replica tag;
- the process environment replicas asked for (``replica_options.env_vars``);
- the EveryNode HTTP proxy, when this worker runs one.

Replies carry whatever finished first; results still running are fetched with
``COLLECT`` and the message's ticket, so one slow request never delays the
others of its message. ``CANCEL`` names work whose callers gave up. A replica that
is gone or draining answers ``retry`` instead of executing, which is how scale-down
and replica replacement lose no request: the router sends those requests elsewhere.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable

import cloudpickle
from distributed.diagnostics.plugin import WorkerPlugin

from . import event_loop, metrics, pickling
from .channel import ChannelServer
from .config import HTTPOptions
from .executor import Draining, ReplicaExecutor
from .lane import LaneServer
from .protocol import (CallReply, ChannelAddresses, HealthReply, UpdateReply, WireRequest,
                       WorkerOp)

logger = logging.getLogger(__name__)

PLUGIN_NAME = "daskserve-worker"

# The plugin of each worker living in this process, by worker address: a router here
# calls a replica of its own process directly, with no connection and no message copies.
_in_process: dict[str, "ServeWorkerPlugin"] = {}


def in_process(address: str) -> "ServeWorkerPlugin | None":
    """The plugin answering at ``address`` if that worker lives in this process."""
    return _in_process.get(address)


class ServeWorkerPlugin(WorkerPlugin):
    """The worker side of a serve instance."""

    name = PLUGIN_NAME
    idempotent = True

    async def setup(self, worker: Any) -> None:
        self.worker = worker
        self.executors: dict[str, ReplicaExecutor] = {}
        self.remote: dict[str, str] = {}  # replicas hosted here, served by a child process
        self.proxy: Any = None
        self._environment = ProcessEnvironment()
        self._loop = asyncio.get_running_loop()
        self.channel = ChannelServer({WorkerOp.CALL: self.call,
                                      WorkerOp.COLLECT: self.collect,
                                      WorkerOp.CANCEL: self.cancel})
        self.lane = LaneServer(WorkerOp.CALL, self.call_here)
        security = getattr(worker, "security", None)
        context = (security.get_listen_args("worker").get("ssl_context")
                   if security is not None else None)
        await self.channel.start(worker.address, context)
        self.lane.start(worker.address, context)
        event_loop.warn_if_slow("worker hosting replicas")
        worker.handlers.update(self.handlers())
        _in_process[worker.address] = self

    async def teardown(self, worker: Any) -> None:
        if _in_process.get(worker.address) is self:
            del _in_process[worker.address]
        for name in self.handlers():
            worker.handlers.pop(name, None)
        await self.stop_proxy()
        await self.channel.stop()
        self.lane.stop()

    def handlers(self) -> dict[str, Callable]:
        """The Dask handlers; the request path has its own channel."""
        return {WorkerOp.CHANNEL: self.channel_address,
                WorkerOp.UPDATE: self.update, WorkerOp.DRAIN: self.drain,
                WorkerOp.LOCATE: self.locate,
                WorkerOp.HEALTH: self.health, WorkerOp.ABORT: self.abort,
                WorkerOp.START_PROXY: self.start_proxy, WorkerOp.STOP_PROXY: self.stop_proxy,
                WorkerOp.METRICS: self.metrics_snapshot}  # observability

    def channel_address(self) -> ChannelAddresses:
        return {"channel": self.channel.address, "lane": self.lane.address}

    async def metrics_snapshot(self, names: list[str] | None = None) -> dict:
        """``WorkerOp.METRICS``, GPUs named as placement names them (a replica's
        process, having no worker, reports what its own environment shows)."""
        from .gpus import worker_devices  # it reads this plugin: imported late

        worker = self.worker if hasattr(self.worker, "plugins") else None
        return await metrics.worker_snapshot(names, lambda: worker_devices(worker))

    @classmethod
    def on(cls, worker: Any) -> "ServeWorkerPlugin":
        """The plugin of this worker; replicas cannot live on a worker without it."""
        plugin = worker.plugins.get(PLUGIN_NAME)
        if not isinstance(plugin, cls):
            raise RuntimeError(f"the daskserve worker plugin is not installed on "
                               f"{worker.address}; replicas are placed by the controller")
        return plugin

    # -- registry ---------------------------------------------------------------------
    def set_environment(self, replica: str, env_vars: dict[str, str]) -> None:
        """Apply a replica's environment variables before its constructor runs."""
        self._environment.add(replica, env_vars)

    def add_replica(self, executor: ReplicaExecutor) -> None:
        self.executors[executor.context.replica_tag] = executor

    def remove_replica(self, replica: str) -> None:
        self.executors.pop(replica, None)
        self._environment.remove(replica)
        metrics.forget_replica(replica)  # observability: its series go with it

    def add_remote(self, replica: str, address: str) -> None:
        """A replica this worker hosts in another process, answering at ``address``."""
        self.remote[replica] = address

    def remove_remote(self, replica: str) -> None:
        self.remote.pop(replica, None)

    def baseline_environment(self) -> dict[str, str]:
        """This worker's own environment variables, without those replicas set."""
        return self._environment.baseline()

    # -- handlers: router -> replica ----------------------------------------------------
    async def call(self, replica: str, ticket: int, http: list[WireRequest] | None = None,
                   calls: bytes | None = None) -> CallReply:
        executor = self.executors.get(replica)
        if executor is None or executor.draining:
            return {"retry": True}
        try:
            decoded = cloudpickle.loads(calls) if calls else []
        except Exception as exc:  # nothing has started: the router may split the message
            return {"undecodable": pickling.summarize(exc)}
        reply = _reply(await executor.handle(ticket, http or [], decoded))
        if self.lane.address is not None and executor.runs_here(http or [], decoded):
            reply["lane"] = True
        return reply

    def call_here(self, replica: str, ticket: int, http: list[WireRequest] | None = None,
                  calls: bytes | None = None) -> CallReply:
        """``call`` in a thread of the lane: a lone request to a ``def`` method runs
        right here; anything else goes to the event loop, as on the channel."""
        executor = self.executors.get(replica)
        if executor is None:
            return {"retry": True}
        try:
            decoded = cloudpickle.loads(calls) if calls else []
        except Exception as exc:
            return {"undecodable": pickling.summarize(exc)}
        try:
            outcome = executor.serve_here(ticket, http or [], decoded)
        except Draining:
            return {"retry": True}
        if outcome is None:
            return asyncio.run_coroutine_threadsafe(
                self.call(replica, ticket, http, calls), self._loop).result()
        return _reply(outcome)

    async def collect(self, replica: str, ticket: int) -> CallReply:
        executor = self.executors.get(replica)
        outcome = await executor.collect(ticket) if executor is not None else None
        return {"lost": True} if outcome is None else _reply(outcome)

    def cancel(self, replica: str, cancels: list[list]) -> None:
        executor = self.executors.get(replica)
        if executor is not None:
            for ticket, http, calls in cancels:
                executor.cancel(ticket, http, calls)

    # -- handlers: controller -> replica --------------------------------------------------
    async def locate(self, replica: str) -> str | None:
        """The address answering ``CALL`` for a replica hosted here, None if unknown.

        An executor in this process is served by this worker; one a host runs in
        another process (a packed environment's) answers at that process's address.
        """
        return self.worker.address if replica in self.executors else self.remote.get(replica)

    async def update(self, replica: str, config: dict, reconfigure: bool) -> UpdateReply:
        """Apply a config; what it raises goes back pickled, not as a Dask error,
        which the controller would have to unpickle (see ``UpdateReply``)."""
        executor = self.executors.get(replica)
        if executor is None:
            return {"applied": False}
        try:
            await executor.update_config(config, reconfigure)
        except Exception as exc:
            return {"applied": False, **_config_error(exc, executor.context)}
        return {"applied": True}

    async def drain(self, replica: str) -> bool:
        """Finish the replica's in-flight work, then forget it (its actor goes next)."""
        executor = self.executors.get(replica)
        if executor is not None:
            await executor.drain()
            self.remove_replica(replica)
        return True

    async def health(self, replica: str, timeout: float) -> HealthReply:
        executor = self.executors.get(replica)
        return {"missing": True} if executor is None else await executor.health(timeout)

    def abort(self, replica: str, reason: str) -> None:
        """Fail a wedged replica's in-flight work and forget it (its actor goes next);
        unlike ``drain``, nothing is waited for."""
        executor = self.executors.get(replica)
        if executor is not None:
            executor.abort(reason)
            self.lane.abort(replica, lambda is_http: {
                **_reply(executor.cancelled_outcome(is_http)), "closing": True})
            self.remove_replica(replica)

    async def start_proxy(self, options: dict, listener_id: str) -> int:
        """Run an EveryNode proxy in this worker; returns its port."""
        from .proxy import Proxy
        from .router import Router

        if self.proxy is None:
            router = Router(self.worker.rpc, self.worker.scheduler.address, listener_id)
            proxy = Proxy(router, HTTPOptions(**options))
            await proxy.start()
            self.proxy = proxy
        return self.proxy.port

    async def stop_proxy(self) -> None:
        proxy, self.proxy = self.proxy, None
        if proxy is not None:
            await proxy.stop()


class ProcessEnvironment:
    """``os.environ`` as the replicas of one process asked for it.

    Replicas in one worker process share its environment. Each variable a replica
    sets holds the value of the newest live replica that set it, and goes back to the
    worker's own value when no such replica is left, so a removed replica's settings
    never leak into replicas placed after it.
    """

    def __init__(self) -> None:
        self._by_replica: dict[str, dict[str, str]] = {}  # in order of arrival
        self._original: dict[str, str | None] = {}

    def add(self, replica: str, env_vars: dict[str, str]) -> None:
        for key in env_vars:
            self._original.setdefault(key, os.environ.get(key))
        self._by_replica[replica] = dict(env_vars)
        os.environ.update(env_vars)

    def baseline(self) -> dict[str, str]:
        """``os.environ`` as it would be with no replica's settings."""
        env = dict(os.environ)
        for key, original in self._original.items():
            if original is None:
                env.pop(key, None)
            else:
                env[key] = original
        return env

    def remove(self, replica: str) -> None:
        for key in self._by_replica.pop(replica, {}):
            setters = [env[key] for env in self._by_replica.values() if key in env]
            if setters:
                os.environ[key] = setters[-1]
                continue
            original = self._original.pop(key)
            if original is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = original


def _reply(outcome: tuple) -> CallReply:
    http, calls, ticket = outcome
    reply: CallReply = {"http": http}
    if calls:
        reply["calls"], reply["values"] = pickling.dump_results(calls)
    if ticket is not None:
        reply["ticket"] = ticket
    return reply


def _config_error(exc: Exception, context: Any) -> UpdateReply:
    where = f"backend {context.backend_tag!r}, replica {context.replica_tag!r}"
    if hasattr(exc, "add_note"):
        exc.add_note(f"raised in {where} while it applied a new config")
    message = f"{type(exc).__name__}: {exc}"
    try:
        error = cloudpickle.dumps(exc)
    except Exception:  # an exception that cannot travel arrives as its text
        error = cloudpickle.dumps(RuntimeError(f"{message} (raised in {where})"))
    return {"error": error, "message": message}

