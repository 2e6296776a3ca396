"""Adaptive Dask clusters grow for replicas and shrink around them.

``distributed.deploy.Adaptive`` (behind ``cluster.adapt()`` on LocalCluster,
dask-jobqueue and others) asks the scheduler three things over RPC:
``adaptive_target`` (how many workers), ``workers_to_close`` (which ones may go) and
``retire_workers`` (let them go); the Kubernetes operator asks the same through the
scheduler's HTTP API. Left alone, all three ignore replicas: a replica
that fits on no worker never makes the cluster grow, and a worker hosting one is
idle to Dask, so Adaptive retires it. ``retire_workers`` refuses a worker that holds
actors, but Adaptive then closes it anyway (``cluster.scale_down``), taking the
replica and the requests it was running with it.

So the bridge:

- raises ``adaptive_target`` to the workers that host replicas plus the new workers
  the pending replicas would fill (packed onto workers shaped like those seen so far);
- keeps workers hosting replicas out of ``workers_to_close`` (the scheduler asks
  plugins through ``valid_workers_downscaling``);
- wraps ``retire_workers``: a worker named there that still hosts replicas is
  cordoned and its replicas migrated first (replacement started elsewhere, then the
  old one drained), and only then does Dask's retirement run. ``cluster.scale(n)``
  retires through the same handler, so it loses no request either;
- while a cluster adapts, packs new replicas onto workers that already host some,
  and moves the replicas of a worker whose replicas all fit on the other hosts
  (controlled migration), so workers empty out and can be given back.

Packing and compaction happen only while Adaptive asks for targets: a fixed cluster
keeps spreading replicas (fewer lost with one worker) and sees a migration only when
a worker that hosts replicas is retired.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import time
from typing import Any, Awaitable, Callable

from .placement import EPSILON, ResourceLedger
from .replicas import REPLICA_KEY_PREFIX
from .state import DesiredState, ObservedState

logger = logging.getLogger(__name__)

ADAPTIVE_SEEN_S = 10.0   # Adaptive asks every second or so; after this, it stopped
COMPACT_EVERY_S = 2.0
ACTOR_RELEASE_TIMEOUT_S = 10.0
MAX_SHAPES = 16


class AdaptiveBridge:
    def __init__(self, scheduler: Any, ledger: ResourceLedger, desired: DesiredState,
                 observed: ObservedState,
                 migrate: Callable[[str, str], Awaitable[None]]):
        self.scheduler = scheduler
        self.ledger = ledger
        self.desired = desired
        self.observed = observed
        self._migrate = migrate          # (backend tag, worker) -> replicas moved off
        self._originals: dict[str, Callable] = {}
        self._shapes: list[dict[str, float]] = []  # capacities of workers seen
        self._asked_at: float | None = None        # when adaptive_target was last asked
        self._moving = False                       # a migration runs (one at a time)

    # -- installation -------------------------------------------------------------------
    def install(self) -> None:
        """Wrap the scheduler's handlers (Adaptive and clients call those over RPC) and
        its methods of the same names (the scheduler's HTTP API, which the Kubernetes
        operator's autoscaler uses, calls those directly)."""
        if self._originals:
            return
        self._originals = {"adaptive_target": self.scheduler.adaptive_target,
                           "retire_workers": self.scheduler.retire_workers}
        self.scheduler.handlers["adaptive_target"] = self.adaptive_target_rpc
        self.scheduler.handlers["retire_workers"] = self.retire_workers
        self.scheduler.adaptive_target = self.adaptive_target
        self.scheduler.retire_workers = self.retire_workers

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            if vars(self.scheduler).get(name) in (self.adaptive_target, self.retire_workers):
                delattr(self.scheduler, name)  # the class's method shows through again
            if self.scheduler.handlers.get(name) in (self.adaptive_target_rpc,
                                                     self.retire_workers):
                self.scheduler.handlers[name] = original
        self._originals = {}
        self.ledger.pack = False

    @property
    def adapting(self) -> bool:
        return self._asked_at is not None and \
            time.monotonic() - self._asked_at < ADAPTIVE_SEEN_S

    # -- the three handlers -----------------------------------------------------------
    def adaptive_target(self, *args: Any, **kwargs: Any) -> int:
        """Dask's own target, raised to what the replicas need."""
        return max(self._originals["adaptive_target"](*args, **kwargs),
                   self.workers_needed())

    def adaptive_target_rpc(self, **kwargs: Any) -> int:
        """``adaptive_target`` as Adaptive asks for it: a cluster adapts, so replicas
        are packed from now on. (The scheduler's Prometheus metrics call the method
        on every scrape, so only this handler counts as a sign of adapting.)"""
        self._asked_at = time.monotonic()
        self.ledger.pack = True
        return self.adaptive_target(**kwargs)

    def valid_workers_downscaling(self, workers: list) -> list:
        """Drop workers that host replicas from the ones Dask may close."""
        booked = self.ledger.workers
        return [ws for ws in workers
                if ws.address not in booked or booked[ws.address].replicas == 0]

    async def retire_workers(self, *args: Any, **kwargs: Any) -> Any:
        """Migrate the replicas of the named workers, then let Dask retire them."""
        leaving = self._named(args[0] if args else kwargs.get("workers"),
                              kwargs.get("names"))
        hosting = [a for a in leaving
                   if a in self.ledger.workers and self.ledger.workers[a].replicas]
        for address in hosting:
            self.ledger.cordon(address)
        try:
            for address in hosting:
                logger.info("worker %s is retiring: moving its replicas first", address)
                await self._evacuate(address)
            return await self._originals["retire_workers"](*args, **kwargs)
        finally:
            for address in hosting:  # still here: its retirement was refused
                self.ledger.cordon(address, False)

    def _named(self, workers: Any, names: Any) -> list[str]:
        """The addresses of the workers a retirement names.

        ``SpecCluster.scale`` (LocalCluster, dask-jobqueue) passes its worker *names*
        as ``workers``, which Dask's retirement then finds no worker for, before it
        closes those workers anyway; so entries that are no address are taken as
        names, and a name also covers the processes of a multi-process job
        (``<job name>-<n>``).
        """
        entries = list(workers or []) + list(names or [])
        found = [a for a in entries if isinstance(a, str) and a in self.scheduler.workers]
        wanted = {str(e) for e in entries if e not in found}
        if wanted:
            found += [ws.address for ws in self.scheduler.workers.values()
                      if str(ws.name) in wanted
                      or str(ws.name).rpartition("-")[0] in wanted]
        return list(dict.fromkeys(found))

    # -- target -------------------------------------------------------------------
    def workers_needed(self) -> int:
        """Workers hosting replicas, plus new workers for the replicas that fit on
        no worker, packed onto workers shaped like those this cluster has had.

        A replica that fits no shape seen does not count: more of the same workers
        would not host it either. With no worker ever seen, one new worker is asked
        for, whose shape then says how many more are needed.
        """
        self._learn_shapes()
        hosts: set[str] = set()
        pending: list[dict[str, float]] = []
        for backend in self.observed.backends.values():
            for replica in backend.replicas.values():
                if replica.status == "pending":
                    pending.append(replica.demand)
                elif replica.worker is not None and replica.worker in self.ledger.workers \
                        and not self.ledger.workers[replica.worker].cordoned:
                    hosts.add(replica.worker)
        if not pending:
            return len(hosts)
        if not self._shapes:
            return len(hosts) + 1
        free: list[dict[str, float]] = []  # what is left on each new worker
        for demand in sorted(pending, key=lambda d: -d.get("CPU", 0.0)):
            spot = next((f for f in free if _fits(f, demand)), None)
            if spot is None:
                shape = next((s for s in self._shapes if _fits(s, demand)), None)
                if shape is None:
                    continue
                spot = dict(shape)
                free.append(spot)
            for name, amount in demand.items():
                spot[name] = spot.get(name, 0.0) - amount
        return len(hosts) + len(free)

    def _learn_shapes(self) -> None:
        for worker in self.ledger.workers.values():
            if worker.total not in self._shapes:
                self._shapes.append(dict(worker.total))
                del self._shapes[:-MAX_SHAPES]

    # -- migration ------------------------------------------------------------------
    async def _evacuate(self, address: str) -> None:
        """Move every replica off a cordoned worker, and wait until Dask has let go
        of their actors (retirement refuses a worker that still holds one)."""
        self._moving = True
        try:
            await asyncio.gather(*(self._migrate(tag, address)
                                   for tag in list(self.desired.backends)))
        finally:
            self._moving = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ACTOR_RELEASE_TIMEOUT_S
        while loop.time() < deadline:
            ws = self.scheduler.workers.get(address)
            if ws is None or not any(str(ts.key).startswith(REPLICA_KEY_PREFIX)
                                     for ts in ws.actors):
                return
            await asyncio.sleep(0.05)
        logger.warning("the replicas' actors on %s were not released in %ss",
                       address, ACTOR_RELEASE_TIMEOUT_S)

    async def run(self) -> None:
        """While a cluster adapts, empty workers whose replicas fit elsewhere."""
        while True:
            await asyncio.sleep(COMPACT_EVERY_S)
            try:
                await self._compact()
            except Exception:  # one failed move must not end packing for good
                logger.exception("moving replicas to empty a worker failed")

    async def _compact(self) -> None:
        if not self.adapting:
            self.ledger.pack = False
            return
        if self._moving or not self._settled():
            return
        address = self.compaction_candidate()
        if address is None:
            return
        logger.info("moving the replicas of %s onto workers that host others, so the "
                    "adaptive cluster can retire it", address)
        self.ledger.cordon(address)
        try:
            await self._evacuate(address)
        finally:
            self.ledger.cordon(address, False)

    def _settled(self) -> bool:
        """Nothing starts, drains or waits for a worker the cluster could add: the
        counts are what they will stay for a while."""
        for backend in self.observed.backends.values():
            for replica in backend.replicas.values():
                if replica.status in ("starting", "draining"):
                    return False
                if replica.status == "pending" and \
                        any(_fits(shape, replica.demand) for shape in self._shapes):
                    return False
        return True

    def compaction_candidate(self) -> str | None:
        """A host whose replicas all fit into what the other hosts have free; the one
        with the fewest replicas first, so a migration moves as few as possible.

        The fit is tried on copies of the ledger's own entries, with its own
        placement, so GPU shares are counted per device as real placement will.
        """
        hosts = [w for w in self.ledger.workers.values() if w.replicas and not w.cordoned]
        if len(hosts) < 2:
            return None
        by_worker: dict[str, list[dict[str, float]]] = {}
        for backend in self.observed.backends.values():
            for replica in backend.replicas.values():
                if replica.worker is not None:
                    by_worker.setdefault(replica.worker, []).append(replica.demand)
        for worker in sorted(hosts, key=lambda w: (w.replicas, w.address)):
            trial = ResourceLedger()
            trial.pack = True
            trial.workers = {w.address: copy.deepcopy(w) for w in hosts if w is not worker}
            demands = sorted(by_worker.get(worker.address, []),
                             key=lambda d: -d.get("CPU", 0.0))
            if demands and all(_place(trial, d) for d in demands):
                return worker.address
        return None


def _fits(free: dict[str, float], demand: dict[str, float]) -> bool:
    return all(free.get(name, 0.0) + EPSILON >= amount for name, amount in demand.items())


def _place(ledger: ResourceLedger, demand: dict[str, float]) -> bool:
    address = ledger.choose(demand)
    if address is None:
        return False
    ledger.reserve(address, demand)
    return True
