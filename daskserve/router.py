"""The router shared by HTTP proxies and handles.

It holds the routing table the controller pushes (endpoints, traffic policies,
replicas of each backend) and turns a request into a query on one replica:
weighted or shard-keyed backend choice, shadow copies, a replica picked by the
power of two choices among those under ``max_concurrent_queries``, and a wait
queue per backend when every replica is full. Finding the endpoint and the backend
is a dict lookup, whatever their number; picking a replica samples two, and scans
the backend's replicas only when both samples are full.

Nothing waits without bound: a wait queue refuses requests past the backend's
``max_queued_requests`` and fails those that waited ``queue_timeout_s`` (one
periodic sweep per router, running only while something waits). A query whose
caller gives up (timeout, disconnected client, cancelled handle call) is
*abandoned*: it leaves its queue, stops counting against its replica's limit at
once, and the replica is told to cancel it.

A router lives on one event loop (the proxy's, a worker's or a Dask client's) and
learns table changes by long-polling the controller; a new table is swapped in
whole, so in-flight queries are never dropped by a traffic or replica change.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import random
import time
from collections import deque
from typing import Any, Callable

import cloudpickle
from distributed.comm import get_address_host
from distributed.core import ConnectionPool

from . import metrics, pickling
from .channel import Channel, ChannelError, ChannelPool
from .errors import (BackPressureError, EndpointNotFoundError, QueueTimeoutError,
                     ReplicaUnavailableError, SerializationError, ServeError)
from .http_codec import error_response
from .load_report import report_loads
from .protocol import (CallMessage, CallReply, ControllerOp, RoutingTable, WireRequest,
                       WireResponse, WorkerOp)
from .tasks import spawn
from .traffic import TrafficPolicy
from .worker_plugin import in_process

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 20
# The queue sweep runs this often at most, and at least four times per queue timeout.
SWEEP_INTERVAL_S = 1.0
# An abandoned query left in a wait queue is removed in bulk once this many gather.
COMPACT_AFTER = 32
# Lone requests one router may have on one replica's thread lane at once; more
# take the channel (daskserve/lane.py).
LANE_CONNECTIONS = 4
# Requests per message to a replica in another process (a batched backend's full
# batch still travels in one). With one message per loop tick, the proxy and the
# replica took turns under load: the replica idled while the proxy read a burst,
# then the proxy idled while the replica ran all of it. Smaller messages let the
# replica start on a burst's first part, and its answers come back while the proxy
# still reads the rest (benchmarks/RESULTS.md, "Messages of at most 8 requests").
MESSAGE_REQUESTS = 8


class Query:
    """One request on its way to a replica: an HTTP message or a handle call.

    While it waits, ``queue`` is the wait queue holding it; while it is in flight,
    ``link`` is the replica link whose limit it counts against, and once its message
    left, ``ticket`` and ``index`` name it there. Abandoning it clears both.
    """

    __slots__ = ("endpoint", "backend", "wire", "method", "args", "kwargs", "shard_key",
                 "future", "excluded", "attempts", "link", "ticket", "index", "queue",
                 "queued_at", "trace", "near")

    def __init__(self, endpoint: str, *, wire: WireRequest | None = None,
                 method: str = "__call__",
                 args: tuple = (), kwargs: dict | None = None, shard_key: Any = None,
                 future: asyncio.Future | None = None, near: str | None = None,
                 trace: Any = None):
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
        self.trace = trace  # observability: the access log's, for a proxy's request
        self.link: ReplicaLink | None = None
        self.ticket: int | None = None
        self.index = 0
        self.queue: _WaitQueue | None = None
        self.queued_at = 0.0
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
                self.future.set_result(failure_response(exc))
            else:
                self.future.set_exception(exc)


def failure_response(exc: BaseException, **extra: Any) -> WireResponse:
    """The HTTP answer to a request that failed in daskserve, not in user code."""
    if isinstance(exc, EndpointNotFoundError):
        return error_response(404, type(exc).__name__, str(exc), **extra)
    if isinstance(exc, BackPressureError):
        response = error_response(503, type(exc).__name__, str(exc),
                                  **{"backend": exc.backend, **extra})
        response[1].append(["retry-after", "1"])
        return response
    return error_response(503, type(exc).__name__, str(exc), **extra)


class ReplicaLink:
    """Queue of queries bound for one replica, flushed once per loop tick.

    The queries sent to a replica in the same tick are collected and leave together,
    in messages of at most ``message_requests``; each reply carries the results that
    finished first, and the rest are collected under the message's ticket, so a slow
    query never delays its fast companions. This is the transport-level coalescing
    (never one Dask call per request); it is independent of the user-visible batching
    a replica may do on top. Cancellations of abandoned queries are coalesced the same
    way.
    """

    __slots__ = ("backend", "tag", "address", "in_flight", "message_requests",
                 "_channels", "_pending", "_flush_scheduled", "_on_done", "_tickets",
                 "_cancels", "_connecting", "_retired", "_lane_methods", "_lanes",
                 "_lanes_busy")

    def __init__(self, backend: str, tag: str, address: str, channels: ChannelPool,
                 on_done: Callable[["ReplicaLink", list, bool], None]):
        self.backend = backend
        self.tag = tag
        self.address = address
        self.in_flight = 0
        self.message_requests = MESSAGE_REQUESTS  # the router sets it per backend
        self._channels = channels
        self._pending: list[Query] = []
        self._flush_scheduled = False
        self._on_done = on_done
        self._tickets = itertools.count(random.getrandbits(62))
        self._cancels: dict[int, tuple[list[int], list[int]]] = {}
        self._connecting: set[asyncio.Future] = set()
        self._retired = False
        # Methods seen to run on the replica's handler threads: a lone request to one
        # of them takes the thread lane, on a connection of its own (idle ones here).
        self._lane_methods: set[str] = set()
        self._lanes: list[Channel] = []
        self._lanes_busy = 0

    def retire(self) -> None:
        """The replica left the routing table: stop connecting to it.

        A worker that died (a SIGKILLed process, a cancelled SLURM job) refuses
        connections, and the pool retries those until its connect timeout (30 s);
        batches still connecting go to the replicas of the new table instead. Nothing
        was sent, so none started.
        """
        self._retired = True
        for connecting in self._connecting:
            connecting.cancel()
        for lane in self._lanes:
            lane.close()
        self._lanes.clear()

    async def _connect(self) -> Channel:
        """The open channel to the replica's process; raises ``_NotSent`` when it
        cannot be reached, in which case nothing was sent and other replicas may
        take the work.

        A channel reads all the time, so one whose process died while it sat idle
        is already marked closed, and a new one is opened (or found impossible)
        before anything is written: requests that never ran are never lost to it.
        """
        channel = self._channels.ready(self.address)
        if channel is not None:
            return channel
        if not self._retired:
            connecting = asyncio.ensure_future(self._channels.get(self.address))
            self._connecting.add(connecting)
            try:
                return await connecting
            except asyncio.CancelledError:
                if not self._retired:
                    raise  # this task itself was cancelled, not only its connect
            except OSError:
                pass
            finally:
                self._connecting.discard(connecting)
        raise _NotSent

    def send(self, query: Query) -> None:
        if query.trace is not None:  # observability: the access log names the replica
            query.trace.note(self.backend, self.tag)
        self.in_flight += 1
        query.link = self
        query.ticket = None
        self._pending.append(query)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            spawn(self._flush())  # its first step runs after this loop tick

    def abandon(self, query: Query) -> None:
        """Stop counting a query its caller gave up on; have the replica cancel it."""
        query.link = None
        self.in_flight -= 1
        if query.ticket is None:
            return  # its message has not left: ``_exchange`` leaves it out
        if not self._cancels:
            asyncio.get_running_loop().call_soon(self._flush_cancels)
        lists = self._cancels.get(query.ticket)
        if lists is None:
            lists = self._cancels[query.ticket] = ([], [])
        lists[0 if query.wire is not None else 1].append(query.index)

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._flush_scheduled = False
        size = self.message_requests
        if len(batch) > size and in_process(self.address) is None:
            # A replica in this process shares its loop: splitting buys no overlap.
            for start in range(size, len(batch), size):
                spawn(self._exchange(batch[start:start + size]))
            batch = batch[:size]
        await self._exchange(batch)

    def _flush_cancels(self) -> None:
        cancels, self._cancels = self._cancels, {}
        spawn(self._send_cancels([[ticket, http, calls]
                                  for ticket, (http, calls) in cancels.items()]))

    async def _send_cancels(self, cancels: list[list]) -> None:
        try:
            channel = self._channels.ready(self.address)
            if channel is not None:  # without one, the replica is gone with its work
                await channel.request(WorkerOp.CANCEL, replica=self.tag, cancels=cancels)
        except Exception as exc:  # the replica is gone, and its work with it
            logger.debug("cancelling on replica %s failed: %r", self.tag, exc)

    async def _exchange(self, batch: list[Query]) -> None:
        try:
            http, calls = [], []
            for query in batch:
                if query.link is self:  # some may have been abandoned by now
                    (calls if query.wire is None else http).append(query)
            ticket = next(self._tickets)
            message: CallMessage = {"replica": self.tag, "ticket": ticket}
            if calls:
                try:
                    message["calls"] = cloudpickle.dumps(
                        [(q.method, q.args, q.kwargs) for q in calls])
                except Exception:
                    calls = self._drop_unpicklable(calls)
                    if calls:
                        message["calls"] = cloudpickle.dumps(
                            [(q.method, q.args, q.kwargs) for q in calls])
            if http:
                message["http"] = [q.wire for q in http]
            elif not calls:
                return
            # Named before anything is sent, so a query abandoned from here on can be
            # cancelled; the replica remembers a cancel that overtakes its message.
            for index, query in enumerate(http):
                query.ticket, query.index = ticket, index
            for index, query in enumerate(calls):
                query.ticket, query.index = ticket, index
            reply = await self._send(http + calls, message)
            if reply is None:
                return
            if reply.get("lane"):
                self._lane_methods.add(calls[0].method if calls else "__call__")
            if reply.get("retry"):
                self._on_done(self, http + calls, True)
            elif "undecodable" in reply:
                self._resend_apart(http, calls, reply["undecodable"])
            else:
                await self._deliver(reply, ticket, dict(enumerate(http)),
                                    dict(enumerate(calls)))
        except Exception as exc:  # a bug must cost these queries, never their slots
            logger.exception("sending to replica %s of backend %s failed", self.tag,
                             self.backend)
            self._fail(batch, exc)

    async def _send(self, queries: list[Query], message: CallMessage) -> CallReply | None:
        """Send a CALL and return the reply; None when ``queries`` were settled here
        (sent elsewhere, or failed) instead."""
        local = in_process(self.address)
        if local is not None:  # the replica lives in this process: no comm, no copies
            try:
                return await local.call(**message)
            except Exception as exc:  # what the worker would have refused the message with
                self._fail(queries, exc)
                return None
        lane = await self._lane(queries)
        if lane is not None:
            return await self._request(queries, lane, message, lane=True)
        try:
            channel = await self._connect()
        except _NotSent:
            # Nothing was sent, so nothing started: other replicas may take these.
            self._on_done(self, queries, True)
            return None
        except RuntimeError as exc:  # the pool is closed: no replica is reachable
            self._fail(queries, ServeError(f"cannot reach replica {self.tag!r}: {exc}"))
            return None
        return await self._request(queries, channel, message)

    async def _request(self, queries: list[Query], channel: Channel, message: CallMessage,
                       lane: bool = False) -> CallReply | None:
        reply = None
        try:
            reply = await channel.request(WorkerOp.CALL, **message)
        except OSError as exc:
            self._fail(queries, ReplicaUnavailableError(
                self.backend, self.tag, str(exc) or type(exc).__name__))
        except ChannelError as exc:  # the worker refused the message itself
            self._fail(queries, ServeError(f"replica {self.tag!r} refused a message: {exc}"))
        finally:
            if lane:
                self._lanes_busy -= 1
                # Only a connection with nothing outstanding may carry the next request.
                if reply is None or reply.get("closing") or channel.closed or self._retired:
                    channel.close()
                else:
                    self._lanes.append(channel)
        return reply

    async def _lane(self, queries: list[Query]) -> Channel | None:
        """A lane connection for a lone request to a method seen to run on handler
        threads, if the replica's process has a lane and one is free or may open."""
        if len(queries) != 1 or not self._lane_methods or self._retired:
            return None
        query = queries[0]
        if (query.method if query.wire is None else "__call__") not in self._lane_methods:
            return None
        channel = self._channels.ready(self.address)
        if channel is None or channel.lane is None:
            return None
        while self._lanes:
            lane = self._lanes.pop()
            if not lane.closed:  # (one whose process went away while it sat idle is)
                self._lanes_busy += 1
                return lane
        if self._lanes_busy >= LANE_CONNECTIONS:
            return None
        self._lanes_busy += 1
        try:
            return await self._channels.open_lane(channel.lane)
        except Exception as exc:  # nothing was sent: the channel takes it, and the rest
            self._lanes_busy -= 1
            channel.lane = None  # for every replica of that process, while it stays open
            logger.info("no thread lane to %s (%r); using its channel", self.address, exc)
            return None
        except BaseException:
            self._lanes_busy -= 1
            raise

    def _drop_unpicklable(self, calls: list[Query]) -> list[Query]:
        """The calls' one pickle failed: fail just the calls at fault, keep the rest."""
        good, bad = [], []
        for query in calls:
            problem = pickling.why_unpicklable(query.method, query.args, query.kwargs)
            if problem is None:
                good.append(query)
            else:
                bad.append(query)
                query.fail(SerializationError(
                    f"cannot send a call to backend {self.backend!r} (method "
                    f"{query.method!r}): {problem}"))
        self._on_done(self, bad, False)
        return good

    def _resend_apart(self, http: list[Query], calls: list[Query], reason: str) -> None:
        """The replica could not unpickle the calls and ran nothing: send each call on
        its own, so only those that fail to unpickle there fail."""
        live = [q for q in calls if q.link is self]
        if len(calls) == 1:  # alone in its message: this call is the one at fault
            for query in live:
                query.fail(SerializationError(
                    f"the arguments of a call to backend {self.backend!r} (method "
                    f"{query.method!r}) could not be unpickled on replica {self.tag!r}: "
                    f"{reason}"))
            self._on_done(self, live, False)
        else:
            for query in live:
                spawn(self._exchange([query]))
        http = [q for q in http if q.link is self]
        if http:
            spawn(self._exchange(http))

    async def _deliver(self, reply: CallReply, ticket: int, http: dict[int, Query],
                       calls: dict[int, Query]) -> None:
        """Hand out results as they arrive, collecting stragglers by ticket."""
        while True:
            finished = []
            for index, response in reply["http"]:
                query = http.pop(index, None)
                if query is not None and query.link is self:
                    query.resolve(response)
                    finished.append(query)
            if "calls" in reply:
                self._unpack_calls(reply, calls, finished)
            if finished:
                self._on_done(self, finished, False)
            if "ticket" not in reply:
                break
            if not any(q.link is self for q in (*http.values(), *calls.values())):
                return  # all abandoned, and the replica told to cancel them
            try:
                local = in_process(self.address)
                reply = await (local.collect(replica=self.tag, ticket=ticket)
                               if local is not None else
                               (await self._connect()).request(
                                   WorkerOp.COLLECT, replica=self.tag, ticket=ticket))
            except Exception as exc:  # _NotSent too: the replica is gone, and its work
                reply = {"lost": True, "error": exc}
            if reply.get("lost"):
                reason = reply.get("error") or "the replica went away while running them"
                self._fail([*http.values(), *calls.values()],
                           ReplicaUnavailableError(self.backend, self.tag, str(reason)))
                return
        # The replica reports cancelled work never; only abandoned queries may be left.
        left = [q for q in (*http.values(), *calls.values()) if q.link is self] \
            if http or calls else None
        if left:
            self._fail(left, ReplicaUnavailableError(self.backend, self.tag,
                                                     "the replica cancelled the request"))

    def _unpack_calls(self, reply: CallReply, calls: dict[int, Query],
                      finished: list[Query]) -> None:
        values = memoryview(reply["values"])
        start = 0
        for entry in reply["calls"]:
            index, ok, end = entry[0], entry[1], entry[2]
            query = calls.pop(index, None)
            if query is not None and query.link is self:
                try:
                    value = pickle.loads(values[start:end])
                except Exception as exc:
                    ok, value = False, self._unloadable(entry, exc)
                query.resolve(value) if ok else query.fail(value)
                finished.append(query)
            start = end

    def _unloadable(self, entry: list, exc: Exception) -> SerializationError:
        where = f"backend {self.backend!r} (replica {self.tag!r})"
        problem = pickling.summarize(exc)
        if entry[1]:
            return SerializationError(f"the result of a call to {where} could not be "
                                      f"unpickled here: {problem}")
        return SerializationError(f"{where} raised {entry[3]}, and that exception could "
                                  f"not be unpickled here: {problem}")

    def _fail(self, batch: list[Query], exc: BaseException) -> None:
        batch = [q for q in batch if q.link is self]
        if not batch:
            return
        logger.warning("call to replica %s of backend %s failed: %r", self.tag,
                       self.backend, exc)
        for query in batch:
            if query.wire is not None:
                query.resolve(failure_response(exc, backend=self.backend, replica=self.tag))
            else:
                query.fail(exc)
        self._on_done(self, batch, False)


