"""Replica health: find replicas that are alive but no longer serve.

A replica can stop serving while its process lives on: every thread of a ``def``
handler stuck, an ``async def`` handler blocking its event loop, or a backend whose
own ``check_health()`` says it is broken. Dask still sees a live worker and routers
keep sending it work, so nothing recovers unless someone looks. The monitor looks:
every ``health_check_period_s`` it probes each running replica (``WorkerOp.HEALTH``),
which runs the backend's ``check_health`` (or, without one, a no-op on the replica's
handler threads) and reports the calls it is running.

A probe fails when ``check_health`` raises or does not return within
``health_check_timeout_s`` (a sync replica whose threads are all stuck never runs
it), when the replica has had calls running that long with none of them ending, or
when no answer comes at all (its event loop is blocked).

The deadline rule: a replica is replaced once it has been failing without a break
for ``health_check_timeout_s``, counted from when its trouble began. A hang or a
stall is that old by the time a probe sees it, so it is replaced at once; a
``check_health`` that raises must go on raising for the whole timeout, so one bad
moment replaces nothing. A passing probe starts the count afresh.

How it goes: a replica whose ``check_health`` raises still answers, so it drains
like any replica scaled down (what it is running finishes) while its replacement
starts. A hung or silent one would never finish draining: its work is failed.

Probes run concurrently, at most one per replica, each under a deadline; what goes
wrong with one is logged, never raised, so a wedged replica never holds up the
scheduler's event loop. Only running replicas are probed: starting ones serve
nothing yet, and draining ones are leaving anyway.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable

from daskserve.config import BackendConfig
from daskserve.protocol import HealthReply, WorkerOp
from daskserve.tasks import spawn

from .state import DesiredState, ObservedState, ReplicaState

logger = logging.getLogger(__name__)

REPLY_GRACE_S = 2.0   # past the probe's own timeout, for its answer to arrive
MIN_TICK_S = 0.05     # however short a period, the monitor wakes no more often
MAX_TICK_S = 1.0      # new replicas and config changes are seen within this


@dataclass
class _Watch:
    """One running replica under watch."""

    due: float = 0.0                          # loop time of its next probe
    probe: asyncio.Future | None = None       # the probe in flight, if any
    failing_since: float | None = None        # loop time its trouble began


class HealthMonitor:
    """Probes running replicas and hands the ones that stay unhealthy to ``replace``.

    ``replace(replica, reason, drain)`` must return at once (the controller spawns
    the replacement); the monitor forgets the replica and probes it no more.
    """

    def __init__(self, rpc: Callable[[str], Any], desired: DesiredState,
                 observed: ObservedState,
                 replace: Callable[[ReplicaState, str, bool], None]):
        self._rpc = rpc
        self._desired = desired
        self._observed = observed
        self._replace = replace
        self._watches: dict[str, _Watch] = {}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                periods = self._start_due(loop.time())
                await asyncio.sleep(max(MIN_TICK_S, min([MAX_TICK_S, *periods])))
        finally:
            for watch in self._watches.values():
                if watch.probe is not None:
                    watch.probe.cancel()
            self._watches.clear()

    def _start_due(self, now: float) -> list[float]:
        """Start the probes that are due; returns the backends' probe periods."""
        periods = []
        watched = set()
        for tag, spec in self._desired.backends.items():
            period, timeout = BackendConfig.health_check(spec.config)
            periods.append(period)
            for replica in self._observed.running(tag):
                watched.add(replica.tag)
                watch = self._watches.setdefault(replica.tag, _Watch())
                if watch.probe is None and now >= watch.due:
                    watch.due = now + period
                    watch.probe = spawn(self._probe(replica, watch, timeout))
        for tag in self._watches.keys() - watched:
            del self._watches[tag]  # gone or leaving: a probe in flight finds it so
        return periods

    async def _probe(self, replica: ReplicaState, watch: _Watch, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        try:
            reply = await asyncio.wait_for(
                getattr(self._rpc(replica.address), WorkerOp.HEALTH)(
                    replica=replica.tag, timeout=timeout),
                timeout + REPLY_GRACE_S)
            trouble = _trouble(reply, timeout, sent, loop.time())
        except asyncio.TimeoutError:
            trouble = _Trouble(f"no answer to the health probe within "
                               f"{timeout + REPLY_GRACE_S:g} s (is its event loop blocked?)",
                               sent)
        except Exception as exc:  # unreachable, or the worker refused the probe
            trouble = _Trouble(f"the health probe failed: {exc!r}", loop.time())
        finally:
            watch.probe = None
        if self._watches.get(replica.tag) is not watch or replica.status != "running":
            return  # it left while the probe ran
        if trouble is None:
            watch.failing_since = None
            return
        if watch.failing_since is None or trouble.since < watch.failing_since:
            watch.failing_since = trouble.since
        failing = loop.time() - watch.failing_since
        if failing < timeout:
            logger.info("replica %s failed a health probe (%.1f s of %g s): %s",
                        replica.tag, failing, timeout, trouble.reason)
            return
        del self._watches[replica.tag]
        self._replace(replica, trouble.reason, trouble.drainable)


@dataclass
class _Trouble:
    reason: str
    since: float              # loop time it began
    drainable: bool = False   # the replica still finishes what it runs


def _trouble(reply: HealthReply, timeout: float, sent: float, now: float) -> _Trouble | None:
    """What is wrong with a replica by its probe's answer; None if nothing is."""
    if reply.get("missing"):
        return _Trouble("its worker no longer hosts it", sent)
    stalled = reply.get("stalled_s", 0.0)
    if stalled >= timeout:
        return _Trouble(f"{reply.get('running')} call(s) have run for {stalled:.1f} s "
                        f"with none of them ending", now - stalled)
    if "hung" in reply:
        return _Trouble(reply["hung"], sent)
    if "error" in reply:
        return _Trouble(reply["error"], sent, drainable=True)
    return None
