"""The controller's state: what users asked for, kept apart from what runs.

``DesiredState`` (backends with their code and config, endpoints, traffic, shadows)
changes only through its methods, which check each change against the rest of the
state first; it is plain data, so a checkpoint can store it as it is. ``ObservedState``
(replicas and how their starts went) is the controller's view of the cluster and is
rebuilt from it, never stored. The routing table and the ``list_*`` answers are
derived from both on demand, so they cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from daskserve.config import AutoscalingConfig, BackendConfig, ReplicaOptions, normalize_methods
from daskserve.errors import EndpointNotFoundError
from daskserve.protocol import EndpointRoute, RoutingTable
from daskserve.traffic import validate_traffic


# -- desired ----------------------------------------------------------------------------
@dataclass
class BackendSpec:
    tag: str
    code: bytes                       # cloudpickled (target, init_args); opaque here
    config: dict[str, Any]            # BackendConfig wire form (user_config pickled)
    replica_options: dict[str, Any]   # ReplicaOptions.to_dict()

    @property
    def num_replicas(self) -> int:
        return self.config["num_replicas"]

    @property
    def autoscaling(self) -> AutoscalingConfig | None:
        auto = self.config.get("autoscaling_config")
        return AutoscalingConfig(**auto) if auto is not None else None

    def demand(self) -> dict[str, float]:
        return ReplicaOptions(**self.replica_options).demand()


@dataclass
class EndpointSpec:
    name: str
    route: str | None
    methods: list[str]
    traffic: dict[str, float] = field(default_factory=dict)
    shadows: dict[str, float] = field(default_factory=dict)

    def describe(self) -> EndpointRoute:
        return {"route": self.route, "methods": list(self.methods),
                "traffic": dict(self.traffic), "shadows": dict(self.shadows)}


@dataclass
class DesiredState:
    """What users asked for; ``version`` counts the changes made to it."""

    backends: dict[str, BackendSpec] = field(default_factory=dict)
    endpoints: dict[str, EndpointSpec] = field(default_factory=dict)
    version: int = 0

    def backend(self, tag: str) -> BackendSpec:
        try:
            return self.backends[tag]
        except KeyError:
            raise ValueError(f"backend {tag!r} does not exist") from None

    def endpoint(self, name: str) -> EndpointSpec:
        try:
            return self.endpoints[name]
        except KeyError:
            raise EndpointNotFoundError(f"endpoint {name!r} does not exist") from None

    def _changed(self) -> None:
        self.version += 1

    # -- backends -----------------------------------------------------------------------
    def add_backend(self, tag: str, code: bytes, config: dict,
                    replica_options: dict) -> BackendSpec:
        _check_name("backend", tag)
        BackendConfig.validate_wire(config)
        ReplicaOptions(**replica_options)
        if tag in self.backends:
            raise ValueError(f"backend {tag!r} already exists")
        spec = self.backends[tag] = BackendSpec(tag, code, config, replica_options)
        self._changed()
        return spec

    def update_backend_config(self, tag: str, changes: dict,
                              replace: bool = False) -> dict:
        """Merge some fields (wire form) into a backend's config, or with ``replace``
        swap in a whole one; returns the previous config.

        The merge happens here, in one step, so that concurrent partial updates each
        keep the fields the others changed; the merged config must pass every
        ``BackendConfig`` rule, cross-field ones included.
        """
        spec = self.backend(tag)
        if not isinstance(changes, dict):
            raise TypeError("config changes must be a dict in wire form")
        config = dict(changes) if replace else {**spec.config, **changes}
        auto = config.get("autoscaling_config")
        if isinstance(auto, dict):
            # The controller owns the count of an autoscaling backend: a count asked
            # for by hand is refused, and a whole config sent back (``replace``)
            # carries whatever count its sender last saw, so the current one stays,
            # moved into the (possibly new) bounds.
            if not replace and "num_replicas" in changes:
                raise ValueError(f"backend {tag!r}: num_replicas and autoscaling_config "
                                 f"are both set: with autoscaling_config the controller "
                                 f"sets num_replicas itself; change min_replicas and "
                                 f"max_replicas instead, or turn autoscaling off with "
                                 f"autoscaling_config=None")
            config["num_replicas"] = AutoscalingConfig.coerce(auto).clamp(spec.num_replicas)
        BackendConfig.validate_wire(config)
        old, spec.config = spec.config, config
        self._changed()
        return old

    def set_num_replicas(self, tag: str, count: int) -> int:
        """The autoscaler's change: a new count for an autoscaling backend, within
        its bounds; returns the previous count."""
        spec = self.backend(tag)
        auto = spec.autoscaling
        if auto is None:
            raise ValueError(f"backend {tag!r} does not autoscale")
        if auto.clamp(count) != count:
            raise ValueError(f"backend {tag!r}: {count} replicas is outside "
                             f"[{auto.min_replicas}, {auto.max_replicas}]")
        old = spec.num_replicas
        spec.config = {**spec.config, "num_replicas": count}
        self._changed()
        return old

    def remove_backend(self, tag: str) -> BackendSpec:
        spec = self.backend(tag)
        for endpoint in self.endpoints.values():
            if tag in endpoint.traffic or tag in endpoint.shadows:
                raise ValueError(
                    f"backend {tag!r} is used by endpoint {endpoint.name!r}; change that "
                    f"endpoint's traffic (or stop shadowing) before deleting the backend")
        del self.backends[tag]
        self._changed()
        return spec

    # -- endpoints ------------------------------------------------------------------------
    def add_endpoint(self, name: str, backend: str | None, route: str | None,
                     methods: list[str]) -> None:
        _check_name("endpoint", name)
        if name in self.endpoints:
            raise ValueError(f"endpoint {name!r} already exists")
        if route is not None:
            _check_route(route)
            for other in self.endpoints.values():
                if other.route == route:
                    raise ValueError(f"route {route!r} is already used by endpoint "
                                     f"{other.name!r}")
        if backend is not None:
            self.backend(backend)
        self.endpoints[name] = EndpointSpec(name, route, normalize_methods(methods),
                                            {backend: 1.0} if backend else {})
        self._changed()

    def remove_endpoint(self, name: str) -> None:
        self.endpoint(name)
        del self.endpoints[name]
        self._changed()

    def set_traffic(self, name: str, traffic: dict) -> None:
        endpoint = self.endpoint(name)
        endpoint.traffic = validate_traffic(name, traffic, set(self.backends))
        self._changed()

    def set_shadow(self, name: str, backend: str, proportion: float) -> None:
        endpoint = self.endpoint(name)
        self.backend(backend)
        if isinstance(proportion, bool) or not isinstance(proportion, (int, float)) or \
                not 0 <= proportion <= 1:
            raise ValueError(f"shadow proportion must be a number in [0, 1], got {proportion!r}")
        if proportion == 0:
            endpoint.shadows.pop(backend, None)
        else:
            endpoint.shadows[backend] = float(proportion)
        self._changed()

    def clear(self) -> None:
        self.backends.clear()
        self.endpoints.clear()
        self._changed()

    # -- plain values, for checkpoints --------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The whole state as msgpack-native values; code and user_config stay bytes."""
        return {
            "version": self.version,
            "backends": [{"tag": b.tag, "code": b.code, "config": dict(b.config),
                          "replica_options": dict(b.replica_options)}
                         for b in self.backends.values()],
            "endpoints": [{"name": e.name, "route": e.route, "methods": list(e.methods),
                           "traffic": dict(e.traffic), "shadows": dict(e.shadows)}
                          for e in self.endpoints.values()],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DesiredState":
        """Rebuild a state through the same checks as live changes.

        A stored state may have been edited by hand or written under older rules;
        replaying it through the methods means a restored controller can only hold a
        state it could have reached through the API. Raises ``ValueError``,
        ``TypeError`` or ``KeyError`` naming what does not fit.
        """
        state = cls()
        for b in data["backends"]:
            if not isinstance(b["code"], bytes):
                raise TypeError(f"backend {b['tag']!r}: code must be bytes")
            state.add_backend(b["tag"], b["code"], b["config"], b["replica_options"])
        for e in data["endpoints"]:
            state.add_endpoint(e["name"], None, e["route"], e["methods"])
            if e["traffic"]:
                state.set_traffic(e["name"], e["traffic"])
            for backend, proportion in e["shadows"].items():
                state.set_shadow(e["name"], backend, proportion)
        version = data["version"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be a non-negative integer, got {version!r}")
        state.version = version  # the count of changes goes on where it stopped
        return state


MAX_NAME_LENGTH = 256
MAX_ROUTE_LENGTH = 2048


def _check_name(kind: str, name: Any) -> None:
    """Names travel into logs, metric labels, replica tags and anything built by
    joining names into paths, so they must print as they are, never split into path
    segments, and stay short enough that every message quoting them stays small."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"{kind} name must be a non-empty string, got {_clip(name)}")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"{kind} name must be at most {MAX_NAME_LENGTH} characters, "
                         f"got {len(name)}: {_clip(name)}")
    if not name.isprintable():
        raise ValueError(f"{kind} name must be printable (no control characters, NUL, "
                         f"tabs or line breaks), got {_clip(name)}")
    if "/" in name:
        raise ValueError(f"{kind} name must not contain '/', got {_clip(name)}")


def _check_route(route: Any) -> None:
    """A route is matched against the percent-decoded path of a request, which never
    holds the query ('?') or the fragment ('#') and arrives as printable text; a route
    that could never match, or only by accident, is refused when it is created."""
    if not isinstance(route, str) or not route.startswith("/"):
        raise ValueError(f"route must be a path starting with '/', got {_clip(route)}")
    if len(route) > MAX_ROUTE_LENGTH:
        raise ValueError(f"route must be at most {MAX_ROUTE_LENGTH} characters, got "
                         f"{len(route)}: {_clip(route)}")
    for char, part in (("?", "query string"), ("#", "fragment")):
        if char in route:
            raise ValueError(f"route {_clip(route)} must not contain {char!r}: a "
                             f"request's {part} is not part of the path routes match")
    if not route.isprintable():
        raise ValueError(f"route must be printable (no control characters, NUL, tabs "
                         f"or line breaks), got {_clip(route)}")
    if route != route.strip():
        raise ValueError(f"route must not begin or end with whitespace, got {_clip(route)}")
    if route.startswith("/-/"):
        raise ValueError(f"route {route!r} is reserved for built-in routes")


def _clip(value: Any, limit: int = 60) -> str:
    """``repr`` of a user value, cut short: a 100k-character name must not make a
    100k-character error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# -- observed ---------------------------------------------------------------------------
@dataclass
class ReplicaState:
    tag: str
    backend: str
    demand: dict[str, float]
    status: str = "pending"          # pending | starting | running | draining
    worker: str | None = None        # the worker whose resources it holds
    address: str | None = None       # where routers send its requests (set once running)
    gpu_slots: list[int] = field(default_factory=list)
    future: Any = None               # the host's actor future: keeps the replica alive


@dataclass
class BackendReplicas:
    """The replicas the controller runs for one backend, and how starting them went."""

    replicas: dict[str, ReplicaState] = field(default_factory=dict)
    last_error: str | None = None     # why the latest replica start failed, if it did
    # Replicas found unhealthy and replaced, and why the latest was: kept for the
    # backend's life, since its replacement running again clears ``last_error``.
    unhealthy_replaced: int = 0
    last_unhealthy: str | None = None

    def running(self) -> list[ReplicaState]:
        return [r for r in self.replicas.values() if r.status == "running"]

    def live(self) -> list[ReplicaState]:
        return [r for r in self.replicas.values() if r.status != "draining"]


@dataclass
class ObservedState:
    backends: dict[str, BackendReplicas] = field(default_factory=dict)

    def of(self, tag: str) -> BackendReplicas:
        """A backend's replicas; the entry is made on first use."""
        return self.backends.setdefault(tag, BackendReplicas())

    def running(self, tag: str) -> list[ReplicaState]:
        replicas = self.backends.get(tag)
        return replicas.running() if replicas is not None else []


# -- views --------------------------------------------------------------------------------
def describe_backend(spec: BackendSpec, observed: BackendReplicas,
                     autoscaling: dict[str, Any] | None = None) -> dict[str, Any]:
    """``list_backends`` entry: the full config plus where its replicas stand, how
    many were replaced for being unhealthy (and why the latest was), and for an
    autoscaling backend its load and why its count last changed."""
    counts: dict[str, int] = {}
    for replica in observed.replicas.values():
        counts[replica.status] = counts.get(replica.status, 0) + 1
    pending = counts.get("pending", 0)
    live = len(observed.replicas) - counts.get("draining", 0)
    if pending:
        status = "PENDING"
    elif live < spec.num_replicas and observed.last_error:
        status = "FAILED"
    elif counts.get("running", 0) == spec.num_replicas == live:
        status = "RUNNING"
    else:
        status = "UPDATING"
    return {
        **spec.config,  # user_config stays pickled; the client unpickles it
        "replica_options": dict(spec.replica_options),
        "replicas": counts,
        "status": status,
        "pending_reason": (f"{pending} replica(s) wait for a worker with "
                           f"{spec.demand()} free") if pending else None,
        "last_error": observed.last_error,
        "unhealthy_replaced": observed.unhealthy_replaced,
        "last_unhealthy": observed.last_unhealthy,
        "autoscaling": autoscaling,
    }


def routing_table(epoch: str, version: int, desired: DesiredState,
                  observed: ObservedState) -> RoutingTable:
    """What routers need: endpoints with policies, and each backend's live replicas."""
    return {
        "epoch": epoch,
        "version": version,
        "endpoints": {name: e.describe() for name, e in desired.endpoints.items()},
        "backends": {
            tag: {"max_concurrent_queries": spec.config["max_concurrent_queries"],
                  **BackendConfig.queue_limits(spec.config),
                  "max_batch_size": spec.config.get("max_batch_size"),
                  "replicas": [{"tag": r.tag, "address": r.address}
                               for r in observed.running(tag)]}
            for tag, spec in desired.backends.items()
        },
    }
