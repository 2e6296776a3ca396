"""The controller's desired and observed state, and the views built from it.

Everything here is plain data. The routing table routers receive and the dicts
``list_backends``/``list_endpoints`` return are derived from it, never stored, so
they cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ReplicaState:
    tag: str
    backend: str
    demand: dict[str, float]
    status: str = "pending"          # pending | starting | running | draining
    address: str | None = None
    key: str | None = None
    gpu_slots: list[int] = field(default_factory=list)
    future: Any = None                # the actor future that keeps the replica alive
    error: str | None = None


@dataclass
class BackendState:
    tag: str
    spec: bytes                       # cloudpickled (target, init_args); opaque here
    config: dict[str, Any]            # BackendConfig wire form (user_config pickled)
    options: dict[str, Any]           # ReplicaOptions as a dict
    replicas: dict[str, ReplicaState] = field(default_factory=dict)
    last_error: str | None = None     # why the latest replica start failed, if it did

    @property
    def num_replicas(self) -> int:
        return self.config["num_replicas"]

    def running(self) -> list[ReplicaState]:
        return [r for r in self.replicas.values() if r.status == "running"]

    def describe(self) -> dict[str, Any]:
        """``list_backends`` entry: the full config plus where its replicas stand."""
        counts: dict[str, int] = {}
        for replica in self.replicas.values():
            counts[replica.status] = counts.get(replica.status, 0) + 1
        pending = counts.get("pending", 0)
        live = len(self.replicas) - counts.get("draining", 0)
        if pending:
            status = "PENDING"
        elif live < self.num_replicas and self.last_error:
            status = "FAILED"
        elif counts.get("running", 0) == self.num_replicas == live:
            status = "RUNNING"
        else:
            status = "UPDATING"
        return {
            **self.config,  # user_config stays pickled; the client unpickles it
            "replica_options": dict(self.options),
            "replicas": counts,
            "status": status,
            "pending_reason": (f"{pending} replica(s) wait for a worker with "
                               f"{self.options_demand()} free") if pending else None,
            "last_error": self.last_error,
        }

    def options_demand(self) -> dict[str, float]:
        return next(iter(self.replicas.values())).demand if self.replicas else {}


@dataclass
class EndpointState:
    name: str
    route: str | None
    methods: list[str]
    traffic: dict[str, float] = field(default_factory=dict)
    shadows: dict[str, float] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"route": self.route, "methods": list(self.methods),
                "traffic": dict(self.traffic), "shadows": dict(self.shadows)}


def routing_table(version: int, backends: dict[str, BackendState],
                  endpoints: dict[str, EndpointState]) -> dict[str, Any]:
    """What routers need: endpoints with policies, and each backend's live replicas."""
    return {
        "version": version,
        "endpoints": {name: e.describe() for name, e in endpoints.items()},
        "backends": {
            tag: {"max_concurrent_queries": b.config["max_concurrent_queries"],
                  "replicas": [[r.tag, r.address, r.key] for r in b.running()]}
            for tag, b in backends.items()
        },
    }
