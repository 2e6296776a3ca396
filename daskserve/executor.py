"""The replica executor: runs one copy of a backend's user code.

It owns everything between a coalesced message and the user's object: resolving
methods, batching, the thread hop for sync code, tickets for results still running,
and draining. It knows nothing about where it lives; a host
(``daskserve.replica_host``) builds it inside some process and registers it with
that process's worker plugin, which hands it messages.

Async user code runs on the host's event loop; sync user code runs in a thread pool
the executor owns, so a slow model never blocks the loop that serves other replicas
and Dask's own heartbeats.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib
import inspect
import itertools
import logging
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import cloudpickle

from . import context, metrics
from .batching import BatchQueue, accepts_batch
from .config import BackendConfig
from .http_codec import build_request, encode_result, exception_response
from .protocol import WireRequest, WireResponse
from .thread_hop import ThreadHop

logger = logging.getLogger(__name__)

STRAGGLER_GRACE_S = 0.002
# What a replica returns for a message: HTTP results as [index, response] pairs,
# handle-call results as (index, ok, value), and a ticket if some are still running.
Outcome = tuple[list, list, "int | None"]


def import_attr(path: str) -> Any:
    """Import ``"package.module.Name"`` on the worker (the caller may lack it)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"import path {path!r} must look like 'package.module.Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import backend {path!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from None


@dataclass
class _Method:
    fn: Callable
    is_async: bool
    batch: BatchQueue | None


