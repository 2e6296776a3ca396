"""The event loop daskserve runs on where it chooses, and a warning where it cannot.

uvloop halves what the event loop itself costs per message. At low load, where every
request crosses two loops (the proxy's and the replica's) on its own, that is a large
share of the latency daskserve adds (``benchmarks/RESULTS.md``). Dask picks the loop
of each of its processes from ``distributed.admin.event-loop`` when the process
starts. So importing daskserve makes uvloop that setting's default (a value set in
Dask's config files or environment still wins): a cluster created afterwards in the
same process, the usual ``serve.start(Client(LocalCluster()))``, runs on uvloop
without any setting. Processes started without daskserve (``dask worker`` on its own)
keep Dask's default, and daskserve says there, once per process and role, how to get
the faster one.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import dask

logger = logging.getLogger(__name__)

CONFIG_KEY = "distributed.admin.event-loop"
_warned: set[str] = set()


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def preferred() -> str:
    """The value of ``distributed.admin.event-loop`` daskserve starts clusters with."""
    return "uvloop" if uvloop_available() else "asyncio"


def prefer_uvloop() -> None:
    """Make uvloop the default of ``distributed.admin.event-loop``, if installed.

    A default, not a setting: Dask keeps a value its config files or environment set.
    """
    if uvloop_available():
        dask.config.update_defaults({"distributed": {"admin": {"event-loop": "uvloop"}}})


def local_cluster(**kwargs: Any) -> Any:
    """A ``LocalCluster`` whose scheduler and workers run the preferred loop (the
    config reaches Nanny-spawned workers, which copy it when they are created)."""
    from distributed import LocalCluster

    with dask.config.set({CONFIG_KEY: preferred()}):
        return LocalCluster(**kwargs)


def warn_if_slow(role: str) -> None:
    """Log once per process and ``role`` when the running loop is asyncio's default
    though uvloop is installed."""
    loop = type(asyncio.get_running_loop())
    if role in _warned or loop.__module__.startswith("uvloop") or not uvloop_available():
        return
    _warned.add(role)
    logger.warning(
        "the daskserve %s runs on asyncio's default event loop; uvloop is installed and "
        "cuts the latency each request sees at low load. Start the Dask cluster with "
        "%s set to uvloop (DASK_DISTRIBUTED__ADMIN__EVENT_LOOP=uvloop), or let daskserve "
        "start it: serve.start() without a client, or the daskserve command.",
        role, CONFIG_KEY)
