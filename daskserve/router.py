"""The router shared by HTTP proxies and handles.

It holds the routing table the controller pushes (endpoints, traffic policies,
replicas of each backend) and turns a request into a query on one replica:
weighted or shard-keyed backend choice, shadow copies, a replica picked by the
power of two choices among those under ``max_concurrent_queries``, and a wait
queue per backend when every replica is full. Finding the endpoint and the backend
is a dict lookup, whatever their number; picking a replica samples two, and scans
the backend's replicas only when both samples are full.

A router lives on one event loop (the proxy's, a worker's or a Dask client's) and
learns table changes by long-polling the controller; a new table is swapped in
whole, so in-flight queries are never dropped by a traffic or replica change.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections import deque
from typing import Any, Callable

import cloudpickle
from distributed.comm import get_address_host
from distributed.comm.core import CommClosedError
from distributed.core import ConnectionPool, send_recv

from .errors import EndpointNotFoundError, ReplicaUnavailableError, ServeError
from .http_codec import error_response
from .protocol import (CallMessage, CallReply, ControllerOp, RoutingTable, WireRequest,
                       WireResponse, WorkerOp)
from .tasks import spawn
from .traffic import TrafficPolicy
from .worker_plugin import in_process

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 20


class Query:
    """One request on its way to a replica: an HTTP message or a handle call."""

    __slots__ = ("endpoint", "backend", "wire", "method", "args", "kwargs", "shard_key",
                 "future", "excluded", "attempts", "near")

    def __init__(self, endpoint: str, *, wire: WireRequest | None = None,
                 method: str = "__call__",
                 args: tuple = (), kwargs: dict | None = None, shard_key: Any = None,
                 future: asyncio.Future | None = None, near: str | None = None):
        self.endpoint = endpoint
        self.backend: str | None = None
        self.wire = wire
        self.method = method
        self.args = args
        self.kwargs = kwargs or {}
        self.shard_key = shard_key
        self.future = future  # None for shadow copies: nobody waits for them
        self.excluded: set[str] = set()
        self.attempts = 0
        self.near = near  # a worker address whose replicas to prefer (see _Backend.pick)

    def shadow_copy(self, backend: str) -> "Query":
        copy = Query(self.endpoint, wire=self.wire, method=self.method, args=self.args,
                     kwargs=self.kwargs)
        copy.backend = backend
        return copy

    @property
    def abandoned(self) -> bool:
        return self.future is not None and self.future.done()

    def resolve(self, value: Any) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(value)

    def fail(self, exc: BaseException) -> None:
        if self.future is not None and not self.future.done():
            if self.wire is not None:
                status = 404 if isinstance(exc, EndpointNotFoundError) else 503
                self.future.set_result(error_response(status, type(exc).__name__, str(exc)))
            else:
                self.future.set_exception(exc)


class ReplicaLink:
    """Queue of queries bound for one replica, flushed once per loop tick.

    Every query sent to a replica in the same tick is collected and leaves as a single
    message; the reply carries the results that finished first, and a ticket to
    collect the rest, so a slow query never delays its fast companions. This is the
    transport-level coalescing (never one Dask call per request); it is independent
    of the user-visible batching a replica may do on top.
    """

    __slots__ = ("backend", "tag", "address", "in_flight", "_pool", "_pending",
                 "_flush_scheduled", "_on_done", "_connecting", "_retired")

    def __init__(self, backend: str, tag: str, address: str, pool: ConnectionPool,
                 on_done: Callable[["ReplicaLink", list, bool], None]):
        self.backend = backend
        self.tag = tag
        self.address = address
        self.in_flight = 0
        self._pool = pool
        self._pending: list[Query] = []
        self._flush_scheduled = False
        self._on_done = on_done
        self._connecting: set[asyncio.Future] = set()
        self._retired = False

    def retire(self) -> None:
        """The replica left the routing table: stop connecting to it.

        A worker that died (a cancelled SLURM job) refuses connections, and the pool
        retries those until its connect timeout (30 s); batches still connecting go
        to the replicas of the new table instead. Nothing was sent, so none started.
        """
        self._retired = True
        for connecting in self._connecting:
            connecting.cancel()

    def send(self, query: Query) -> None:
        self.in_flight += 1
        self._pending.append(query)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._flush_scheduled = False
        spawn(self._exchange(batch))

    async def _exchange(self, batch: list[Query]) -> None:
        http = [q for q in batch if q.wire is not None]
        calls = [q for q in batch if q.wire is None]
        message: CallMessage = {"replica": self.tag}
        if http:
            message["http"] = [q.wire for q in http]
        if calls:
            message["calls"] = cloudpickle.dumps([(q.method, q.args, q.kwargs) for q in calls])
        if self._retired:  # it left the table after this batch was flushed to it
            self._on_done(self, batch, True)
            return
        local = in_process(self.address)
        if local is not None:  # the replica lives in this process: no comm, no copies
            try:
                reply = await local.call(**message)
            except Exception as exc:  # what the worker would have refused the message with
                self._fail(batch, exc)
                return
            if reply.get("retry"):
                self._on_done(self, batch, True)
                return
            await self._deliver(reply, dict(enumerate(http)), dict(enumerate(calls)))
            return
        connecting = asyncio.ensure_future(self._pool.connect(self.address))
        self._connecting.add(connecting)
        try:
            comm = await connecting
        except asyncio.CancelledError:
            if not self._retired:
                raise  # this task itself was cancelled, not only its connect
            self._on_done(self, batch, True)  # nothing was sent: other replicas take these
            return
        except OSError:
            # Nothing was sent, so nothing started: other replicas may take these.
            self._on_done(self, batch, True)
            return
        except Exception as exc:  # the pool is closed: no replica is reachable from here
            self._fail(batch, ServeError(f"cannot reach replica {self.tag!r}: {exc}"))
            return
        finally:
            self._connecting.discard(connecting)
        try:
            reply = await send_recv(comm, op=WorkerOp.CALL, **message)
        except (CommClosedError, OSError) as exc:
            self._fail(batch, ReplicaUnavailableError(self.backend, self.tag, str(exc) or
                                                      type(exc).__name__))
            return
        except Exception as exc:  # the worker refused the message itself
            self._fail(batch, exc)
            return
        finally:
            self._pool.reuse(self.address, comm)
        if reply.get("retry"):
            self._on_done(self, batch, True)
            return
        await self._deliver(reply, dict(enumerate(http)), dict(enumerate(calls)))

    async def _deliver(self, reply: CallReply, http: dict[int, Query],
                       calls: dict[int, Query]) -> None:
        """Hand out results as they arrive, collecting stragglers by ticket."""
        while True:
            finished = []
            for index, response in reply["http"]:
                query = http.pop(index)
                query.resolve(response)
                finished.append(query)
            for index, ok, value in cloudpickle.loads(reply["calls"]) if "calls" in reply else ():
                query = calls.pop(index)
                query.resolve(value) if ok else query.fail(value)
                finished.append(query)
            self._on_done(self, finished, False)
            if "ticket" not in reply:
                return
            try:
                local = in_process(self.address)
                collect = local.collect if local is not None else \
                    getattr(self._pool(self.address), WorkerOp.COLLECT)
                reply = await collect(replica=self.tag, ticket=reply["ticket"])
            except Exception as exc:
                reply = {"lost": True, "error": exc}
            if reply.get("lost"):
                reason = reply.get("error") or "the replica went away while running them"
                self._fail([*http.values(), *calls.values()],
                           ReplicaUnavailableError(self.backend, self.tag, str(reason)))
                return

    def _fail(self, batch: list[Query], exc: BaseException) -> None:
        logger.warning("call to replica %s of backend %s failed: %r", self.tag,
                       self.backend, exc)
        for query in batch:
            if query.wire is not None:
                query.resolve(error_response(503, type(exc).__name__, str(exc),
                                             backend=self.backend, replica=self.tag))
            else:
                query.fail(exc)
        self._on_done(self, batch, False)


class _Endpoint:
    __slots__ = ("name", "route", "methods", "policy")

    def __init__(self, name: str, spec: dict):
        self.name = name
        self.route = spec["route"]
        self.methods = frozenset(spec["methods"])
        self.policy = TrafficPolicy(spec["traffic"], spec.get("shadows", {}))


class _Backend:
    __slots__ = ("tag", "max_concurrent", "links", "waiting", "_near")

    def __init__(self, tag: str, max_concurrent: int, links: list[ReplicaLink],
                 waiting: deque):
        self.tag = tag
        self.max_concurrent = max_concurrent
        self.links = links
        self.waiting = waiting
        self._near: dict[str, list[ReplicaLink]] | None = None  # built on first use

    def _free(self, link: ReplicaLink, excluded: set[str]) -> bool:
        return link.in_flight < self.max_concurrent and link.tag not in excluded

    def pick(self, excluded: set[str], near: str | None = None) -> ReplicaLink | None:
        if near is not None:
            link = self._pick_near(near, excluded)
            if link is not None:
                return link
        links = self.links
        if len(links) == 1:
            return links[0] if self._free(links[0], excluded) else None
        if len(links) > 1:
            a, b = random.sample(links, 2)
            best = min((l for l in (a, b) if self._free(l, excluded)),
                       key=lambda l: l.in_flight, default=None)
            if best is not None:
                return best
            return min((l for l in links if self._free(l, excluded)),
                       key=lambda l: l.in_flight, default=None)
        return None

    # -- locality, for batch prediction (daskserve/batch.py) ---------------------------
    def _pick_near(self, address: str, excluded: set[str]) -> ReplicaLink | None:
        """A free replica answering on the worker ``address``, else one on its host.

        A partition sent to its own worker's replica never crosses the network. Links
        are indexed by address and host once per table, so this costs a dict lookup
        plus a look at the replicas found there.
        """
        if self._near is None:
            self._near = {}
            for link in self.links:
                self._near.setdefault(link.address, []).append(link)
                self._near.setdefault(_host(link.address), []).append(link)
        for key in (address, _host(address)):
            best = min((l for l in self._near.get(key, ()) if self._free(l, excluded)),
                       key=lambda l: l.in_flight, default=None)
            if best is not None:
                return best
        return None


def _host(address: str) -> str:
    try:
        return "host:" + get_address_host(address)
    except ValueError:
        return "host:" + address


class Router:
    """Routes queries for one serve instance from one event loop."""

    _ids = itertools.count()
    epoch: str | None = None  # of the controller instance whose table this is

    def __init__(self, pool: ConnectionPool, scheduler_address: str,
                 listener_id: str | None = None):
        self._pool = pool
        self.scheduler_address = scheduler_address
        self.listener_id = listener_id or f"router-{next(self._ids)}-{random.getrandbits(32):x}"
        self.version = -1
        self.closed = False
        self.endpoints: dict[str, _Endpoint] = {}
        self.routes: dict[str, _Endpoint] = {}
        self._backends: dict[str, _Backend] = {}
        self._links: dict[str, ReplicaLink] = {}
        self._updated = asyncio.Event()
        self._listener: asyncio.Task | None = None

    # -- table --------------------------------------------------------------------
    def start(self) -> None:
        if self._listener is None:
            self._listener = spawn(self._listen())

    async def _listen(self) -> None:
        listen = getattr(self._pool(self.scheduler_address), ControllerOp.LISTEN)
        while not self.closed:
            try:
                table = await listen(version=self.version, listener=self.listener_id,
                                     epoch=self.epoch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("routing table poll failed: %r", exc)
                await asyncio.sleep(0.5)
                continue
            if not table or table.get("shutdown"):
                self.close(reason="the serve instance was shut down")
                return
            if table["version"] != self.version or table.get("epoch") != self.epoch:
                self.apply(table)

    def apply(self, table: RoutingTable) -> None:
        """Swap in a new table; re-dispatch what waited on replicas that changed."""
        old_backends = self._backends
        backends: dict[str, _Backend] = {}
        for tag, spec in table["backends"].items():
            links = [self._links.get(r["tag"]) or ReplicaLink(tag, r["tag"], r["address"],
                                                              self._pool, self._done)
                     for r in spec["replicas"]]
            previous = old_backends.get(tag)
            backends[tag] = _Backend(tag, spec["max_concurrent_queries"], links,
                                     previous.waiting if previous else deque())
        links = {link.tag: link for b in backends.values() for link in b.links}
        for tag, link in self._links.items():
            if tag not in links:
                link.retire()
        self._links = links
        self.endpoints = {name: _Endpoint(name, spec)
                          for name, spec in table["endpoints"].items()}
        self.routes = {e.route: e for e in self.endpoints.values() if e.route}
        self._backends = backends
        self.epoch = table.get("epoch")
        self.version = table["version"]
        for tag, backend in old_backends.items():
            if tag not in backends:
                for query in backend.waiting:
                    if query.future is not None:
                        self._route(query)
        for backend in backends.values():
            self._release_waiting(backend)
        self._updated.set()
        self._updated = asyncio.Event()

    async def wait_for_version(self, version: int, epoch: str | None = None,
                               timeout: float = 30.0) -> None:
        """Block until the table includes a change the caller made: ``version`` of the
        controller instance ``epoch`` (None: of whichever instance the router follows).

        Versions count per instance. When the router follows another instance than
        the caller's, one of them is gone; the controller says which runs. If it is the
        router's, the caller's change went with its instance and no version of it will
        come, so the current table will do; otherwise the router waits for the running
        instance's table (and for ``version`` too when that is the caller's instance).
        """
        self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        asked = None  # the router epoch we last asked the controller about
        while not self.closed:
            if self.epoch is not None and epoch not in (None, self.epoch) and \
                    asked != self.epoch:
                asked = self.epoch
                try:
                    info = await getattr(self._pool(self.scheduler_address),
                                         ControllerOp.INFO)()
                except Exception as exc:  # unreachable: wait for the next table
                    logger.debug("asking the controller for its epoch failed: %r", exc)
                    info = None
                running = info.get("epoch") if info else None
                if running is not None and running != epoch:
                    epoch, version = running, 0  # the caller's instance is gone
            if self.epoch is not None and epoch in (None, self.epoch) and \
                    self.version >= version:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ServeError(f"routing table did not reach version {version} "
                                 f"within {timeout}s (at {self.version})")
            try:
                await asyncio.wait_for(self._updated.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def load(self, backend: str) -> int:
        """Queries for ``backend`` this router has sent and not seen answered, plus
        those waiting for a free replica (shadow copies included)."""
        state = self._backends.get(backend)
        if state is None:
            return 0
        return sum(link.in_flight for link in state.links) + len(state.waiting)

    def close(self, reason: str = "router closed") -> None:
        self.closed = True
        for backend in self._backends.values():
            while backend.waiting:
                backend.waiting.popleft().fail(ServeError(reason))
        self._updated.set()
        if self._listener is not None and self._listener is not asyncio.current_task():
            self._listener.cancel()

    # -- dispatch -----------------------------------------------------------------
    def submit(self, query: Query) -> None:
        """Route a query (and its shadow copies); its future gets the result."""
        if self.closed:
            query.fail(ServeError("this serve instance was shut down"))
            return
        endpoint = self._route(query)
        if endpoint is not None:
            for backend in endpoint.policy.shadow_targets():
                self._enqueue(query.shadow_copy(backend))

    def _route(self, query: Query) -> _Endpoint | None:
        endpoint = self.endpoints.get(query.endpoint)
        if endpoint is None:
            query.fail(EndpointNotFoundError(f"endpoint {query.endpoint!r} does not exist"))
            return None
        backend = endpoint.policy.choose(query.shard_key)
        if backend is None:
            query.fail(ServeError(f"endpoint {query.endpoint!r} has no traffic policy; "
                                  f"call set_traffic first"))
            return None
        query.backend = backend
        self._enqueue(query)
        return endpoint

    def _enqueue(self, query: Query) -> None:
        backend = self._backends.get(query.backend)
        if backend is None:
            query.fail(ServeError(f"backend {query.backend!r} does not exist"))
            return
        link = backend.pick(query.excluded, query.near)
        if link is None:
            backend.waiting.append(query)  # back-pressure: wait here, not in the replica
        else:
            link.send(query)

    def _release_waiting(self, backend: _Backend) -> None:
        waiting = backend.waiting
        while waiting:
            if waiting[0].abandoned:
                waiting.popleft()
                continue
            link = backend.pick(waiting[0].excluded, waiting[0].near)
            if link is None:
                return
            link.send(waiting.popleft())

    def _done(self, link: ReplicaLink, batch: list[Query], retry: bool) -> None:
        link.in_flight -= len(batch)
        if retry:
            for query in batch:
                query.attempts += 1
                query.excluded.add(link.tag)
                if query.attempts >= MAX_ATTEMPTS:
                    query.fail(ServeError(f"no replica of backend {query.backend!r} "
                                          f"accepted the request after {MAX_ATTEMPTS} tries"))
                elif not query.abandoned:
                    self._enqueue(query)
        backend = self._backends.get(link.backend)
        if backend is not None and backend.waiting:
            self._release_waiting(backend)

    # -- entry points ---------------------------------------------------------------
    async def http(self, endpoint: str, wire: WireRequest, shard_key: str | None,
                   timeout: float | None = None) -> WireResponse:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.submit(Query(endpoint, wire=wire, shard_key=shard_key, future=future))
        if timeout is None or future.done():
            return await future
        timer = loop.call_later(timeout, _expire, future, timeout)
        try:
            return await future
        finally:
            timer.cancel()

    async def call(self, endpoint: str, method: str, args: tuple, kwargs: dict,
                   shard_key: Any = None, min_version: int = -1,
                   near: str | None = None) -> Any:
        """``near``: prefer replicas answering at that worker address (or its host)."""
        if self.version < max(min_version, 0):  # the first table is version 0 or later
            await self.wait_for_version(max(min_version, 0))
        future = asyncio.get_running_loop().create_future()
        self.submit(Query(endpoint, method=method, args=args, kwargs=kwargs,
                          shard_key=shard_key, future=future, near=near))
        return await future


def _expire(future: asyncio.Future, timeout: float) -> None:
    if not future.done():
        future.set_result(error_response(504, "GatewayTimeout",
                                         f"no response within request_timeout_s={timeout}"))
