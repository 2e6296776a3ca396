"""Worker-side handlers that routers call directly (the request fast path).

Installed into ``worker.handlers`` the first time a replica is constructed on a
worker. Each call names a replica by its Dask actor key; the handler looks the
live object up in the worker's actor table. A replica that is gone or draining
answers ``retry`` instead of executing, which is how scale-down and replica
replacement lose no request: the router sends those requests elsewhere.

Messages are msgpack-native. Handle calls (Python arguments from trusted Python
callers) travel as one cloudpickled blob per message, never per element.
"""
from __future__ import annotations

from typing import Any

import cloudpickle

CALL = "daskserve_call"
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
        http_out, call_out = await replica.handle(http or [],
                                                  cloudpickle.loads(calls) if calls else [])
        reply: dict[str, Any] = {"http": http_out}
        if call_out:
            reply["calls"] = _dump_results(call_out)
        return reply

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

    worker.handlers.update({UPDATE: update, DRAIN: drain, CALL: call})


def _dump_results(results: list[tuple[bool, Any]]) -> bytes:
    try:
        return cloudpickle.dumps(results)
    except Exception:
        # Only the values that cannot be pickled become errors; the rest arrive intact.
        safe = []
        for ok, value in results:
            try:
                cloudpickle.dumps(value)
                safe.append((ok, value))
            except Exception as exc:
                safe.append((False, TypeError(
                    f"result of type {type(value).__name__} cannot be pickled: {exc}")))
        return cloudpickle.dumps(safe)
