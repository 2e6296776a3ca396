"""Replica lifecycle: bring each backend's replicas to the count its config asks.

Replicas are Dask actors created through the controller's own client, which holds
their futures for as long as they live. Scale-down drains: a replica leaves the
routing table first, then is told to finish what it has (new arrivals are bounced
back to the router and retried elsewhere), and only then is its actor released.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from typing import Any, Awaitable, Callable

from distributed import Client

from daskserve.config import ReplicaOptions
from daskserve.protocol import DRAIN, UPDATE
from daskserve.gpus import count_gpus
from daskserve.replica import Replica

from .placement import ResourceLedger
from .state import BackendState, ReplicaState

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 120.0


class ReplicaManager:
    def __init__(self, scheduler: Any, publish: Callable[[], Awaitable[None]]):
        self._scheduler = scheduler
        self._publish = publish
        self.ledger = ResourceLedger()
        self._client: Client | None = None
        self._client_lock = asyncio.Lock()
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def client(self) -> Client:
        async with self._client_lock:
            if self._client is None:
                self._client = await Client(self._scheduler.address, asynchronous=True,
                                            security=self._scheduler.security,
                                            name="daskserve-controller")
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

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

    def lose_worker(self, address: str, backends: dict[str, BackendState]) -> bool:
        """Forget a dead worker and the replicas it held; True if it held any.

        Reconciliation then starts replacements, under new tags, wherever they fit.
        """
        self.ledger.remove_worker(address)
        lost = False
        for backend in backends.values():
            for replica in list(backend.replicas.values()):
                if replica.address == address:
                    lost = True
                    self._forget_actor(replica)
                    del backend.replicas[replica.tag]
        return lost

    # -- reconciliation -----------------------------------------------------------------
    async def reconcile(self, backend: BackendState) -> list[str]:
        """Start or drain replicas until ``num_replicas`` are live; returns start errors."""
        async with self._locks[backend.tag]:
            live = [r for r in backend.replicas.values() if r.status != "draining"]
            demand = ReplicaOptions(**backend.options).demand()
            for _ in range(backend.num_replicas - len(live)):
                tag = f"{backend.tag}#{uuid.uuid4().hex[:8]}"
                backend.replicas[tag] = ReplicaState(tag, backend.tag, demand)
            surplus = len(live) - backend.num_replicas
            victims = sorted(live, key=lambda r: ("pending", "starting", "running").index(
                r.status))[:max(0, surplus)]
            errors = await self._start_pending(backend)
            if errors:
                backend.last_error = errors[-1]
                await self._publish()
            elif all(r.status == "running" for r in backend.replicas.values()):
                backend.last_error = None
            if victims:
                await self._drain(backend, victims)
            return errors

    async def _start_pending(self, backend: BackendState) -> list[str]:
        starting = []
        for replica in backend.replicas.values():
            if replica.status != "pending":
                continue
            address = self.ledger.choose(replica.demand)
            if address is None:
                continue
            replica.gpu_slots = self.ledger.reserve(address, replica.demand)
            replica.status, replica.address = "starting", address
            starting.append(replica)
        if not starting:
            return []
        outcomes = await asyncio.gather(*(self._start(backend, r) for r in starting))
        await self._publish()
        return [error for error in outcomes if error]

    async def _start(self, backend: BackendState, replica: ReplicaState) -> str | None:
        client = await self.client()
        env_vars = ReplicaOptions(**backend.options).environment()
        future = client.submit(Replica, backend.tag, replica.tag, backend.spec,
                               backend.config, env_vars, replica.gpu_slots, actor=True,
                               workers=[replica.address], allow_other_workers=False,
                               pure=False, key=f"daskserve-replica-{replica.tag}")
        try:
            await future
        except Exception as exc:
            future.release()
            self._forget_actor(replica)
            backend.replicas.pop(replica.tag, None)
            logger.warning("replica %s failed to start: %r", replica.tag, exc)
            return f"{type(exc).__name__}: {exc}"
        if backend.replicas.get(replica.tag) is not replica or replica.status != "starting":
            future.release()  # removed or its worker died while it was starting
            return None
        replica.future, replica.key, replica.status = future, future.key, "running"
        return None

    async def _drain(self, backend: BackendState, victims: list[ReplicaState]) -> None:
        for replica in victims:
            if replica.status == "pending":
                del backend.replicas[replica.tag]
            else:
                replica.status = "draining"
        await self._publish()  # routers stop choosing them before they are told to drain
        await asyncio.gather(*(self._stop(backend, r) for r in victims
                               if r.status == "draining"))

    async def _stop(self, backend: BackendState, replica: ReplicaState) -> None:
        if replica.key is not None and replica.address is not None:
            try:
                await asyncio.wait_for(
                    getattr(self._scheduler.rpc(replica.address), DRAIN)(key=replica.key),
                    DRAIN_TIMEOUT_S)
            except Exception as exc:
                logger.info("draining %s: %r", replica.tag, exc)
        self._forget_actor(replica)
        backend.replicas.pop(replica.tag, None)

    def _forget_actor(self, replica: ReplicaState) -> None:
        if replica.address is not None:
            self.ledger.release(replica.address, replica.demand, replica.gpu_slots)
            replica.gpu_slots = []
        if replica.future is not None:
            replica.future.release()
            replica.future = None

    async def push_config(self, backend: BackendState, reconfigure: bool) -> None:
        """Send a new config to every running replica; raises the first failure."""
        calls = [getattr(self._scheduler.rpc(r.address), UPDATE)(
                     key=r.key, config=backend.config, reconfigure=reconfigure)
                 for r in backend.running()]
        for outcome in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(outcome, Exception):
                raise outcome

    async def remove_backend(self, backend: BackendState) -> None:
        backend.config = {**backend.config, "num_replicas": 0}
        await self.reconcile(backend)
