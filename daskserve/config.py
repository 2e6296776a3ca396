"""Validated configuration objects.

Everything a user can configure passes through here once, at the API boundary, so
that a typo or a wrong type is reported by field name before it reaches the
controller or a replica. The controller only ever sees plain dicts produced by
``to_dict`` (msgpack-friendly), never these classes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

import cloudpickle

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
)
HTTP_LOCATIONS = ("HeadOnly", "EveryNode", "NoServer")


def _check_type(name: str, value: Any, types: tuple[type, ...], what: str) -> None:
    if isinstance(value, bool) and bool not in types:
        raise TypeError(f"{name} must be {what}, got {value!r}")
    if not isinstance(value, types):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")


def _check_number(name: str, value: Any, *, minimum: float, integer: bool = False,
                  allow_equal: bool = True) -> None:
    _check_type(name, value, (int,) if integer else (int, float),
                "an integer" if integer else "a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if value < minimum or (value == minimum and not allow_equal):
        bound = ">=" if allow_equal else ">"
        raise ValueError(f"{name} must be {bound} {minimum}, got {value!r}")


def _reject_unknown(kind: str, given: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(
            f"unknown {kind} field(s) {unknown}; valid fields are {sorted(known)}"
        )


class _ChosenCount(int):
    """A replica count nobody wrote by hand: the default, or one the controller chose.

    With ``autoscaling_config`` the controller owns ``num_replicas``, and a count the
    user wrote is refused; counts of this type pass, so a config fetched with
    ``get_backend_config`` can be edited and sent back whole.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return int.__repr__(self)


class _UnsetCount(_ChosenCount):
    """The default count: an autoscaling backend starts at ``min_replicas`` instead."""

    __slots__ = ()


@dataclass
class AutoscalingConfig:
    """Bounds and pace for a backend whose replica count follows its load.

    ``target_num_ongoing_requests_per_replica`` counts requests in flight plus those
    waiting in routers; the controller asks for ``ceil(load / target)`` replicas.
    A change waits until the wish has pointed the same way for the whole delay
    (``upscale_delay_s`` up, ``downscale_delay_s`` down), and then goes only as far as
    every wish of that period agrees, so one burst or one quiet moment moves nothing.
    """

    min_replicas: int = 1
    max_replicas: int = 10
    target_num_ongoing_requests_per_replica: float = 2.0
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 30.0

    def __post_init__(self) -> None:
        _check_number("autoscaling_config.min_replicas", self.min_replicas, minimum=0,
                      integer=True)
        _check_number("autoscaling_config.max_replicas", self.max_replicas, minimum=1,
                      integer=True)
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"autoscaling_config.min_replicas ({self.min_replicas}) exceeds "
                f"autoscaling_config.max_replicas ({self.max_replicas})")
        _check_number("autoscaling_config.target_num_ongoing_requests_per_replica",
                      self.target_num_ongoing_requests_per_replica, minimum=0,
                      allow_equal=False)
        _check_number("autoscaling_config.upscale_delay_s", self.upscale_delay_s, minimum=0)
        _check_number("autoscaling_config.downscale_delay_s", self.downscale_delay_s,
                      minimum=0)

    @classmethod
    def coerce(cls, value: Any) -> "AutoscalingConfig":
        if isinstance(value, cls):
            return cls(**asdict(value))
        if not isinstance(value, Mapping):
            raise TypeError(f"autoscaling_config must be a dict, got "
                            f"{type(value).__name__} {value!r}")
        _reject_unknown("autoscaling_config", value, {f.name for f in fields(cls)})
        return cls(**value)

    def clamp(self, count: int) -> int:
        return min(max(int(count), self.min_replicas), self.max_replicas)


_BOTH_SET = ("num_replicas and autoscaling_config are both set: with autoscaling_config "
             "the controller sets num_replicas itself, between min_replicas and "
             "max_replicas; give only one of them")


