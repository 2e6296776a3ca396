"""Autoscaling: each autoscaling backend's replica count follows its load.

Load is what every router holds for a backend: queries sent and not yet answered
plus those waiting for a free replica. Routers send it a couple of times a second
(``daskserve.load_report``), never per request; ``LoadBook`` keeps the latest report
of each router and drops those that stopped coming, so a router that went away does
not keep a backend large.

``ScalingPolicy`` turns load into a count with hysteresis: it asks for
``ceil(load / target)`` replicas within the bounds, but acts only once that wish has
pointed the same way for the whole delay, and then moves only as far as every wish
of the delay agreed on (the smallest wish going up, the largest going down). A single
burst or a single quiet moment therefore changes nothing, and a count that has just
changed must earn its next change over a fresh delay, so the count does not flap.

``Autoscaler`` applies the policy on a timer and changes the count only through
``DesiredState.set_num_replicas``, under the same per-backend turn as
``update_backend_config``, then checkpoints and reconciles like an API call would.
Scale-down goes through the usual drain, so no request is lost.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from daskserve.config import AutoscalingConfig

from .state import BackendSpec, DesiredState

logger = logging.getLogger(__name__)

TICK_S = 0.5            # how often decisions are made; routers report as often
REPORT_TTL_S = 3.0      # a report older than this no longer counts
MAX_ROUTERS = 10_000    # bound on the reports kept, whatever routers send


class LoadBook:
    """The latest load report of each router, forgotten once stale."""

    def __init__(self, ttl: float = REPORT_TTL_S):
        self.ttl = ttl
        self._reports: dict[str, tuple[float, dict[str, float]]] = {}

    def record(self, listener: Any, loads: Any, now: float) -> None:
        """Keep a report; anything malformed is dropped, since any process with a
        router may send one."""
        if not isinstance(listener, str) or not isinstance(loads, dict):
            return
        clean = {tag: float(n) for tag, n in loads.items()
                 if isinstance(tag, str) and isinstance(n, (int, float))
                 and not isinstance(n, bool) and math.isfinite(n) and n > 0}
        self._reports.pop(listener, None)  # re-inserted last: dicts keep arrival order
        self._reports[listener] = (now, clean)
        while len(self._reports) > MAX_ROUTERS:
            del self._reports[next(iter(self._reports))]

    def totals(self, now: float) -> dict[str, float]:
        """Load per backend over every router that reported recently."""
        for listener in [l for l, (at, _) in self._reports.items() if now - at > self.ttl]:
            del self._reports[listener]
        totals: dict[str, float] = {}
        for _, loads in self._reports.values():
            for tag, load in loads.items():
                totals[tag] = totals.get(tag, 0.0) + load
        return totals


@dataclass
class _Trend:
    direction: int      # +1: more replicas wanted, -1: fewer
    since: float        # when the wish started pointing this way
    load: float         # the least load since then going up, the most going down


class ScalingPolicy:
    """Load to replica count, with the hysteresis described in the module docstring."""

    def __init__(self) -> None:
        self._trends: dict[str, _Trend] = {}

    @staticmethod
    def needed(load: float, auto: AutoscalingConfig) -> int:
        return math.ceil(load / auto.target_num_ongoing_requests_per_replica - 1e-9)

    @classmethod
    def wanted(cls, load: float, auto: AutoscalingConfig) -> int:
        return auto.clamp(cls.needed(load, auto))

    def decide(self, tag: str, now: float, current: int, load: float,
               auto: AutoscalingConfig) -> tuple[int, str] | None:
        """A new count and why, or None to stay."""
        want = self.wanted(load, auto)
        if want == current:
            self._trends.pop(tag, None)
            return None
        direction = 1 if want > current else -1
        trend = self._trends.get(tag)
        if trend is None or trend.direction != direction:
            trend = self._trends[tag] = _Trend(direction, now, load)
        else:
            trend.load = min(trend.load, load) if direction > 0 else max(trend.load, load)
        delay = auto.upscale_delay_s if direction > 0 else auto.downscale_delay_s
        if now - trend.since < delay:
            return None
        del self._trends[tag]
        # Every wish since ``since`` agrees on the one made at the extreme load.
        count = self.wanted(trend.load, auto)
        return count, self._reason(trend, now - trend.since, count, auto)

    def _reason(self, trend: _Trend, held: float, count: int,
                auto: AutoscalingConfig) -> str:
        if trend.direction > 0:
            why = (f"load stayed at {trend.load:g} or more for {held:.1f} s "
                   f"(upscale_delay_s {auto.upscale_delay_s:g})")
        elif trend.load > 0:
            why = (f"load stayed at {trend.load:g} or less for {held:.1f} s "
                   f"(downscale_delay_s {auto.downscale_delay_s:g})")
        else:
            why = f"no load for {held:.1f} s (downscale_delay_s {auto.downscale_delay_s:g})"
        needed = self.needed(trend.load, auto)
        if trend.load > 0:
            why += (f": at {auto.target_num_ongoing_requests_per_replica:g} per replica "
                    f"that needs {needed}")
        if needed != count:
            edge = "max_replicas" if needed > count else "min_replicas"
            why += f", bounded by {edge} {count}"
        return why

    def forget(self, tag: str) -> None:
        self._trends.pop(tag, None)


class Autoscaler:
    """Sizes autoscaling backends from their load; one change per backend at a time.

    ``turns`` are the controller's per-backend locks that ``update_backend_config``
    holds, ``save`` checkpoints the desired state and ``reconcile`` starts or drains
    replicas to a backend's count.
    """

    def __init__(self, desired: DesiredState, turns: Any,
                 save: Callable[[], Awaitable[None]],
                 reconcile: Callable[[BackendSpec], Awaitable[Any]],
                 spawn: Callable[[Any], asyncio.Future]):
        self.desired = desired
        self.book = LoadBook()
        self.policy = ScalingPolicy()
        self._turns = turns
        self._save = save
        self._reconcile = reconcile
        self._spawn = spawn
        self._busy: dict[str, asyncio.Future] = {}
        self._loads: dict[str, float] = {}
        self._last: dict[str, dict[str, Any]] = {}  # tag -> last decision

    def report(self, listener: Any, loads: Any) -> None:
        self.book.record(listener, loads, time.monotonic())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.tick(time.monotonic())
            except Exception:  # a bad tick must not end autoscaling for good
                logger.exception("autoscaling decision failed")

    def tick(self, now: float) -> None:
        self._loads = self.book.totals(now)
        for tag in [t for t in self._last if t not in self.desired.backends]:
            del self._last[tag]
            self.policy.forget(tag)
        for spec in list(self.desired.backends.values()):
            auto = spec.autoscaling
            if auto is None or spec.tag in self._busy:
                continue
            decision = self.policy.decide(spec.tag, now, spec.num_replicas,
                                          self._loads.get(spec.tag, 0.0), auto)
            if decision is not None:
                task = self._spawn(self._apply(spec.tag, *decision))
                self._busy[spec.tag] = task
                task.add_done_callback(lambda _, tag=spec.tag: self._busy.pop(tag, None))

    async def _apply(self, tag: str, count: int, reason: str) -> None:
        async with self._turns[tag]:
            spec = self.desired.backends.get(tag)
            auto = spec.autoscaling if spec is not None else None
            if auto is None:
                return  # deleted, or autoscaling turned off, since the decision
            count = auto.clamp(count)  # the bounds may have changed meanwhile too
            if count == spec.num_replicas:
                return
            old = self.desired.set_num_replicas(tag, count)
            self.record(tag, old, count, reason)
            logger.info("autoscaling backend %r: %d -> %d replicas: %s", tag, old, count,
                        reason)
            await self._save()
        await self._reconcile(spec)

    def record(self, tag: str, old: int, new: int, reason: str) -> None:
        """Remember why a backend's count last changed (``list_backends`` shows it)."""
        self._last[tag] = {"time": time.time(), "from": old, "to": new, "reason": reason}
        self.policy.forget(tag)

    def config_changed(self, tag: str, old_config: dict, new_config: dict) -> None:
        """An API call changed a backend's config: note it when it moved the count or
        switched autoscaling, so ``list_backends`` says so."""
        was = old_config.get("autoscaling_config")
        now = new_config.get("autoscaling_config")
        old, new = old_config["num_replicas"], new_config["num_replicas"]
        if now is None:
            self._last.pop(tag, None)
            self.policy.forget(tag)
        elif was is None:
            self.record(tag, old, new, "autoscaling turned on by update_backend_config")
        elif was != now:
            self.record(tag, old, new, f"autoscaling_config changed by "
                                       f"update_backend_config (bounds [{now['min_replicas']}"
                                       f", {now['max_replicas']}])")

    def status(self, spec: BackendSpec) -> dict[str, Any] | None:
        """The ``autoscaling`` entry of ``list_backends``; None without autoscaling."""
        auto = spec.autoscaling
        if auto is None:
            return None
        load = self._loads.get(spec.tag, 0.0)
        last = self._last.get(spec.tag)
        return {
            "load": load,
            "wanted": self.policy.wanted(load, auto),
            "last_decision": {k: last[k] for k in ("time", "from", "to")} if last else None,
            "reason": last["reason"] if last else
            f"no change since the backend was created or restored "
            f"(it starts at min_replicas {auto.min_replicas})",
        }
