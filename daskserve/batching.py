"""User-visible batching: ``@accept_batch`` and the per-replica batch queue.

Transport coalescing (a few messages per replica per loop tick) happens in the
router and is always on. This module is the separate, opt-in layer on top: requests that
arrive at a replica are grouped into lists of up to ``max_batch_size`` and the
user's handler is called once per list.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

from . import metrics
from .tasks import spawn

BATCH_ATTRIBUTE = "_daskserve_accept_batch"


def accept_batch(func: Callable) -> Callable:
    """Mark a handler as taking a list of requests and returning a list of results."""
    setattr(func, BATCH_ATTRIBUTE, True)
    return func


def accepts_batch(func: Callable) -> bool:
    return bool(getattr(func, BATCH_ATTRIBUTE, False))


class BatchLengthError(ValueError):
    """A batch handler returned a different number of results than it got inputs."""


class BatchQueue:
    """Groups single inputs into lists for one batch handler.

    A batch is sent as soon as it is full, or after ``wait_s`` once its first item
    arrived. With ``wait_s == 0`` everything that arrived in the same event-loop
    tick (usually one coalesced message from a router) forms one batch.
    """

    def __init__(self, run_batch: Callable[[list], Awaitable[list]], max_size: int,
                 wait_s: float):
        self._run_batch = run_batch
        self._max_size = max_size
        self._wait_s = wait_s
        self._items: list[tuple[Any, asyncio.Future, float]] = []  # (item, future, since)
        self._timer: asyncio.Handle | None = None

    def submit(self, item: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._items.append((item, future, time.perf_counter()))
        if len(self._items) >= self._max_size:
            self._flush()
        elif self._timer is None:
            if self._wait_s > 0:
                self._timer = loop.call_later(self._wait_s, self._flush)
            else:
                self._timer = loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._items:
            batch, self._items = self._items[: self._max_size], self._items[self._max_size:]
            spawn(self._execute(batch))

    async def _execute(self, batch: list[tuple[Any, asyncio.Future, float]]) -> None:
        try:
            results = await metrics.run_batch(self._run_batch, [item for item, *_ in batch],
                                              [since for *_, since in batch])
            if not isinstance(results, (list, tuple)) or len(results) != len(batch):
                got = len(results) if isinstance(results, (list, tuple)) else type(results).__name__
                raise BatchLengthError(
                    f"batch handler returned {got} results for a batch of {len(batch)} "
                    f"requests; it must return a list of the same length"
                )
        except BaseException as exc:  # every request of this batch fails, others don't
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future, _), result in zip(batch, results):
            if not future.done():
                future.set_result(result)