@dataclass
class BackendConfig:
    """How a backend's replicas behave: count, batching, concurrency, user config.

    Validation happens in ``__post_init__``, which the controller also runs on the
    result of every partial update it merges, so a partially updated config can
    never hold an invalid combination.

    Two fields bound what waits in each router when every replica is at
    ``max_concurrent_queries`` (or none runs), so that a backend that cannot keep up
    makes callers fail fast instead of piling up memory and latency:

    - ``max_queued_requests`` (-1, unbounded): past it a request is refused at once
      (HTTP 503 with ``Retry-After``; handles raise ``BackPressureError``).
    - ``queue_timeout_s`` (30 s; None waits without bound): a request that waited
      this long fails (HTTP 503; handles raise ``QueueTimeoutError``). Raise it for
      backends whose replicas may take long to appear, such as on a cluster that
      must first grow.

    Two fields let the controller find a replica that is alive but no longer serves
    (every ``def`` handler thread stuck, an event loop blocked, the backend's own
    ``check_health()`` raising) and replace it (``scheduler_plugin/health.py``):

    - ``health_check_period_s`` (10 s): how often each running replica is probed.
    - ``health_check_timeout_s`` (30 s): how long a probe may take, and how long a
      replica may stay unhealthy, or run calls with none of them ending, before it
      is replaced. Keep it above the longest call the backend serves.
    
    ``sync_threads`` (None) is how many ``def`` handler calls a replica runs at once
    in its thread pool; more wait there, up to ``max_concurrent_queries``. The
    default, one more thread than the replica's CPUs (``num_cpus`` rounded up, at
    least 2), suits CPU-bound models: on an embedding model, 2 threads for one CPU
    served twice the requests per second that 100 threads did, which fought over the
    cores (``benchmarks/RESULTS.md``). Handlers that mostly wait (on a database, on
    another service) want more: set it as high as the calls they should overlap.
    """

    num_replicas: int = _UnsetCount(1)
    max_batch_size: int | None = None
    batch_wait_timeout: float = 0.0
    max_concurrent_queries: int = 100
    user_config: Any = None
    max_queued_requests: int = -1
    queue_timeout_s: float | None = 30.0
    autoscaling_config: dict[str, Any] | None = None
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    sync_threads: int | None = None

    def __post_init__(self) -> None:
        _check_number("num_replicas", self.num_replicas, minimum=0, integer=True)
        self._settle_autoscaling()
        if self.max_batch_size is not None:
            _check_number("max_batch_size", self.max_batch_size, minimum=1, integer=True)
        _check_number("batch_wait_timeout", self.batch_wait_timeout, minimum=0)
        _check_number("max_concurrent_queries", self.max_concurrent_queries,
                      minimum=1, integer=True)
        _check_number("max_queued_requests", self.max_queued_requests, minimum=-1,
                      integer=True)
        if self.queue_timeout_s is not None:
            _check_number("queue_timeout_s", self.queue_timeout_s, minimum=0,
                          allow_equal=False)
        for name in ("health_check_period_s", "health_check_timeout_s"):
            _check_number(name, getattr(self, name), minimum=0, allow_equal=False)
        if self.sync_threads is not None:
            _check_number("sync_threads", self.sync_threads, minimum=1, integer=True)
        if self.max_batch_size is not None and self.max_batch_size > self.max_concurrent_queries:
            # A batch can only fill with requests the router lets through; refusing
            # beats silently capping every batch at the concurrency limit.
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) exceeds max_concurrent_queries "
                f"({self.max_concurrent_queries}): batches could never fill; raise "
                f"max_concurrent_queries to at least {self.max_batch_size} (twice that "
                f"keeps the next batch filling while one runs)"
            )

    @classmethod
    def coerce(cls, value: "BackendConfig | Mapping[str, Any] | None") -> "BackendConfig":
        """Accept a ``BackendConfig``, a dict of its fields, or ``None`` (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return cls(**asdict(value))
        if isinstance(value, Mapping):
            _reject_unknown("BackendConfig", value, {f.name for f in fields(cls)})
            return cls(**value)
        raise TypeError(
            f"config must be a BackendConfig or a dict, got {type(value).__name__}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _settle_autoscaling(self) -> None:
        """Check ``autoscaling_config`` against the count; runs again in ``to_wire``
        because either field may have been assigned after construction."""
        if self.autoscaling_config is None:
            return
        auto = AutoscalingConfig.coerce(self.autoscaling_config)
        if not isinstance(self.num_replicas, _ChosenCount):
            raise ValueError(_BOTH_SET)
        self.autoscaling_config = asdict(auto)
        start = auto.min_replicas if type(self.num_replicas) is _UnsetCount \
            else self.num_replicas
        self.num_replicas = _ChosenCount(auto.clamp(start))

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-safe dict; ``user_config`` may be any Python object, so it is
        pickled here, by the trusted Python caller, and unpickled only in replicas
        and clients — never by the controller."""
        self._settle_autoscaling()
        wire = asdict(self)
        wire["num_replicas"] = int(self.num_replicas)
        wire["user_config"] = cloudpickle.dumps(self.user_config)
        return wire

    @classmethod
    def changes_to_wire(cls, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Some fields in wire form, for the controller to merge into the current
        config; it checks the merged result, since only it sees the current one."""
        if not isinstance(changes, Mapping):
            raise TypeError(
                f"config must be a BackendConfig or a dict, got {type(changes).__name__}"
            )
        _reject_unknown("BackendConfig", changes, {f.name for f in fields(cls)})
        wire = dict(changes)
        if wire.get("autoscaling_config") is not None:
            if "num_replicas" in wire:
                raise ValueError(_BOTH_SET)
            wire["autoscaling_config"] = asdict(
                AutoscalingConfig.coerce(wire["autoscaling_config"]))
        if "user_config" in wire:
            wire["user_config"] = cloudpickle.dumps(wire["user_config"])
        return wire

    @classmethod
    def validate_wire(cls, wire: Mapping[str, Any]) -> None:
        """Check a wire-form config without unpickling its ``user_config``."""
        if not isinstance(wire, Mapping) or not isinstance(wire.get("user_config"), bytes):
            raise TypeError("config must be a BackendConfig in wire form")
        _reject_unknown("BackendConfig", wire, {f.name for f in fields(cls)})
        config = cls._of_wire(wire, None)
        count = wire.get("num_replicas")
        if config.autoscaling_config is not None and count != config.num_replicas:
            auto = config.autoscaling_config
            raise ValueError(f"num_replicas ({count}) is outside autoscaling_config's "
                             f"[min_replicas, max_replicas] = "
                             f"[{auto['min_replicas']}, {auto['max_replicas']}]")

    @classmethod
    def slow_settings(cls, wire: Mapping[str, Any]) -> list[str]:
        """Settings of a valid wire-form config that measurements found slow
        (``benchmarks/RESULTS.md``); they stay allowed, and get a warning in the logs."""
        batch, limit = wire.get("max_batch_size"), wire.get("max_concurrent_queries", 100)
        if batch is not None and batch > 1 and limit < 2 * batch:
            return [f"max_concurrent_queries ({limit}) is under twice max_batch_size "
                    f"({batch}): while a batch runs, the router lets too few requests "
                    f"through to fill the next one (with the two equal, an embedding "
                    f"model served about half as many requests per second); set "
                    f"max_concurrent_queries to {2 * batch} or more"]
        return []

    @classmethod
    def queue_limits(cls, wire: Mapping[str, Any]) -> dict[str, Any]:
        """The fields routers apply to their wait queues (``protocol.BackendRoute``)."""
        return cls._stored(wire, "max_queued_requests", "queue_timeout_s")

    @classmethod
    def health_check(cls, wire: Mapping[str, Any]) -> tuple[float, float]:
        """``(health_check_period_s, health_check_timeout_s)`` of a stored config."""
        stored = cls._stored(wire, "health_check_period_s", "health_check_timeout_s")
        return stored["health_check_period_s"], stored["health_check_timeout_s"]

    @classmethod
    def _stored(cls, wire: Mapping[str, Any], *names: str) -> dict[str, Any]:
        """Some fields of a wire-form config; one stored (checkpointed) before a field
        existed gets that field's default."""
        defaults = {f.name: f.default for f in fields(cls)}
        return {name: wire.get(name, defaults[name]) for name in names}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> "BackendConfig":
        return cls._of_wire(wire, cloudpickle.loads(wire["user_config"]))

    @classmethod
    def _of_wire(cls, wire: Mapping[str, Any], user_config: Any) -> "BackendConfig":
        """A config as the controller keeps it: with autoscaling, its count is the
        controller's choice, not one written by hand."""
        fields_ = {**wire, "user_config": user_config}
        if fields_.get("autoscaling_config") is not None and \
                type(fields_.get("num_replicas")) is int:
            fields_["num_replicas"] = _ChosenCount(fields_["num_replicas"])
        return cls(**fields_)


@dataclass
class ReplicaOptions:
    """Where a replica may run and what it holds there (Dask worker resources)."""

    num_cpus: float = 1
    num_gpus: float = 0
    resources: dict[str, float] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    env: Any = None

    def __post_init__(self) -> None:
        _check_number("replica_options.num_cpus", self.num_cpus, minimum=0)
        _check_number("replica_options.num_gpus", self.num_gpus, minimum=0)
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ValueError(f"replica_options.num_gpus above 1 must be a whole number of "
                             f"GPUs (a share of one GPU is below 1), got {self.num_gpus!r}")
        _check_type("replica_options.resources", self.resources, (dict,), "a dict")
        for name, amount in self.resources.items():
            _check_type("replica_options.resources key", name, (str,), "a string")
            if name in ("CPU", "GPU"):
                raise ValueError(
                    f"replica_options.resources must not name {name!r}; "
                    f"use num_{name.lower()}s instead"
                )
            _check_number(f"replica_options.resources[{name!r}]", amount, minimum=0)
        _check_type("replica_options.env_vars", self.env_vars, (dict,), "a dict")
        for key, val in self.env_vars.items():
            _check_type("replica_options.env_vars key", key, (str,), "a string")
            _check_type(f"replica_options.env_vars[{key!r}]", val, (str,), "a string")
        if self.env is not None:
            from .envs.spec import coerce_env

            coerce_env(self.env)  # a serve.PackedEnv, or its wire form on the controller

    @classmethod
    def coerce(cls, value: Mapping[str, Any] | None) -> "ReplicaOptions":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(
                f"replica_options must be a dict, got {type(value).__name__}"
            )
        _reject_unknown("replica_options", value, {f.name for f in fields(cls)})
        return cls(**value)

    def demand(self) -> dict[str, float]:
        """The worker resources one replica reserves for its whole lifetime."""
        need = {"CPU": float(self.num_cpus), "GPU": float(self.num_gpus)}
        need.update({k: float(v) for k, v in self.resources.items()})
        return {k: v for k, v in need.items() if v > 0}

    def environment(self) -> dict[str, str]:
        """Environment variables for the replica; OMP follows the CPU share."""
        env = {"OMP_NUM_THREADS": str(max(1, math.ceil(self.num_cpus)))}
        env.update(self.env_vars)
        return env

    def to_dict(self) -> dict[str, Any]:
        options = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                   "resources": dict(self.resources), "env_vars": dict(self.env_vars)}
        if self.env is not None:
            from .envs.spec import coerce_env

            options["env"] = coerce_env(self.env).to_wire()
        return options


