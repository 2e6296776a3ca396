"""Running sync user code in a thread pool, with one loop wake-up per burst.

``loop.run_in_executor`` wakes the event loop once per finished call (a write to
its self-pipe each time). When a coalesced message fans out into many sync calls,
those wake-ups cost more than a cheap handler itself. Here finished calls queue
their results and only the first of a burst wakes the loop, which then hands out
everything that has finished by then.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import Executor
from typing import Any, Callable


class ThreadHop:
    """Submit callables to a pool; await their results on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._finished: deque[tuple[asyncio.Future, bool, Any]] = deque()
        self._lock = threading.Lock()
        self._wakeup_pending = False

    def run(self, pool: Executor, fn: Callable[[], Any]) -> asyncio.Future:
        future = self._loop.create_future()
        pool.submit(self._call, future, fn)
        return future

    def _call(self, future: asyncio.Future, fn: Callable[[], Any]) -> None:
        if future.cancelled():
            return  # its caller gave up while it queued for a thread: never start it
        try:
            self._finished.append((future, True, fn()))
        except StopIteration as exc:
            # A future cannot hold StopIteration (it would end the awaiting coroutine's
            # frame), so asyncio refuses it; wrap it as coroutines themselves do.
            self._finished.append((future, False, RuntimeError(f"handler raised {exc!r}")))
        except BaseException as exc:  # handed to the awaiting coroutine, not lost
            self._finished.append((future, False, exc))
        with self._lock:
            if self._wakeup_pending:
                return  # the pending hand-out will see our result: it was queued first
            self._wakeup_pending = True
        self._loop.call_soon_threadsafe(self._hand_out)

    def _hand_out(self) -> None:
        with self._lock:
            self._wakeup_pending = False
        finished = self._finished
        while finished:
            future, ok, value = finished.popleft()
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
