"""The resource ledger: which worker can host a replica, and what replicas hold.

Dask's worker resources only gate where a task runs and are released when it ends;
an actor's creation task ends at once, so Dask alone would let any number of
``GPU: 1`` actors onto a one-GPU worker. The controller therefore books each
replica's demand here for the replica's whole life and pins the actor to the
worker it chose.

Replicas also stay off a worker that runs its host's HTTP proxy while another worker
of that host can take them: a sync handler busy in pure Python holds its process's
GIL, and the proxy, on that process's event loop, then waits for it at every wake-up.
Measured (``benchmarks/proxy_colocation.py``), a light endpoint of such a host kept
about a fifth of its throughput, at 5-8x its median latency; with the CPU-bound
replica in another worker process of the host, the loss was only the CPU they share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from distributed.comm import get_address_host

EPSILON = 1e-9


@dataclass
class WorkerCapacity:
    address: str
    total: dict[str, float]
    used: dict[str, float] = field(default_factory=dict)
    replicas: int = 0
    gpu_free: list[float] = field(default_factory=list)  # free share of each GPU
    cordoned: bool = False  # leaving (retired, or emptied for it): place nothing new

    def __post_init__(self) -> None:
        if not self.gpu_free:
            self.gpu_free = [1.0] * int(self.total.get("GPU", 0))

    def free(self, resource: str) -> float:
        return self.total.get(resource, 0.0) - self.used.get(resource, 0.0)

    def fits(self, demand: dict[str, float]) -> bool:
        if not all(self.free(name) + EPSILON >= amount for name, amount in demand.items()):
            return False
        return self._gpu_slots(demand.get("GPU", 0.0)) is not None

    def _gpu_slots(self, amount: float) -> list[int] | None:
        """Which GPUs a demand would use: a share of one GPU, or whole free GPUs."""
        if amount <= 0 or not self.gpu_free:
            return []
        if amount < 1:
            # Fill the fullest GPU that still fits, so fractions pack together.
            fitting = [i for i, free in enumerate(self.gpu_free) if free + EPSILON >= amount]
            return [min(fitting, key=lambda i: self.gpu_free[i])] if fitting else None
        whole = [i for i, free in enumerate(self.gpu_free) if free >= 1 - EPSILON]
        needed = math.ceil(amount - EPSILON)  # never fewer GPUs than asked for
        return whole[:needed] if len(whole) >= needed else None


class ResourceLedger:
    """Capacities of live workers and the reservations made against them."""

    def __init__(self) -> None:
        self.workers: dict[str, WorkerCapacity] = {}
        # Spread replicas (fewer lost with a worker) unless the cluster adapts: then
        # pack them, so that workers empty out and can be given back.
        self.pack = False
        # host -> the worker running its EveryNode proxy; ``ProxyFleet`` keeps it.
        self.proxy_hosts: dict[str, str] = {}

    def add_worker(self, address: str, nthreads: int,
                   declared: dict[str, float], gpus_found: int) -> None:
        total = dict(declared)
        # A worker that declares no CPU resource offers one CPU per thread; one that
        # declares no GPU offers the NVIDIA GPUs found on it.
        total.setdefault("CPU", float(nthreads))
        total.setdefault("GPU", float(gpus_found))
        previous = self.workers.get(address)  # re-registration keeps the bookings
        self.workers[address] = previous or WorkerCapacity(address, total)

    def remove_worker(self, address: str) -> None:
        self.workers.pop(address, None)

    def choose(self, demand: dict[str, float]) -> str | None:
        """The fitting worker with the fewest replicas, so replicas spread out; when
        packing, the fullest worker that already hosts replicas, then the fullest."""
        fitting = self._spare_proxy_workers([w for w in self.workers.values()
                                             if not w.cordoned and w.fits(demand)])
        if not fitting:
            return None
        if self.pack:
            return min(fitting, key=lambda w: (w.replicas == 0, w.free("CPU"),
                                               w.address)).address
        return min(fitting, key=lambda w: (w.replicas, -w.free("CPU"), w.address)).address

    def _spare_proxy_workers(self, fitting: list[WorkerCapacity]) -> list[WorkerCapacity]:
        """Drop each proxy-running worker whose host has another fitting worker (see
        the module); on a host with nothing else that fits, it hosts replicas."""
        if not self.proxy_hosts:
            return fitting
        proxies = set(self.proxy_hosts.values())
        spare_hosts = {get_address_host(w.address) for w in fitting
                       if w.address not in proxies}
        return [w for w in fitting
                if w.address not in proxies or get_address_host(w.address) not in spare_hosts]

    def cordon(self, address: str, cordoned: bool = True) -> None:
        worker = self.workers.get(address)
        if worker is not None:
            worker.cordoned = cordoned

    def reserve(self, address: str, demand: dict[str, float]) -> list[int]:
        """Book a demand on a worker; returns the indices of the GPUs it was given."""
        worker = self.workers[address]
        slots = worker._gpu_slots(demand.get("GPU", 0.0)) or []
        share = min(demand.get("GPU", 0.0), 1.0)
        for index in slots:
            worker.gpu_free[index] -= share
        for name, amount in demand.items():
            worker.used[name] = worker.used.get(name, 0.0) + amount
        worker.replicas += 1
        return slots

    def release(self, address: str, demand: dict[str, float], gpu_slots: list[int]) -> None:
        worker = self.workers.get(address)
        if worker is None:
            return
        share = min(demand.get("GPU", 0.0), 1.0)
        for index in gpu_slots:
            worker.gpu_free[index] = min(1.0, worker.gpu_free[index] + share)
        for name, amount in demand.items():
            worker.used[name] = max(0.0, worker.used.get(name, 0.0) - amount)
        worker.replicas = max(0, worker.replicas - 1)

    def snapshot(self) -> dict[str, dict]:
        return {a: {"total": w.total, "used": w.used} for a, w in self.workers.items()}
