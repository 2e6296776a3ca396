"""The replica executor: runs one copy of a backend's user code.

It owns everything between a coalesced message and the user's object: resolving
methods, batching, the thread hop for sync code, tickets for results still running,
and draining. It knows nothing about where it lives; a host
(``daskserve.replica_host``) builds it inside some process and registers it with
that process's worker plugin, which hands it messages.

Async user code runs on the host's event loop; sync user code runs in a thread pool
the executor owns, so a slow model never blocks the loop that serves other replicas
and Dask's own heartbeats, or in the thread of the lane that read its request
(``serve_here``, see ``daskserve.lane``). Both share ``sync_threads`` slots. What the
loop and those threads both touch (the counts of work in flight and running, the
draining flag) changes under one lock.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib
import inspect
import logging
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import cloudpickle
import dask
from dask.utils import parse_timedelta

from . import context, metrics
from .batching import BatchQueue, accepts_batch
from .config import BackendConfig
from .errors import ReplicaUnavailableError, ServeError
from .http_codec import build_request, encode_result, error_response, exception_response
from .protocol import HealthReply, WireRequest, WireResponse
from .tasks import spawn
from .thread_hop import ThreadHop

logger = logging.getLogger(__name__)

STRAGGLER_GRACE_S = 0.002
# How long results may wait for a router to collect them (Dask config
# ``daskserve.uncollected-result-ttl``): a live router collects at once, so a longer
# wait means it is gone.
UNCOLLECTED_RESULT_TTL_S = 30.0
_NONE: frozenset[int] = frozenset()
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


def uncollected_result_ttl() -> float:
    value = dask.config.get("daskserve.uncollected-result-ttl", UNCOLLECTED_RESULT_TTL_S)
    return parse_timedelta(value, default="seconds")


class Draining(Exception):
    """The replica takes no new work: its router should send it elsewhere."""


class _Ticket:
    """A message's requests whose results its router has not collected yet."""

    __slots__ = ("tasks", "n_http", "collecting", "idle_since", "wake")

    def __init__(self, tasks: dict[int, asyncio.Future], n_http: int):
        self.tasks = tasks            # index in the message -> running request
        self.n_http = n_http
        self.collecting = False       # a CALL or COLLECT is waiting on it now
        self.idle_since = 0.0         # when the last one returned
        self.wake: asyncio.Future | None = None

    def wake_collector(self) -> None:
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)


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
        self._lock = threading.Lock()
        self._pool, self._slots = self._new_pool()
        self._hop = ThreadHop(self._loop)
        self._methods: dict[str, _Method] = {}
        self.in_flight = 0  # requests whose results some router still waits for
        self.draining = False
        self._tickets: dict[int, _Ticket] = {}
        self._inline: dict[int, asyncio.Task] = {}  # ticket -> task running it inline
        self._inline_cancelled: set[int] = set()
        # Tickets running in a lane's thread (``serve_here``): True once abandoned.
        self._here: dict[int, bool] = {}
        # Cancels that came before their message (or after its end), and when.
        self._early_cancels: dict[int, tuple[list[int], list[int], float]] = {}
        self._result_ttl = uncollected_result_ttl()
        self._sweeper: asyncio.Future | None = None
        self._idle: asyncio.Event | None = None
        # What the health probe reports: calls in the handlers, since when some have
        # run without a break, and when the last one ended (monotonic seconds).
        self._running = 0
        self._busy_since = 0.0
        self._last_end = 0.0
        self._check: asyncio.Future | None = None  # the probe's check, while it runs
        self._aborted: str | None = None  # why ``abort`` failed the work in flight
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

    def _new_pool(self) -> tuple[ThreadPoolExecutor, threading.BoundedSemaphore]:
        """The handler threads and the slots they share with the lane's threads.
        Threads start lazily, so the limit costs nothing until requests need it."""
        threads = self._sync_threads()
        return (ThreadPoolExecutor(max_workers=threads,
                                   thread_name_prefix=f"daskserve-{self.context.replica_tag}"),
                threading.BoundedSemaphore(threads))

    def _sync_threads(self) -> int:
        """``BackendConfig.sync_threads``, or one more than the replica's CPUs.

        The replica's CPU share reaches this process as ``OMP_NUM_THREADS`` (set from
        ``num_cpus`` before the constructor ran, see ``ReplicaOptions.environment``).
        """
        chosen = self._config.sync_threads
        if chosen is None:
            cpus = _positive_int(os.environ.get("OMP_NUM_THREADS")) or 1
            chosen = max(2, cpus + 1)
        return min(chosen, self._config.max_concurrent_queries)

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
        call = functools.partial(_in_slot, self._slots, contextvars.copy_context().run,
                                 method.fn, *args, **kwargs)
        return await self._hop.run(self._pool, call)

    def _begin(self) -> None:
        with self._lock:
            if not self._running:
                self._busy_since = time.monotonic()
            self._running += 1

    def _end(self) -> None:
        with self._lock:
            self._running -= 1
            self._last_end = time.monotonic()

    async def _run(self, name: str, args: tuple, kwargs: dict) -> Any:
        self._begin()
        try:
            method = self._method(name)
            if method.batch is None:
                return await self._invoke(method, *args, **kwargs)
            if kwargs or len(args) != 1:
                raise TypeError(
                    f"backend {self.context.backend_tag!r} batches its inputs: each call "
                    f"must pass exactly one positional argument (got {len(args)} and "
                    f"{len(kwargs)} keyword arguments)"
                )
            return await method.batch.submit(args[0])
        finally:
            self._end()

    def _run_here(self, name: str, args: tuple, kwargs: dict) -> Any:
        """``_run`` for a sync, unbatched method, in the calling thread (which holds
        one of the ``sync_threads`` slots)."""
        self._begin()
        try:
            return self._methods[name].fn(*args, **kwargs)
        finally:
            self._end()

    # -- requests ---------------------------------------------------------------
    async def _serve_http(self, wire: WireRequest) -> WireResponse:
        try:
            return encode_result(await self._run("__call__", (build_request(wire),), {}))
        except Exception as exc:
            return self._http_failure(exc)

    async def _serve_call(self, name: str, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        try:
            return True, await self._run(name, args, kwargs)
        except Exception as exc:
            return self._call_failure(exc)

    def _http_failure(self, exc: Exception) -> WireResponse:
        logger.info("backend %s raised on HTTP request", self.context.backend_tag,
                    exc_info=True)
        return exception_response(exc, self.context.backend_tag, self.context.replica_tag)

    def _call_failure(self, exc: Exception) -> tuple[bool, Any]:
        if hasattr(exc, "add_note"):
            exc.add_note(f"raised in backend {self.context.backend_tag!r}, replica "
                         f"{self.context.replica_tag!r}:\n{traceback.format_exc()}")
        return False, exc

    def runs_here(self, http: list[WireRequest], calls: list[tuple]) -> bool:
        """Whether ``serve_here`` would run this message: one request, to a method
        already seen to be sync and unbatched."""
        if len(http) + len(calls) != 1:
            return False
        method = self._methods.get("__call__" if http else calls[0][0])
        return method is not None and not method.is_async and method.batch is None

    def serve_here(self, ticket: int, http: list[WireRequest],
                   calls: list[tuple]) -> Outcome | None:
        """Run a message of one request in the calling thread (a lane's), not the
        loop's; None if it is not such a message (``runs_here``). Raises
        ``Draining`` when the replica takes no new work.

        Like a call queued for the pool, one whose router gives up (``cancel``) stops
        counting as in flight at once, and never starts if it still waits for a slot.
        """
        if not self.runs_here(http, calls):
            return None
        with self._lock:
            if self.draining:
                raise Draining
            self.in_flight += 1
            self._here[ticket] = False
        token = context.enter(self.context)
        try:
            with self._slots:
                if self._here[ticket]:
                    result = self._cancelled(bool(http))
                elif http:
                    try:
                        result = encode_result(self._run_here(
                            "__call__", (build_request(http[0]),), {}))
                    except Exception as exc:
                        result = self._http_failure(exc)
                else:
                    name, args, kwargs = calls[0]
                    try:
                        result = True, self._run_here(name, args, kwargs)
                    except Exception as exc:
                        result = self._call_failure(exc)
        finally:
            context.leave(token)
            with self._lock:
                abandoned = self._here.pop(ticket)
            if not abandoned:
                self._settle(1)
        return self._split({0: result}, len(http), None)

    async def handle(self, ticket: int, http: list[WireRequest], calls: list[tuple]) -> Outcome:
        """Start one coalesced message (HTTP requests and handle calls together) and
        return its first results; the rest stay under ``ticket`` for ``collect``."""
        n_http = len(http)
        total = n_http + len(calls)
        skip: frozenset[int] | set[int] = _NONE
        if self._early_cancels and ticket in self._early_cancels:
            # Its router gave up on some of these before they arrived: never start them.
            early_http, early_calls, _ = self._early_cancels.pop(ticket)
            skip = {*early_http, *(n_http + i for i in early_calls)}
        token = context.enter(self.context)  # tasks created below inherit it
        try:
            if total == 1 and not skip:  # the usual case at low load: no task, no wait
                work = self._serve_http(http[0]) if n_http else self._serve_call(*calls[0])
                # The work runs in the handler's own task; a CANCEL for this ticket
                # cancels that task, and the cancellation ends here.
                task = asyncio.current_task()
                self._admit(1)
                self._inline[ticket] = task
                try:
                    return self._split({0: await work}, n_http, None)
                except asyncio.CancelledError:
                    if ticket not in self._inline_cancelled:
                        raise  # not ours: the worker itself is stopping this task
                    uncancel = getattr(task, "uncancel", None)
                    if uncancel is not None:  # Python 3.11+ counts cancel requests
                        uncancel()
                    if self._aborted is not None:
                        return self._split({0: self._cancelled(n_http == 1)}, n_http, None)
                    return [], [], None
                finally:
                    del self._inline[ticket]
                    if self._inline_cancelled:
                        self._inline_cancelled.discard(ticket)
                    self._settle(1)
            tasks = {i: asyncio.ensure_future(self._serve_http(http[i]) if i < n_http
                                              else self._serve_call(*calls[i - n_http]))
                     for i in range(total) if i not in skip}
        finally:
            context.leave(token)
        self._admit(len(tasks))
        entry = self._tickets[ticket] = _Ticket(tasks, n_http)
        return await self._first_results(ticket, entry)

    async def collect(self, ticket: int) -> Outcome | None:
        """More results of a message; None if the ticket is unknown (or expired)."""
        entry = self._tickets.get(ticket)
        if entry is None or entry.collecting:
            return None
        return await self._first_results(ticket, entry)

    def cancel(self, ticket: int, http: list[int], calls: list[int]) -> None:
        """Cancel work whose router stopped waiting for it, and never report it.

        Async handlers get ``CancelledError``; sync handlers cannot be interrupted and
        run on in their thread, but stop counting as in flight (the pool stays bounded
        at ``max_concurrent_queries`` threads; work that queued behind them and was
        cancelled before it started never runs).
        """
        task = self._inline.get(ticket)
        if task is not None:
            self._inline_cancelled.add(ticket)
            task.cancel()
            return
        with self._lock:
            here = self._here.get(ticket) is False
            if here:
                self._here[ticket] = True
        if here:  # running in a lane's thread, or waiting there for a slot
            self._settle(1)
            return
        entry = self._tickets.get(ticket)
        if entry is None:  # overtook its message, or came after its last result
            self._early_cancels[ticket] = (list(http), list(calls), time.monotonic())
            self._sweep_soon()
            return
        dropped = 0
        for i in (*http, *(entry.n_http + i for i in calls)):
            task = entry.tasks.pop(i, None)
            if task is not None:
                task.cancel()
                dropped += 1
        self._settle(dropped)
        if entry.collecting:
            entry.wake_collector()
        elif not entry.tasks:
            del self._tickets[ticket]

    async def _first_results(self, ticket: int, entry: "_Ticket") -> Outcome:
        # Reply as soon as anything is done (plus a short grace for siblings), so a
        # slow request never holds back fast ones that travelled with it; whatever is
        # still running stays here under the ticket the router collects next.
        entry.collecting = True
        done: list[int] = []
        try:
            while entry.tasks and not done:
                entry.wake = self._loop.create_future()
                await asyncio.wait([*entry.tasks.values(), entry.wake],
                                   return_when=asyncio.FIRST_COMPLETED)
                running = [t for t in entry.tasks.values() if not t.done()]
                if running and len(running) < len(entry.tasks):
                    await asyncio.wait(running, timeout=STRAGGLER_GRACE_S)
                done = [i for i, task in entry.tasks.items() if task.done()]
        finally:
            entry.collecting = False
            entry.wake = None
            entry.idle_since = time.monotonic()
        results = {}
        for i in done:
            task = entry.tasks.pop(i)
            results[i] = self._cancelled(i < entry.n_http) if task.cancelled() \
                else task.result()
        self._settle(len(results))
        if entry.tasks:
            self._sweep_soon()
            return self._split(results, entry.n_http, ticket)
        del self._tickets[ticket]
        return self._split(results, entry.n_http, None)

    def cancelled_outcome(self, is_http: bool) -> Outcome:
        """What a message of one request gets when it is cancelled (``_cancelled``)."""
        return self._split({0: self._cancelled(is_http)}, int(is_http), None)

    def _cancelled(self, is_http: bool) -> Any:
        """The outcome of work cancelled by something other than its router: an
        ``abort`` (503, as for a replica that died), or anything else (500)."""
        backend, replica = self.context.backend_tag, self.context.replica_tag
        if self._aborted is None:
            status, exc = 500, ServeError(f"the request was cancelled in replica {replica!r}")
        else:
            status, exc = 503, ReplicaUnavailableError(backend, replica, self._aborted)
        if not is_http:
            return False, exc
        return error_response(status, type(exc).__name__, str(exc), backend=backend,
                              replica=replica)

    @staticmethod
    def _split(done: dict[int, Any], n_http: int, ticket: int | None) -> Outcome:
        http = [[i, result] for i, result in done.items() if i < n_http]
        calls = [(i - n_http, *result) for i, result in done.items() if i >= n_http]
        return http, calls, ticket

    def _admit(self, count: int) -> None:
        with self._lock:
            self.in_flight += count

    def _settle(self, count: int) -> None:
        with self._lock:
            self.in_flight -= count
            idle = self.in_flight == 0 and self._idle is not None
        if idle:  # a drain waits for it, on the loop (this may be a lane's thread)
            self._loop.call_soon_threadsafe(self._idle.set)

    # -- results nobody collects -----------------------------------------------------
    def _sweep_soon(self) -> None:
        if self._sweeper is None:
            self._sweeper = spawn(self._sweep())

    async def _sweep(self) -> None:
        """Expire tickets no router collects: a live router always has a COLLECT
        waiting on each of its tickets, so one left alone for the whole TTL belongs to
        a router that is gone (its process died), and nobody will take its results."""
        ttl = self._result_ttl
        try:
            while self._tickets or self._early_cancels:
                await asyncio.sleep(min(max(ttl / 4, 0.05), 5.0))
                now = time.monotonic()
                for ticket, entry in list(self._tickets.items()):
                    if not entry.collecting and now - entry.idle_since > ttl:
                        self._expire(ticket, entry)
                for ticket, (_, _, since) in list(self._early_cancels.items()):
                    if now - since > ttl:
                        del self._early_cancels[ticket]
        finally:
            self._sweeper = None

    def _expire(self, ticket: int, entry: "_Ticket") -> None:
        finished = sum(task.done() for task in entry.tasks.values())
        logger.warning("replica %s drops ticket %d: nobody collected it for %.0f s (its "
                       "caller is gone?); %d result(s) discarded, %d request(s) cancelled",
                       self.context.replica_tag, ticket, self._result_ttl, finished,
                       len(entry.tasks) - finished)
        for task in entry.tasks.values():
            task.cancel()
        self._settle(len(entry.tasks))
        del self._tickets[ticket]

    # -- lifecycle --------------------------------------------------------------
    async def _call_hook(self, hook: Callable, *args: Any) -> None:
        """Run one of the backend's own hooks as requests run: a ``def`` one on the
        replica's threads, an ``async def`` one on the loop."""
        token = context.enter(self.context)
        try:
            await self._invoke(_Method(hook, inspect.iscoroutinefunction(hook), None),
                               *args)
        finally:
            context.leave(token)

    async def _reconfigure(self, user_config: Any) -> None:
        hook = getattr(self._user, "reconfigure", None) if self._is_class else None
        if hook is None:
            raise ValueError(
                f"backend {self.context.backend_tag!r} got a user_config but defines no "
                f"reconfigure(user_config) method"
            )
        await self._call_hook(hook, user_config)

    async def update_config(self, config: dict[str, Any], reconfigure: bool) -> None:
        """Apply a new BackendConfig; ``reconfigure`` says user_config changed."""
        new = BackendConfig.from_wire(config)
        old, self._config = self._config, new
        if (new.max_batch_size, new.batch_wait_timeout) != (old.max_batch_size,
                                                            old.batch_wait_timeout):
            self._methods.clear()
        if (new.max_concurrent_queries, new.sync_threads) != (old.max_concurrent_queries,
                                                              old.sync_threads):
            old_pool = self._pool
            self._pool, self._slots = self._new_pool()
            old_pool.shutdown(wait=False)  # calls already running there finish
        if reconfigure:
            await self._reconfigure(new.user_config)

    # -- health -------------------------------------------------------------------
    async def health(self, timeout: float) -> HealthReply:
        """Answer the controller's probe within about ``timeout`` seconds.

        Runs the backend's ``check_health()`` if it has one: an ``async def`` one on
        the loop, a ``def`` one on a thread of its own, not the handlers' pool, where
        it would queue behind requests and a busy replica would look hung. Stuck
        handler threads show instead as calls running with none of them ending
        (``stalled_s``). One check runs at a time; a probe arriving while one hangs
        waits on that one.
        """
        hook = getattr(self._user, "check_health", None) if self._is_class else None
        reply: HealthReply = {}
        if hook is not None:
            if self._check is None or self._check.done():
                self._check = spawn(self._checked(hook))
            try:
                error = await asyncio.wait_for(asyncio.shield(self._check), timeout)
            except asyncio.TimeoutError:
                reply["hung"] = f"check_health() did not return within {timeout:g} s"
            else:
                if error is not None:
                    reply["error"] = error
        now = time.monotonic()
        reply["running"] = self._running
        reply["stalled_s"] = now - max(self._busy_since, self._last_end) \
            if self._running else 0.0
        return reply

    async def _checked(self, hook: Callable) -> str | None:
        """Why ``hook`` failed, or None if it returned."""
        token = context.enter(self.context)
        try:
            if inspect.iscoroutinefunction(hook):
                await hook()
            else:
                await self._loop.run_in_executor(
                    None, functools.partial(contextvars.copy_context().run, hook))
        except Exception as exc:
            return f"check_health() raised {type(exc).__name__}: {exc}"
        finally:
            context.leave(token)
        return None

    def abort(self, reason: str) -> None:
        """Fail all in-flight work with ``ReplicaUnavailableError`` and take no more:
        the controller found this replica wedged and is replacing it.

        Async handlers are cancelled. Sync ones stuck in their threads stay there
        (Python cannot stop a thread), but their callers get the error now, and work
        queued behind them never starts.
        """
        self._aborted = reason
        with self._lock:
            self.draining = True
        for ticket, task in self._inline.items():
            self._inline_cancelled.add(ticket)
            task.cancel()
        for ticket, entry in list(self._tickets.items()):
            for task in entry.tasks.values():
                task.cancel()
            if not entry.collecting:  # a later COLLECT finds the replica gone
                self._settle(len(entry.tasks))
                del self._tickets[ticket]
        if self._check is not None:
            self._check.cancel()
        self._pool.shutdown(wait=False)

    async def drain(self) -> None:
        """Stop taking requests and return once every in-flight one has finished.

        Only work some router still waits for counts: work its router abandoned was
        cancelled, and results nobody collects expire, so neither holds a drain up.
        """
        with self._lock:
            self.draining = True
            if self.in_flight:
                self._idle = asyncio.Event()
        if self._idle is not None:
            await self._idle.wait()
        self._pool.shutdown(wait=False)


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(text) if text else None
    except ValueError:
        return None
    return value if value and value > 0 else None


def _in_slot(slots: threading.BoundedSemaphore, fn: Callable, *args: Any,
             **kwargs: Any) -> Any:
    with slots:
        return fn(*args, **kwargs)