class ReplicaExecutor:
    """Wraps the user's function or class instance and executes requests for it.

    Built by a host, in any thread: the user's constructor may block. ``start`` must
    then run on ``loop`` before the first request, since ``reconfigure`` may be async.
    """

    def __init__(self, replica: context.ReplicaContext, spec: bytes,
                 config: dict[str, Any], loop: asyncio.AbstractEventLoop):
        self.context = replica
        backend_tag = replica.backend_tag
        self._loop = loop
        target, init_args = cloudpickle.loads(spec)
        if isinstance(target, str):
            target = import_attr(target)
        self._is_class = inspect.isclass(target)
        if not self._is_class and not callable(target):
            raise TypeError(f"backend {backend_tag!r} must be a function or a class, "
                            f"got {type(target).__name__}")
        token = context.enter(self.context)
        try:
            self._user = target(*init_args) if self._is_class else target
        finally:
            context.leave(token)
        self._config = BackendConfig.from_wire(config)
        self._pool = self._new_pool()
        self._hop = ThreadHop(self._loop)
        self._methods: dict[str, _Method] = {}
        self.in_flight = 0  # requests whose results no router has received yet
        self.draining = False
        self._tickets: dict[int, tuple[dict[int, asyncio.Future], int]] = {}
        self._ticket_ids = itertools.count()
        self._idle: asyncio.Event | None = None
        metrics.instrument_replica(self)  # observability; before any method is resolved
        if self._config.max_batch_size is not None and not self._method("__call__").batch:
            raise ValueError(
                f"backend {backend_tag!r} sets max_batch_size but its handler is not "
                f"decorated with @serve.accept_batch"
            )

    async def start(self) -> None:
        """Hand the initial ``user_config`` to ``reconfigure``, if there is one."""
        if self._config.user_config is not None:
            await self._reconfigure(self._config.user_config)

    def _new_pool(self) -> ThreadPoolExecutor:
        # Threads start lazily, so the limit costs nothing until requests need it.
        return ThreadPoolExecutor(max_workers=self._config.max_concurrent_queries,
                                  thread_name_prefix=f"daskserve-{self.context.replica_tag}")

    # -- resolving user callables ------------------------------------------------
    def _method(self, name: str) -> _Method:
        method = self._methods.get(name)
        if method is not None:
            return method
        tag = self.context.backend_tag
        if self._is_class:
            if name.startswith("_") and name != "__call__":
                raise AttributeError(f"backend {tag!r} does not expose private method {name!r}")
            fn = getattr(self._user, name, None)
            if fn is None or not callable(fn):
                raise AttributeError(f"backend {tag!r} has no method {name!r}")
        elif name == "__call__":
            fn = self._user
        else:
            raise AttributeError(f"backend {tag!r} is a function; it has no method {name!r}")
        is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None))
        method = _Method(fn, is_async, None)
        if accepts_batch(fn):
            size = self._config.max_batch_size or 1
            method.batch = BatchQueue(functools.partial(self._invoke, method),
                                      size, self._config.batch_wait_timeout)
        self._methods[name] = method
        return method

    async def _invoke(self, method: _Method, *args: Any, **kwargs: Any) -> Any:
        if method.is_async:
            return await method.fn(*args, **kwargs)
        call = functools.partial(contextvars.copy_context().run, method.fn, *args, **kwargs)
        return await self._hop.run(self._pool, call)

    async def _run(self, name: str, args: tuple, kwargs: dict) -> Any:
        method = self._method(name)
        if method.batch is None:
            return await self._invoke(method, *args, **kwargs)
        if kwargs or len(args) != 1:
            raise TypeError(
                f"backend {self.context.backend_tag!r} batches its inputs: each call must "
                f"pass exactly one positional argument (got {len(args)} and {len(kwargs)} "
                f"keyword arguments)"
            )
        return await method.batch.submit(args[0])

    # -- requests ---------------------------------------------------------------
    async def _serve_http(self, wire: WireRequest) -> WireResponse:
        try:
            return encode_result(await self._run("__call__", (build_request(wire),), {}))
        except Exception as exc:
            logger.info("backend %s raised on HTTP request", self.context.backend_tag,
                        exc_info=True)
            return exception_response(exc, self.context.backend_tag, self.context.replica_tag)

    async def _serve_call(self, name: str, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        try:
            return True, await self._run(name, args, kwargs)
        except Exception as exc:
            if hasattr(exc, "add_note"):
                exc.add_note(f"raised in backend {self.context.backend_tag!r}, replica "
                             f"{self.context.replica_tag!r}:\n{traceback.format_exc()}")
            return False, exc

    async def handle(self, http: list[WireRequest], calls: list[tuple]) -> Outcome:
        """Start one coalesced message (HTTP requests and handle calls together) and
        return its first results; see ``_first_results`` for the rest."""
        token = context.enter(self.context)  # tasks created below inherit it
        try:
            work = [self._serve_http(w) for w in http]
            work += [self._serve_call(name, args, kwargs) for name, args, kwargs in calls]
            self.in_flight += len(work)
            if len(work) == 1:  # the usual case at low load: no task, no wait
                try:
                    result = await work[0]
                finally:
                    self._settle(1)
                return self._split({0: result}, len(http), None)
            tasks = {i: asyncio.ensure_future(w) for i, w in enumerate(work)}
        finally:
            context.leave(token)
        return await self._first_results(tasks, len(http))

    async def collect(self, ticket: int) -> Outcome | None:
        """Results of a message's stragglers; None if the ticket is unknown."""
        entry = self._tickets.pop(ticket, None)
        if entry is None:
            return None
        return await self._first_results(*entry)

    async def _first_results(self, tasks: dict[int, asyncio.Future], n_http: int) -> Outcome:
        # Reply as soon as anything is done (plus a short grace for siblings), so a
        # slow request never holds back fast ones that travelled with it; whatever is
        # still running stays here under a ticket the router collects next.
        _, running = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
        if running:
            await asyncio.wait(running, timeout=STRAGGLER_GRACE_S)
        done = {i: task.result() for i, task in tasks.items() if task.done()}
        self._settle(len(done))
        ticket = None
        if len(done) < len(tasks):
            ticket = next(self._ticket_ids)
            self._tickets[ticket] = ({i: t for i, t in tasks.items() if i not in done}, n_http)
        return self._split(done, n_http, ticket)

    @staticmethod
    def _split(done: dict[int, Any], n_http: int, ticket: int | None) -> Outcome:
        http = [[i, result] for i, result in done.items() if i < n_http]
        calls = [(i - n_http, *result) for i, result in done.items() if i >= n_http]
        return http, calls, ticket

    def _settle(self, count: int) -> None:
        self.in_flight -= count
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    # -- lifecycle --------------------------------------------------------------
    async def _reconfigure(self, user_config: Any) -> None:
        hook = getattr(self._user, "reconfigure", None) if self._is_class else None
        if hook is None:
            raise ValueError(
                f"backend {self.context.backend_tag!r} got a user_config but defines no "
                f"reconfigure(user_config) method"
            )
        token = context.enter(self.context)
        try:
            await self._invoke(_Method(hook, inspect.iscoroutinefunction(hook), None),
                               user_config)
        finally:
            context.leave(token)

    async def update_config(self, config: dict[str, Any], reconfigure: bool) -> None:
        """Apply a new BackendConfig; ``reconfigure`` says user_config changed."""
        new = BackendConfig.from_wire(config)
        old, self._config = self._config, new
        if (new.max_batch_size, new.batch_wait_timeout) != (old.max_batch_size,
                                                            old.batch_wait_timeout):
            self._methods.clear()
        if new.max_concurrent_queries != old.max_concurrent_queries:
            old_pool, self._pool = self._pool, self._new_pool()
            old_pool.shutdown(wait=False)  # calls already running there finish
        if reconfigure:
            await self._reconfigure(new.user_config)

    async def drain(self) -> None:
        """Stop taking requests and return once every in-flight one has finished."""
        self.draining = True
        if self.in_flight:
            self._idle = asyncio.Event()
            await self._idle.wait()
        self._pool.shutdown(wait=False)
