"""Fire-and-forget tasks that cannot be lost.

The event loop holds only weak references to tasks; one nobody else references may
be garbage-collected before it finishes. Every background task of the request path
is started here, which keeps it referenced until it is done.
"""
from __future__ import annotations

import asyncio
from typing import Any, Coroutine

_running: set[asyncio.Future] = set()


def spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Future:
    task = asyncio.ensure_future(coro)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task
