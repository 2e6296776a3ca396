"""One router's connection to one replica, coalescing calls per event-loop tick.

Every query sent to a replica in the same tick is collected and leaves as a single
message; the reply carries the results that finished first, and a ticket to
collect the rest, so a slow query never delays its fast companions. This is the
transport-level coalescing DESIGN.md builds on ("never one Dask call per request")
and is independent of the user-visible batching a replica may do on top.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Callable

import cloudpickle
from distributed.comm.core import CommClosedError
from distributed.core import ConnectionPool, send_recv

from .errors import ReplicaUnavailableError
from .fast_path import CALL, COLLECT
from .http_codec import error_response

if TYPE_CHECKING:
    from .router import Query

logger = logging.getLogger(__name__)


class ReplicaLink:
    """Queue of queries bound for one replica, flushed once per loop tick."""

    __slots__ = ("backend", "tag", "address", "key", "in_flight", "_pool", "_pending",
                 "_flush_scheduled", "_on_done")

    def __init__(self, backend: str, tag: str, address: str, key: str,
                 pool: ConnectionPool, on_done: Callable[["ReplicaLink", list, bool], None]):
        self.backend = backend
        self.tag = tag
        self.address = address
        self.key = key
        self.in_flight = 0
        self._pool = pool
        self._pending: list[Query] = []
        self._flush_scheduled = False
        self._on_done = on_done

    def send(self, query: "Query") -> None:
        self.in_flight += 1
        self._pending.append(query)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._flush_scheduled = False
        asyncio.ensure_future(self._exchange(batch))

    async def _exchange(self, batch: list["Query"]) -> None:
        http = [q for q in batch if q.wire is not None]
        calls = [q for q in batch if q.wire is None]
        message: dict[str, Any] = {"key": self.key}
        if http:
            message["http"] = [q.wire for q in http]
        if calls:
            message["calls"] = cloudpickle.dumps([(q.method, q.args, q.kwargs) for q in calls])
        try:
            comm = await self._pool.connect(self.address)
        except OSError:
            # Nothing was sent, so nothing started: other replicas may take these.
            self._on_done(self, batch, True)
            return
        try:
            reply = await send_recv(comm, op=CALL, **message)
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

    async def _deliver(self, reply: dict, http: dict[int, "Query"],
                       calls: dict[int, "Query"]) -> None:
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
                reply = await getattr(self._pool(self.address), COLLECT)(
                    key=self.key, ticket=reply["ticket"])
            except Exception as exc:
                reply = {"lost": True, "error": exc}
            if reply.get("lost"):
                reason = reply.get("error") or "the replica went away while running them"
                self._fail([*http.values(), *calls.values()],
                           ReplicaUnavailableError(self.backend, self.tag, str(reason)))
                return

    def _fail(self, batch: list["Query"], exc: BaseException) -> None:
        logger.warning("call to replica %s of backend %s failed: %r", self.tag,
                       self.backend, exc)
        for query in batch:
            if query.wire is not None:
                query.resolve(error_response(503, type(exc).__name__, str(exc),
                                             backend=self.backend, replica=self.tag))
            else:
                query.fail(exc)
        self._on_done(self, batch, False)