@dataclass
class HTTPOptions:
    """Where proxies listen and the limits they enforce on every request and connection.

    A proxy may run in the Dask scheduler's process and event loop, so every way a
    client can hold on to it is bounded: file descriptors (``max_connections``),
    memory per request (``max_header_size``, ``max_body_size``) and time
    (the ``*_timeout_s`` fields). Defaults suit production; each is a field so that
    deployments behind load balancers or with slow uploads can widen it.

    - ``max_connections`` (1024): open client connections per proxy. Past it a new
      connection gets a canned 503 with ``Retry-After`` and is closed at once,
      before anything is parsed or routed. It is also capped at half the process's
      file-descriptor limit, which the scheduler needs for its workers and clients.
    - ``max_header_size`` (64 KiB): bytes of request line plus headers; past it the
      client gets 431 and the connection is closed.
    - ``header_timeout_s`` (10 s): time from accepting a connection until its first
      request's headers have fully arrived. Cuts off clients that open connections
      and send nothing, or dribble headers (slowloris).
    - ``keep_alive_timeout_s`` (5 s): time from the end of a response until the next
      request's headers on that connection have fully arrived. Tornado runs one
      deadline per request head, so this bounds an idle keep-alive connection and a
      slow head on it alike. Set it above the idle timeout of a load balancer in
      front, so that the balancer, not the proxy, closes idle connections.
    - ``body_timeout_s`` (60 s): time to receive a whole request body, however it is
      sent; raise it with ``max_body_size`` for large uploads over slow links.
    - ``max_body_size`` (100 MiB) and ``request_timeout_s`` (none) bound what one
      request may send and how long its answer may take (413 and 504).
    - ``access_log`` (off): one JSON line per request on the ``daskserve.access``
      logger. Off by default because a busy proxy would write thousands of lines a
      second that most deployments already get from their load balancer.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    location: str | None = "HeadOnly"
    max_body_size: int = 100 * 1024 * 1024
    request_timeout_s: float | None = None
    max_connections: int = 1024
    max_header_size: int = 64 * 1024
    header_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 5.0
    body_timeout_s: float = 60.0
    access_log: bool = False  # one JSON line per request on the "daskserve.access" logger

    def __post_init__(self) -> None:
        _check_type("http_options.host", self.host, (str,), "a string")
        _check_number("http_options.port", self.port, minimum=0, integer=True)
        if self.port > 65535:
            raise ValueError(f"http_options.port must be <= 65535, got {self.port}")
        if self.location is None:
            self.location = "NoServer"
        if self.location not in HTTP_LOCATIONS:
            raise ValueError(
                f"http_options.location must be one of {list(HTTP_LOCATIONS)} or None, "
                f"got {self.location!r}"
            )
        _check_number("http_options.max_body_size", self.max_body_size, minimum=1,
                      integer=True)
        if self.request_timeout_s is not None:
            _check_number("http_options.request_timeout_s", self.request_timeout_s,
                          minimum=0, allow_equal=False)
        _check_number("http_options.max_connections", self.max_connections, minimum=1,
                      integer=True)
        _check_number("http_options.max_header_size", self.max_header_size, minimum=1,
                      integer=True)
        for name in ("header_timeout_s", "keep_alive_timeout_s", "body_timeout_s"):
            _check_number(f"http_options.{name}", getattr(self, name), minimum=0,
                          allow_equal=False)
        _check_type("http_options.access_log", self.access_log, (bool,), "True or False")

    @classmethod
    def coerce(cls, value: Mapping[str, Any] | None) -> "HTTPOptions":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"http_options must be a dict, got {type(value).__name__}")
        _reject_unknown("http_options", value, {f.name for f in fields(cls)})
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def normalize_methods(methods: Any) -> list[str]:
    """Upper-case and check HTTP method names so routing compares exact strings."""
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, (list, tuple, set, frozenset)) or not methods:
        raise TypeError(f"methods must be a non-empty list of HTTP methods, got {methods!r}")
    out = []
    for m in methods:
        if not isinstance(m, str) or m.upper() not in HTTP_METHODS:
            raise ValueError(
                f"unknown HTTP method {m!r}; valid methods are {sorted(HTTP_METHODS)}"
            )
        if m.upper() not in out:
            out.append(m.upper())
    return out
