"""Worker-side handlers that routers call directly (the request fast path).

Installed into ``worker.handlers`` the first time a replica is constructed on a
worker. Each call names a replica by its Dask actor key; the handler looks the
live object up in the worker's actor table. A reply carries whatever finished
first; results still running are fetched with ``collect`` and the ticket the reply
names, so one slow request never delays the others of its message. A replica that
is gone or draining
answers ``retry`` instead of executing, which is how scale-down and replica
replacement lose no request: the router sends those requests elsewhere.

Messages are msgpack-native. Handle calls (Python arguments from trusted Python
callers) travel as one cloudpickled blob per message, never per element.
"""
from __future__ import annotations

from typing import Any

import cloudpickle

CALL = "daskserve_call"
COLLECT = "daskserve_collect"
UPDATE = "daskserve_update"
DRAIN = "daskserve_drain"


def install(worker: Any) -> None:
    """Register the handlers once per worker (idempotent)."""
    if CALL in worker.handlers:
        return
    actors = worker.state.actors

    async def call(key: str, http: list | None = None, calls: bytes | None = None) -> dict:
        replica = actors.get(key)
        if replica is None or replica.draining:
            return {"retry": True}
        return _reply(await replica.handle(http or [],
                                           cloudpickle.loads(calls) if calls else []))

    async def collect(key: str, ticket: int) -> dict:
        replica = actors.get(key)
        outcome = await replica.collect(ticket) if replica is not None else None
        return {"lost": True} if outcome is None else _reply(outcome)

    async def update(key: str, config: dict, reconfigure: bool) -> bool:
        replica = actors.get(key)
        if replica is None:
            return False
        await replica.update_config(config, reconfigure)
        return True

    async def drain(key: str) -> bool:
        replica = actors.get(key)
        if replica is not None:
            await replica.drain()
        return True

    worker.handlers.update({UPDATE: update, DRAIN: drain, COLLECT: collect, CALL: call})


def _reply(outcome: tuple) -> dict:
    http, calls, ticket = outcome
    reply: dict[str, Any] = {"http": http}
    if calls:
        reply["calls"] = _dump_results(calls)
    if ticket is not None:
        reply["ticket"] = ticket
    return reply


def _dump_results(results: list[tuple[int, bool, Any]]) -> bytes:
    try:
        return cloudpickle.dumps(results)
    except Exception:
        # Only the values that cannot be pickled become errors; the rest arrive intact.
        safe = []
        for index, ok, value in results:
            try:
                cloudpickle.dumps(value)
                safe.append((index, ok, value))
            except Exception as exc:
                safe.append((index, False, TypeError(
                    f"result of type {type(value).__name__} cannot be pickled: {exc}")))
        return cloudpickle.dumps(safe)
