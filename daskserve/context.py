"""Which replica the current code runs in.

A Dask worker process may host replicas of several backends, so the answer lives
in a context variable set around every call into user code, not in a global.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaContext:
    """Identity of the replica executing the current request or constructor."""

    backend_tag: str
    replica_tag: str
    scheduler_address: str


_current: contextvars.ContextVar[ReplicaContext | None] = contextvars.ContextVar(
    "daskserve_replica", default=None
)


def get_replica_context() -> ReplicaContext:
    """The running replica's identity; raises outside a replica."""
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("get_replica_context() called outside a daskserve replica")
    return ctx


def current_replica() -> ReplicaContext | None:
    return _current.get()


def enter(ctx: ReplicaContext) -> contextvars.Token:
    return _current.set(ctx)


def leave(token: contextvars.Token) -> None:
    _current.reset(token)
