"""Replica lifecycle: bring each backend's replicas to the count its config asks.

The manager owns the observed state: which replicas exist, where, in what status.
It reads the desired state (a backend's spec) and never edits it. Replicas are hosted
by Dask actors (``daskserve.replica_host.ActorHost``) created through the
controller's own client, which holds their futures for as long as they live.
Scale-down drains: a replica leaves the routing table first, then is told to finish
what it has (new arrivals are bounced back to the router and retried elsewhere), and
only then is its actor released. A replica the health monitor found wedged
(``health.py``) cannot drain: it leaves the routing table, its in-flight work is
failed at once (``WorkerOp.ABORT``), and its resources go to a replacement. One whose
own ``check_health`` fails still can, and drains as its replacement starts.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from typing import Any, Awaitable, Callable

from distributed import Client

from daskserve import metrics
from daskserve.config import ReplicaOptions
from daskserve.errors import ReplicaConfigError
from daskserve.envs.host import EnvHost
from daskserve.gpus import count_gpus
from daskserve.protocol import WorkerOp
from daskserve.replica_host import ActorHost

from .envs import EnvRegistry
from .placement import ResourceLedger
from .state import BackendReplicas, BackendSpec, ObservedState, ReplicaState

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 120.0
ABORT_TIMEOUT_S = 10.0  # a worker whose event loop is blocked never answers
REPLICA_KEY_PREFIX = "daskserve-replica-"  # Dask key of each replica's actor
REPLICA_START_PRIORITY = 1_000_000  # Dask task priority: higher runs first


class ReplicaManager:
    def __init__(self, scheduler: Any, observed: ObservedState,
                 publish: Callable[[], Awaitable[None]]):
        self._scheduler = scheduler
        self.observed = observed
        self._publish = publish
        self.ledger = ResourceLedger()
        self._client: Client | None = None
        self._client_lock = asyncio.Lock()
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.envs = EnvRegistry(scheduler, self.client)

    async def client(self) -> Client:
        async with self._client_lock:
            if self._client is None:
                self._client = await Client(self._scheduler.address, asynchronous=True,
                                            security=self._scheduler.security,
                                            name="daskserve-controller")
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
            # An asynchronous Client joins the loop runner of the loop it starts on and
            # its close() never leaves it (dask/distributed#4072). Where that loop is a
            # LocalCluster's, the cluster's loop thread would outlive the cluster, and
            # a loop thread still running at interpreter exit can crash it.
            client._loop_runner.stop()

    # -- workers ------------------------------------------------------------------
    async def add_worker(self, address: str) -> None:
        state = self._scheduler.workers.get(address)
        if state is None:
            return
        gpus = 0
        if "GPU" not in state.resources:
            try:
                client = await self.client()
                found = await client.run(count_gpus, workers=[address])
                gpus = found.get(address, 0)
            except Exception as exc:  # a worker that vanished while we asked
                logger.info("GPU discovery on %s failed: %r", address, exc)
        if address in self._scheduler.workers:
            self.ledger.add_worker(address, state.nthreads,
                                   dict(state.resources), gpus)

    def lose_worker(self, address: str) -> bool:
        """Forget a dead worker and the replicas it held; True if it held any.

        Reconciliation then starts replacements, under new tags, wherever they fit.
        """
        self.ledger.remove_worker(address)
        lost = False
        for backend in self.observed.backends.values():
            for replica in list(backend.replicas.values()):
                if replica.worker == address:
                    lost = True
                    self._forget_actor(replica)
                    del backend.replicas[replica.tag]
        return lost

    # -- reconciliation -----------------------------------------------------------------
    async def reconcile(self, spec: BackendSpec) -> list[str]:
        """Start or drain replicas until ``num_replicas`` are live; returns start errors."""
        if spec.replica_options.get("env") is not None:
            self.envs.use(spec.tag, spec.replica_options["env"])
        return await self._reconcile(spec, spec.num_replicas)

    async def remove_backend(self, tag: str) -> None:
        """Drain every replica of a backend the desired state no longer has."""
        observed = self.observed.backends.get(tag)
        if observed is not None:
            async with self._locks[tag]:
                await self._scale(tag, observed, 0)
            self.observed.backends.pop(tag, None)
            self._locks.pop(tag, None)
        await self.envs.drop(tag)

    def lose_replica(self, tag: str, reason: str) -> bool:
        """A replica's own process died (packed envs); True if it was live.

        Like a lost worker: the replica is forgotten, and reconciliation starts a
        replacement under a new tag.
        """
        for backend in self.observed.backends.values():
            replica = backend.replicas.get(tag)
            if replica is not None and replica.status in ("starting", "running"):
                self._forget_actor(replica)
                del backend.replicas[tag]
                backend.last_error = f"replica {tag} lost: {reason}"
                return True
        return False

    async def replace_unhealthy(self, spec: BackendSpec, replica: ReplicaState, reason: str,
                                drain: bool) -> bool:
        """Take a replica found unhealthy out of service; True if it was still running.

        Routers stop choosing it first. One that still answers (``drain``: its own
        ``check_health`` failed) then drains like a replica scaled down while its
        replacement starts, so what it was running finishes. A wedged one never would:
        its in-flight requests fail with ``ReplicaUnavailableError`` (HTTP 503) instead
        of waiting on it for ever, and its resources are released, so reconciliation
        can start its replacement under a new tag, on the same worker if need be.
        """
        observed = self.observed.backends.get(spec.tag)
        if observed is None or observed.replicas.get(replica.tag) is not replica or \
                replica.status != "running":
            return False  # lost, drained or replaced meanwhile
        observed.unhealthy_replaced += 1
        observed.last_unhealthy = f"replica {replica.tag}: {reason}"
        logger.warning("backend %r: replica %r is unhealthy and is being replaced%s: %s",
                       spec.tag, replica.tag, " as it drains" if drain else "", reason)
        metrics.replica_unhealthy(spec.tag)  # observability
        if drain:
            replica.status = "draining"
            await self._publish()
            await self.reconcile(spec)  # its replacement, while it still holds its share
            await self._stop(observed, replica)
            return True
        del observed.replicas[replica.tag]
        await self._publish()
        try:
            await asyncio.wait_for(
                getattr(self._scheduler.rpc(replica.address), WorkerOp.ABORT)(
                    replica=replica.tag,
                    reason=f"the controller found it unhealthy and replaced it: {reason}"),
                ABORT_TIMEOUT_S)
        except Exception as exc:
            logger.info("aborting %s: %r", replica.tag, exc)
        self._forget_actor(replica)
        return True

    @staticmethod
    def _add_pending(spec: BackendSpec, observed: BackendReplicas, count: int) -> None:
        demand = spec.demand()
        for _ in range(count):
            tag = f"{spec.tag}#{uuid.uuid4().hex[:8]}"
            observed.replicas[tag] = ReplicaState(tag, spec.tag, demand)

    async def _reconcile(self, spec: BackendSpec, target: int) -> list[str]:
        async with self._locks[spec.tag]:
            observed = self.observed.of(spec.tag)
            self._add_pending(spec, observed, target - len(observed.live()))
            errors = await self._start_pending(spec, observed)
            if errors:
                observed.last_error = errors[-1]
                await self._publish()
            elif all(r.status == "running" for r in observed.replicas.values()):
                observed.last_error = None
            await self._scale(spec.tag, observed, target)
            return errors

    async def migrate(self, spec: BackendSpec, worker: str) -> None:
        """Move a backend's replicas off ``worker``: start each replacement elsewhere
        first, then drain the old one, so the backend never has fewer replicas
        running than before. The caller cordons ``worker`` so no replacement lands
        there. A replacement that fits nowhere stays pending and the old replica still
        drains (the worker is going anyway); routers hold its requests until then."""
        async with self._locks[spec.tag]:
            observed = self.observed.of(spec.tag)
            leaving = [r for r in observed.live() if r.worker == worker]
            if not leaving:
                return
            self._add_pending(spec, observed, len(leaving))
            errors = await self._start_pending(spec, observed)
            if errors:
                observed.last_error = errors[-1]
            for replica in leaving:
                replica.status = "draining"
            await self._publish()  # routers stop choosing them before they drain
            await asyncio.gather(*(self._stop(observed, r) for r in leaving))

    async def _scale(self, tag: str, observed: BackendReplicas, target: int) -> None:
        """Drain the surplus over ``target``, least advanced replicas first."""
        live = observed.live()
        surplus = len(live) - target
        if surplus <= 0:
            return
        order = ("pending", "starting", "running")
        victims = sorted(live, key=lambda r: order.index(r.status))[:surplus]
        for replica in victims:
            if replica.status == "pending":
                del observed.replicas[replica.tag]
            else:
                replica.status = "draining"
        await self._publish()  # routers stop choosing them before they are told to drain
        await asyncio.gather(*(self._stop(observed, r) for r in victims
                               if r.status == "draining"))

    async def _start_pending(self, spec: BackendSpec, observed: BackendReplicas) -> list[str]:
        starting = []
        for replica in observed.replicas.values():
            if replica.status != "pending":
                continue
            worker = self.ledger.choose(replica.demand)
            if worker is None:
                continue
            replica.gpu_slots = self.ledger.reserve(worker, replica.demand)
            replica.status, replica.worker = "starting", worker
            starting.append(replica)
        if not starting:
            return []
        outcomes = await asyncio.gather(*(self._start(spec, observed, r) for r in starting))
        await self._publish()
        return [error for error in outcomes if error]

    async def _start(self, spec: BackendSpec, observed: BackendReplicas,
                     replica: ReplicaState) -> str | None:
        client = await self.client()
        options = ReplicaOptions(**spec.replica_options)
        host, args = ActorHost, (spec.tag, replica.tag, spec.code, spec.config,
                                 options.environment(), replica.gpu_slots)
        if options.env is not None:  # a child process under the env's interpreter
            host, args = EnvHost, (*args, spec.replica_options["env"])
        future = client.submit(host, *args, actor=True,
                               workers=[replica.worker], allow_other_workers=False,
                               pure=False, key=f"{REPLICA_KEY_PREFIX}{replica.tag}",
                               # Before any queued task: those may be waiting for it
                               # (daskserve/batch.py).
                               priority=REPLICA_START_PRIORITY)
        replica.future = future
        try:
            await future
            address = await getattr(self._scheduler.rpc(replica.worker), WorkerOp.LOCATE)(
                replica=replica.tag)
            if address is None:
                raise RuntimeError(f"worker {replica.worker} does not host {replica.tag}")
        except asyncio.CancelledError:
            if observed.replicas.get(replica.tag) is replica:
                raise  # we are being cancelled, not the replica's start
            return None  # released while starting: it was no longer wanted
        except Exception as exc:
            if observed.replicas.get(replica.tag) is not replica:
                return None  # its worker died while it was starting: replaced already
            self._forget_actor(replica)
            observed.replicas.pop(replica.tag, None)
            logger.warning("replica %s failed to start: %r", replica.tag, exc)
            return f"{type(exc).__name__}: {exc}"
        replica.address = address
        if observed.replicas.get(replica.tag) is not replica or replica.status != "starting":
            # Removed, or its worker died, while it was starting: it is not wanted.
            await self._stop(observed, replica)
            return None
        replica.status = "running"
        metrics.replica_started(spec.tag)  # observability
        return None

    async def _stop(self, observed: BackendReplicas, replica: ReplicaState) -> None:
        if replica.address is not None:
            try:
                await asyncio.wait_for(
                    getattr(self._scheduler.rpc(replica.address), WorkerOp.DRAIN)(
                        replica=replica.tag),
                    DRAIN_TIMEOUT_S)
            except Exception as exc:
                logger.info("draining %s: %r", replica.tag, exc)
        self._forget_actor(replica)
        observed.replicas.pop(replica.tag, None)

    def _forget_actor(self, replica: ReplicaState) -> None:
        if replica.worker is not None:
            self.ledger.release(replica.worker, replica.demand, replica.gpu_slots)
            replica.gpu_slots = []
            replica.worker = None
        if replica.future is not None:
            replica.future.release()
            replica.future = None

    async def push_config(self, spec: BackendSpec, reconfigure: bool) -> None:
        """Send a new config to every running replica; raises the first failure
        (a replica's own error as ``ReplicaConfigError``, still pickled)."""
        running = self.observed.running(spec.tag)
        calls = [getattr(self._scheduler.rpc(r.address), WorkerOp.UPDATE)(
                     replica=r.tag, config=spec.config, reconfigure=reconfigure)
                 for r in running]
        for replica, outcome in zip(running, await asyncio.gather(*calls,
                                                                   return_exceptions=True)):
            if isinstance(outcome, Exception):
                raise outcome
            if outcome.get("error") is not None:
                raise ReplicaConfigError(spec.tag, replica.tag, outcome["message"],
                                         outcome["error"])