class _WaitQueue:
    """Queries waiting for a free replica of one backend, oldest first.

    An abandoned query stays in place (a deque cannot drop from its middle cheaply)
    but is counted as ``dead``; dead entries are skipped when reached and removed in
    bulk once they make up half the queue, or at the next sweep, so the requests of
    clients that left hold no memory for long.
    """

    __slots__ = ("queries", "dead")

    def __init__(self) -> None:
        self.queries: deque[Query] = deque()
        self.dead = 0

    def live(self) -> int:
        return len(self.queries) - self.dead

    def compact(self) -> None:
        self.queries = deque(q for q in self.queries if q.queue is self)
        self.dead = 0


class _Endpoint:
    __slots__ = ("name", "route", "methods", "policy")

    def __init__(self, name: str, spec: dict):
        self.name = name
        self.route = spec["route"]
        self.methods = frozenset(spec["methods"])
        self.policy = TrafficPolicy(spec["traffic"], spec.get("shadows", {}))


class _Backend:
    __slots__ = ("tag", "max_concurrent", "max_queued", "queue_timeout", "links", "queue",
                 "_near")

    def __init__(self, tag: str, spec: dict, links: list[ReplicaLink], queue: _WaitQueue):
        self.tag = tag
        self.max_concurrent = spec["max_concurrent_queries"]
        self.max_queued = spec.get("max_queued_requests", -1)
        self.queue_timeout = spec.get("queue_timeout_s")
        self.links = links
        self.queue = queue
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
        self._channels = ChannelPool(pool)
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
        metrics.track_router(self)  # observability: scrapes read its queues
        self._waiting: set[str] = set()  # backends whose queue may hold queries
        self._sweeper: asyncio.Future | None = None
        self._reporter: asyncio.Future | None = None

    # -- table --------------------------------------------------------------------
    def start(self) -> None:
        if self._listener is None:
            self._listener = spawn(self._listen())
            self._reporter = spawn(report_loads(self))

    def controller_rpc(self) -> Any:
        return self._pool(self.scheduler_address)

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
                                                              self._channels, self._done)
                     for r in spec["replicas"]]
            message_requests = max(MESSAGE_REQUESTS, spec.get("max_batch_size") or 1)
            for link in links:
                link.message_requests = message_requests
            previous = old_backends.get(tag)
            backends[tag] = _Backend(tag, spec, links,
                                     previous.queue if previous else _WaitQueue())
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
                queue = backend.queue
                for query in queue.queries:
                    if query.queue is queue:
                        query.queue = None
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
        return sum(link.in_flight for link in state.links) + state.queue.live()

    def loads(self) -> dict[str, int]:
        """``load`` of each backend that has any: what the controller autoscales by."""
        loads = {tag: self.load(tag) for tag in self._backends}
        return {tag: load for tag, load in loads.items() if load}

    def close(self, reason: str = "router closed") -> None:
        self.closed = True
        for backend in self._backends.values():
            queue = backend.queue
            while queue.queries:
                query = queue.queries.popleft()
                if query.queue is queue:
                    query.queue = None
                    query.fail(ServeError(reason))
            queue.dead = 0
        self._updated.set()
        if self._listener is not None and self._listener is not asyncio.current_task():
            self._listener.cancel()
        if self._reporter is not None:
            self._reporter.cancel()
        self._channels.close()

    # -- dispatch -----------------------------------------------------------------
    def submit(self, query: Query) -> None:
        """Route a query (and its shadow copies); its future gets the result."""
        if self.closed:
            query.fail(ServeError("this serve instance was shut down"))
            return
        metrics.router_request(self, query.endpoint)  # observability
        endpoint = self._route(query)
        if endpoint is not None:
            for backend in endpoint.policy.shadow_targets():
                self._enqueue(query.shadow_copy(backend))

    def abandon(self, query: Query) -> None:
        """Forget a query whose caller stopped waiting, wherever it is.

        The caller has settled the query's future (a 504, a 499, a cancellation)
        before calling this. A waiting query leaves its queue; one in flight frees its
        slot now, so that hung work cannot keep a replica "full", and its replica is
        asked to cancel it.
        """
        queue = query.queue
        if queue is not None:
            query.queue = None
            queue.dead += 1
            if queue.dead >= COMPACT_AFTER and 2 * queue.dead >= len(queue.queries):
                queue.compact()
            return
        link = query.link
        if link is not None:
            link.abandon(query)
            backend = self._backends.get(link.backend)
            if backend is not None and backend.queue.queries:
                self._release_waiting(backend)

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
            self._wait(backend, query)  # back-pressure: wait here, not in the replica
        else:
            link.send(query)

    def _wait(self, backend: _Backend, query: Query) -> None:
        queue = backend.queue
        if 0 <= backend.max_queued <= queue.live():
            query.fail(BackPressureError(
                backend.tag, f"backend {backend.tag!r} is busy: {queue.live()} request(s) "
                f"already wait for a free replica here (max_queued_requests="
                f"{backend.max_queued}); retry later"))
            return
        query.queue = queue
        query.queued_at = time.monotonic()
        queue.queries.append(query)
        self._waiting.add(backend.tag)
        if self._sweeper is None:
            self._sweeper = spawn(self._sweep())

    def _release_waiting(self, backend: _Backend) -> None:
        queue = backend.queue
        waiting = queue.queries
        while waiting:
            head = waiting[0]
            if head.queue is not queue:  # abandoned while it waited
                waiting.popleft()
                queue.dead -= 1
                continue
            if head.abandoned:
                waiting.popleft()
                head.queue = None
                continue
            link = backend.pick(head.excluded, head.near)
            if link is None:
                return
            waiting.popleft()
            head.queue = None
            link.send(head)

    async def _sweep(self) -> None:
        """Fail queries that waited past their backend's queue timeout and drop the
        abandoned ones; runs while anything waits, one timer for the whole router."""
        try:
            while self._waiting and not self.closed:
                timeouts = [b.queue_timeout for tag in self._waiting
                            if (b := self._backends.get(tag)) and b.queue_timeout]
                await asyncio.sleep(min([SWEEP_INTERVAL_S, *(t / 4 for t in timeouts)]))
                now = time.monotonic()
                for tag in list(self._waiting):
                    backend = self._backends.get(tag)
                    if backend is None or not backend.queue.queries:
                        self._waiting.discard(tag)
                    else:
                        self._expire_waiting(backend, now)
        finally:
            self._sweeper = None

    def _expire_waiting(self, backend: _Backend, now: float) -> None:
        queue = backend.queue
        if queue.dead:
            queue.compact()
        timeout = backend.queue_timeout
        if timeout is None:
            return
        waiting = queue.queries  # oldest first: queries are appended as they arrive
        while waiting and now - waiting[0].queued_at >= timeout:
            query = waiting.popleft()
            query.queue = None
            query.fail(QueueTimeoutError(backend.tag, self._no_replica(backend, timeout)))

    @staticmethod
    def _no_replica(backend: _Backend, timeout: float) -> str:
        running = len(backend.links)
        if running == 0:
            why = "it has no running replica (none requested, or all still pending)"
        else:
            why = (f"all {running} running replica(s) stayed at max_concurrent_queries="
                   f"{backend.max_concurrent}")
        return (f"no replica of backend {backend.tag!r} was available within "
                f"queue_timeout_s={timeout}: {why}")

    def _done(self, link: ReplicaLink, batch: list[Query], retry: bool) -> None:
        released = 0
        for query in batch:
            if query.link is link:  # abandoned ones freed their slot already
                query.link = None
                released += 1
        link.in_flight -= released
        if retry:
            for query in batch:
                if query.link is not None or query.abandoned:
                    continue
                query.attempts += 1
                query.excluded.add(link.tag)
                if query.attempts >= MAX_ATTEMPTS:
                    query.fail(ServeError(f"no replica of backend {query.backend!r} "
                                          f"accepted the request after {MAX_ATTEMPTS} tries"))
                else:
                    self._enqueue(query)
        backend = self._backends.get(link.backend)
        if backend is not None and backend.queue.queries:
            self._release_waiting(backend)

    # -- entry points ---------------------------------------------------------------
    def submit_http(self, endpoint: str, wire: WireRequest, shard_key: str | None,
                    trace: Any = None) -> Query:
        """Route an HTTP request; its future gets the answer. The proxy holds the
        query so that it can abandon it when the client leaves."""
        query = Query(endpoint, wire=wire, shard_key=shard_key,
                      future=asyncio.get_running_loop().create_future(), trace=trace)
        self.submit(query)
        return query

    def expire_after(self, query: Query, timeout: float | None) -> asyncio.TimerHandle | None:
        """Answer ``query`` 504 and abandon it if nothing answered it within
        ``timeout`` seconds; cancel the returned timer once it is answered."""
        if timeout is None or query.future.done():
            return None
        return asyncio.get_running_loop().call_later(timeout, self._expire, query, timeout)

    async def answer(self, query: Query, timeout: float | None = None) -> WireResponse:
        timer = self.expire_after(query, timeout)
        try:
            return await query.future
        finally:
            if timer is not None:
                timer.cancel()

    async def http(self, endpoint: str, wire: WireRequest, shard_key: str | None,
                   timeout: float | None = None) -> WireResponse:
        return await self.answer(self.submit_http(endpoint, wire, shard_key), timeout)

    async def call(self, endpoint: str, method: str, args: tuple, kwargs: dict,
                   shard_key: Any = None, min_version: int = -1,
                   near: str | None = None) -> Any:
        """``near``: prefer replicas answering at that worker address (or its host)."""
        if self.version < max(min_version, 0):  # the first table is version 0 or later
            await self.wait_for_version(max(min_version, 0))
        future = asyncio.get_running_loop().create_future()
        query = Query(endpoint, method=method, args=args, kwargs=kwargs,
                      shard_key=shard_key, future=future, near=near)
        self.submit(query)
        try:
            return await future
        except asyncio.CancelledError:  # the caller gave up (a timeout, a cancel)
            self.abandon(query)
            raise

    def _expire(self, query: Query, timeout: float) -> None:
        if not query.future.done():
            query.future.set_result(error_response(
                504, "GatewayTimeout", f"no response within request_timeout_s={timeout}"))
            self.abandon(query)


class _NotSent(Exception):
    """Nothing of a message left for its replica: safe to send it elsewhere."""

