"""The resource ledger: which worker can host a replica, and what replicas hold.

Dask's worker resources only gate where a task runs and are released when it ends;
an actor's creation task ends at once, so Dask alone would let any number of
``GPU: 1`` actors onto a one-GPU worker. The controller therefore books each
replica's demand here for the replica's whole life and pins the actor to the
worker it chose.
"""
from __future__ import annotations

from dataclasses import dataclass, field

EPSILON = 1e-9


@dataclass
class WorkerCapacity:
    address: str
    host: str
    total: dict[str, float]
    used: dict[str, float] = field(default_factory=dict)
    replicas: int = 0

    def free(self, resource: str) -> float:
        return self.total.get(resource, 0.0) - self.used.get(resource, 0.0)

    def fits(self, demand: dict[str, float]) -> bool:
        return all(self.free(name) + EPSILON >= amount for name, amount in demand.items())


class ResourceLedger:
    """Capacities of live workers and the reservations made against them."""

    def __init__(self) -> None:
        self.workers: dict[str, WorkerCapacity] = {}

    def add_worker(self, address: str, host: str, nthreads: int,
                   declared: dict[str, float], gpus_found: int) -> None:
        total = dict(declared)
        # A worker that declares no CPU resource offers one CPU per thread; one that
        # declares no GPU offers the NVIDIA GPUs found on it.
        total.setdefault("CPU", float(nthreads))
        total.setdefault("GPU", float(gpus_found))
        previous = self.workers.get(address)
        self.workers[address] = WorkerCapacity(
            address, host, total,
            used=previous.used if previous else {},
            replicas=previous.replicas if previous else 0)

    def remove_worker(self, address: str) -> None:
        self.workers.pop(address, None)

    def choose(self, demand: dict[str, float]) -> str | None:
        """The fitting worker with the fewest replicas, so replicas spread out."""
        fitting = [w for w in self.workers.values() if w.fits(demand)]
        if not fitting:
            return None
        return min(fitting, key=lambda w: (w.replicas, -w.free("CPU"), w.address)).address

    def reserve(self, address: str, demand: dict[str, float]) -> None:
        worker = self.workers[address]
        for name, amount in demand.items():
            worker.used[name] = worker.used.get(name, 0.0) + amount
        worker.replicas += 1

    def release(self, address: str, demand: dict[str, float]) -> None:
        worker = self.workers.get(address)
        if worker is None:
            return
        for name, amount in demand.items():
            worker.used[name] = max(0.0, worker.used.get(name, 0.0) - amount)
        worker.replicas = max(0, worker.replicas - 1)

    def snapshot(self) -> dict[str, dict]:
        return {a: {"total": w.total, "used": w.used} for a, w in self.workers.items()}
