"""Prometheus metrics of daskserve: the built-in ones, and the hooks that feed them.

Every process (scheduler, worker, client) keeps its own registry, ``REGISTRY``, so
serve metrics never mix with what else the process registers globally. The request
path calls in here at a few points (a proxy answering, a router taking a request, a
replica running one); everything else happens when someone scrapes.

How a scrape sees the whole instance, with no worker port opened: each worker answers
``WorkerOp.METRICS`` with a ``snapshot`` of its registry (plain lists, msgpack-safe);
the controller gathers those from every worker at scrape time, concurrently and under
a deadline, adds its own process's snapshot and ``merge``s them into one text
(``scheduler_plugin/dashboard.py``). A proxy's ``/-/metrics`` and the scheduler's own
``/metrics`` both serve that text. Series with equal labels from several processes
(two EveryNode proxies counting the same route) are summed, so each label set is one
series for the instance; per-replica series never collide, a replica living in one
process.

Hot-path cost is kept to a cached prometheus-client child and one ``inc`` or
``observe`` per event: children are looked up once per label set (per proxy route,
per endpoint, per replica) and kept. Gauges that describe a state (requests in
flight, waiting) are read from the live objects when scraped, so the request path
never updates them.

Label values come only from bounded sets: routes, endpoints, backends and replicas
the instance defines, standard HTTP methods and statuses. Nothing a client sends
becomes a label.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
import weakref
from typing import Any, Awaitable, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import Counter as _PromCounter
from prometheus_client import Histogram as _PromHistogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from . import context
from .config import HTTP_METHODS
from .custom_metrics import Counter, Gauge, Histogram, forget_replica_series

__all__ = ["Counter", "Gauge", "Histogram", "REGISTRY", "exposition", "record_http",
           "snapshot", "merge"]

REGISTRY = CollectorRegistry(auto_describe=True)
# Snapshots name the process they come from, so that a worker sharing the scheduler's
# process (``LocalCluster(processes=False)``) is not counted twice.
PROCESS_ID = uuid.uuid4().hex

# Every bucket is a series per replica and histogram: few enough that a scrape of
# hundreds of replicas stays cheap (benchmarks/metrics_scrape.py), fine enough below
# a second where serving latencies live.
LATENCY_BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 5000, 30000)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# -- proxy ------------------------------------------------------------------------------
HTTP_REQUESTS = _PromCounter(
    "serve_num_http_requests", "HTTP requests answered by the proxies",
    ["route", "method", "status", "endpoint"], registry=REGISTRY)
HTTP_LATENCY = _PromHistogram(
    "serve_http_request_latency_ms", "End-to-end latency of HTTP requests to an "
    "endpoint, from the request's headers arriving at a proxy to its answer, in ms",
    ["endpoint"], buckets=LATENCY_BUCKETS_MS, registry=REGISTRY)
# -- routers (proxies' and handles') ------------------------------------------------------
ROUTER_REQUESTS = _PromCounter(
    "serve_num_router_requests", "Requests (HTTP and handle calls) routers took for "
    "an endpoint", ["endpoint"], registry=REGISTRY)
# -- replicas -----------------------------------------------------------------------------
BACKEND_REQUESTS = _PromCounter(
    "serve_backend_request_counter", "Requests a replica finished, errors included",
    ["backend", "replica"], registry=REGISTRY)
BACKEND_ERRORS = _PromCounter(
    "serve_backend_error_counter", "Requests whose handler raised",
    ["backend", "replica"], registry=REGISTRY)
QUEUING_LATENCY = _PromHistogram(
    "serve_backend_queuing_latency_ms", "Time a request waited in its replica for "
    "its batch to start, in ms (only batching handlers wait in the replica)",
    ["backend", "replica"], buckets=LATENCY_BUCKETS_MS, registry=REGISTRY)
PROCESSING_LATENCY = _PromHistogram(
    "serve_backend_processing_latency_ms", "Time the handler took for a request (for "
    "its whole batch, with batching), in ms", ["backend", "replica"],
    buckets=LATENCY_BUCKETS_MS, registry=REGISTRY)
BATCH_SIZE = _PromHistogram(
    "serve_replica_batch_size", "Sizes of the batches a replica's handler ran",
    ["backend", "replica"], buckets=BATCH_SIZE_BUCKETS, registry=REGISTRY)
# -- controller ---------------------------------------------------------------------------
REPLICA_STARTS = _PromCounter(
    "serve_backend_replica_starts", "Replicas that started, first ones and "
    "replacements of lost ones alike", ["backend"], registry=REGISTRY)
REPLICA_HEALTH_FAILURES = _PromCounter(
    "serve_replica_health_failures", "Replicas the controller found unhealthy (wedged, "
    "or failing check_health) and replaced", ["backend"], registry=REGISTRY)

# Gauges read from live objects at scrape time (see _StateCollector).
REPLICA_QUEUED = "serve_replica_queued_queries"
REPLICA_PROCESSING = "serve_replica_processing_queries"
ROUTER_QUEUED = "serve_router_queued_queries"
ROUTER_IN_FLIGHT = "serve_router_in_flight_queries"
GPU_UTILIZATION = "serve_gpu_utilization_percent"
GPU_MEMORY_USED = "serve_gpu_memory_used_bytes"
GPU_MEMORY_TOTAL = "serve_gpu_memory_total_bytes"

BUILTIN_NAMES = frozenset({
    "serve_num_http_requests", "serve_http_request_latency_ms",
    "serve_num_router_requests", "serve_backend_request_counter",
    "serve_backend_error_counter", "serve_backend_queuing_latency_ms",
    "serve_backend_processing_latency_ms", "serve_replica_batch_size",
    "serve_backend_replica_starts", "serve_replica_health_failures", REPLICA_QUEUED,
    REPLICA_PROCESSING, ROUTER_QUEUED, ROUTER_IN_FLIGHT, GPU_UTILIZATION, GPU_MEMORY_USED,
    GPU_MEMORY_TOTAL})

_now = time.perf_counter


# -- proxies --------------------------------------------------------------------------------
_http_children: dict[tuple, Any] = {}
_latency_children: dict[str, Any] = {}


def record_http(route: str, method: str, status: int, endpoint: str) -> None:
    """Count one answered request.

    Every distinct label set is a series kept for the life of the process, so
    labels must come from bounded sets, never from what a client may invent:
    ``route`` is an endpoint's route, a built-in route or "" (callers ensure it),
    and a method outside the standard ones counts as "other".
    """
    if method not in HTTP_METHODS:
        method = "other"
    key = (route, method, status, endpoint)
    child = _http_children.get(key)
    if child is None:
        child = _http_children[key] = HTTP_REQUESTS.labels(route, method, str(status),
                                                           endpoint)
    child.inc()


class ProxyObserver:
    """What one proxy records per answered request: counts, latency, access log.

    The access log is off by default; then ``access_log`` is None and costs one
    attribute test per request.
    """

    __slots__ = ("access_log",)

    def __init__(self, options: Any):
        self.access_log = AccessLog() if getattr(options, "access_log", False) else None

    def trace(self) -> "_Trace | None":
        """Where one request goes, when the access log wants to know: the proxy hands
        it to the router with the request, and the router notes the replica in it."""
        return _Trace() if self.access_log is not None else None

    def done(self, exchange: Any, route: str, status: int, endpoint: str) -> None:
        method = exchange.start_line.method
        record_http(route, method, status, endpoint)
        started = getattr(exchange, "started", None)
        if started is None:
            return
        elapsed_ms = (_now() - started) * 1000
        if endpoint:
            child = _latency_children.get(endpoint)
            if child is None:
                child = _latency_children[endpoint] = HTTP_LATENCY.labels(endpoint)
            child.observe(elapsed_ms)
        if self.access_log is not None:
            self.access_log.write(exchange, method, route, status, elapsed_ms, endpoint)


class _Trace:
    """Where a request went: filled in by the router, read by the access log."""

    __slots__ = ("backend", "replica")

    def __init__(self) -> None:
        self.backend: str | None = None
        self.replica: str | None = None

    def note(self, backend: str, replica: str) -> None:
        self.backend, self.replica = backend, replica


class AccessLog:
    """One JSON line per HTTP request on the ``daskserve.access`` logger.

    JSON so that log pipelines parse fields without a pattern; the message is
    built only when the log is on. If nothing in the process handles that logger's
    records, lines go to stderr, so turning the option on shows something at once.
    """

    logger = logging.getLogger("daskserve.access")

    def __init__(self) -> None:
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.logger.setLevel(logging.INFO)
        if not self.logger.hasHandlers():
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            self.logger.addHandler(handler)

    def write(self, exchange: Any, method: str, route: str, status: int,
              latency_ms: float, endpoint: str) -> None:
        trace = getattr(exchange, "trace", None)
        client = getattr(exchange, "client", None)
        self.logger.info(json.dumps({
            "time": time.time(), "method": method, "route": route, "status": status,
            "latency_ms": round(latency_ms, 3), "endpoint": endpoint or None,
            "backend": trace.backend if trace else None,
            "replica": trace.replica if trace else None,
            "client": client[0] if client else None}))


# -- routers --------------------------------------------------------------------------------
_routers: "weakref.WeakSet[Any]" = weakref.WeakSet()
_router_children: dict[str, Any] = {}


def track_router(router: Any) -> None:
    """Let scrapes read this router's queues (held weakly: a closed router goes)."""
    _routers.add(router)


def router_request(router: Any, endpoint: str) -> None:
    """Count a request a router took; names no endpoint the router does not know, so
    a handle to a misspelt endpoint makes no series."""
    child = _router_children.get(endpoint)
    if child is None:
        if endpoint not in router.endpoints:
            return
        child = _router_children[endpoint] = ROUTER_REQUESTS.labels(endpoint)
    child.inc()


def _router_gauges() -> Iterable[Metric]:
    queued: dict[str, int] = {}
    in_flight: dict[str, int] = {}
    for router in list(_routers):
        if getattr(router, "closed", False):
            continue
        for tag, backend in list(getattr(router, "_backends", {}).items()):
            queue = getattr(backend, "queue", None)  # the wait queue, live entries only
            waiting = queue.live() if queue is not None else len(backend.waiting)
            queued[tag] = queued.get(tag, 0) + waiting
            in_flight[tag] = in_flight.get(tag, 0) + sum(l.in_flight for l in backend.links)
    q = GaugeMetricFamily(ROUTER_QUEUED, "Requests waiting in routers for a replica of "
                          "the backend to have room", labels=["backend"])
    f = GaugeMetricFamily(ROUTER_IN_FLIGHT, "Requests routers sent to the backend's "
                          "replicas and have not seen answered", labels=["backend"])
    for tag in sorted(queued):
        q.add_metric([tag], queued[tag])
        f.add_metric([tag], in_flight[tag])
    return q, f


# -- replicas -------------------------------------------------------------------------------
class _ReplicaSeries:
    """A replica's cached children, and the executor its gauges read."""

    __slots__ = ("backend", "replica", "executor", "requests", "errors", "queuing",
                 "processing", "_batch")

    def __init__(self, backend: str, replica: str, executor: Any = None):
        self.backend, self.replica = backend, replica
        self.executor = weakref.ref(executor) if executor is not None else None
        self.requests = BACKEND_REQUESTS.labels(backend, replica)
        self.errors = BACKEND_ERRORS.labels(backend, replica)
        self.queuing = QUEUING_LATENCY.labels(backend, replica)
        self.processing = PROCESSING_LATENCY.labels(backend, replica)
        self._batch = None

    @property
    def batch(self) -> Any:
        if self._batch is None:  # only replicas that batch get this series
            self._batch = BATCH_SIZE.labels(self.backend, self.replica)
        return self._batch

    def queued(self, executor: Any) -> int:
        return sum(len(m.batch._items) for m in list(getattr(executor, "_methods", {})
                                                     .values()) if m.batch is not None)

    def remove(self) -> None:
        for metric in (BACKEND_REQUESTS, BACKEND_ERRORS, QUEUING_LATENCY,
                       PROCESSING_LATENCY, BATCH_SIZE):
            try:
                metric.remove(self.backend, self.replica)
            except KeyError:
                pass


_replicas: dict[str, _ReplicaSeries] = {}


def instrument_replica(executor: Any) -> None:
    """Count and time every request an executor runs.

    Wraps the executor's per-request entries (``_run`` on its event loop,
    ``_run_here`` in a lane's thread), so the executor itself holds no metrics code.
    Call it before the executor resolves any method: batch queues are built around
    the methods then.
    """
    ctx = executor.context
    series = _replicas[ctx.replica_tag] = _ReplicaSeries(ctx.backend_tag, ctx.replica_tag,
                                                         executor)
    run, run_here = executor._run, executor._run_here
    methods = executor._methods
    requests, errors, processing = series.requests, series.errors, series.processing

    def counted(name: str, start: float) -> None:
        requests.inc()
        method = methods.get(name)
        if method is None or method.batch is None:  # batches are timed whole
            processing.observe((_now() - start) * 1000)

    async def counted_run(name: str, args: tuple, kwargs: dict) -> Any:
        start = _now()
        try:
            return await run(name, args, kwargs)
        except Exception:
            errors.inc()
            raise
        finally:
            counted(name, start)

    def counted_run_here(name: str, args: tuple, kwargs: dict) -> Any:
        start = _now()
        try:
            return run_here(name, args, kwargs)
        except Exception:
            errors.inc()
            raise
        finally:
            counted(name, start)

    executor._run, executor._run_here = counted_run, counted_run_here


async def run_batch(run: Callable[[list], Awaitable[list]], items: list,
                    submitted: list[float]) -> list:
    """Run one batch of the current replica, recording its size, how long each of
    its requests waited for it, and how long it took."""
    replica = context.current_replica()
    series = _replicas.get(replica.replica_tag) if replica is not None else None
    if series is None:  # a batch queue outside a replica (unit tests): nothing to record
        return await run(items)
    start = _now()
    series.batch.observe(len(items))
    queuing = series.queuing
    for t in submitted:
        queuing.observe((start - t) * 1000)
    try:
        return await run(items)
    finally:
        elapsed = (_now() - start) * 1000
        processing = series.processing
        for _ in items:
            processing.observe(elapsed)


def forget_replica(replica: str) -> None:
    """Drop a removed replica's series, so replica churn never grows a scrape."""
    series = _replicas.pop(replica, None)
    if series is not None:
        series.remove()
    forget_replica_series(replica)


def _replica_gauges() -> Iterable[Metric]:
    queued = GaugeMetricFamily(REPLICA_QUEUED, "Requests waiting in a replica for their "
                               "batch to start", labels=["backend", "replica"])
    processing = GaugeMetricFamily(REPLICA_PROCESSING, "Requests a replica is running "
                                   "(or holding results of, until collected)",
                                   labels=["backend", "replica"])
    for series in list(_replicas.values()):
        executor = series.executor() if series.executor is not None else None
        if executor is None:
            continue
        waiting = series.queued(executor)
        queued.add_metric([series.backend, series.replica], waiting)
        processing.add_metric([series.backend, series.replica],
                              max(0, executor.in_flight - waiting))
    return queued, processing


# -- controller -----------------------------------------------------------------------------
def replica_started(backend: str) -> None:
    REPLICA_STARTS.labels(backend).inc()


def replica_unhealthy(backend: str) -> None:
    REPLICA_HEALTH_FAILURES.labels(backend).inc()


class _StateCollector:
    """Gauges computed from live routers and replicas when a scrape asks."""

    def collect(self) -> Iterable[Metric]:
        yield from _router_gauges()
        yield from _replica_gauges()

    def describe(self) -> Iterable[Metric]:
        return []  # names are known statically; nothing to check at registration


REGISTRY.register(_StateCollector())


# -- GPUs -----------------------------------------------------------------------------------
_nvml: Any = None  # the pynvml module once initialised; False where NVML is absent


def gpu_snapshot(devices: Callable[[], list[str]]) -> list[dict[str, Any]]:
    """Utilisation and memory of each GPU this worker may use, by slot (the index
    placement uses): ``devices()`` names them as ``CUDA_VISIBLE_DEVICES`` entries
    (``gpus.worker_devices``). An empty list where NVML finds no GPU. Never invented."""
    global _nvml
    if _nvml is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml = pynvml
        except Exception:
            _nvml = False
    if not _nvml:
        return []
    nvml = _nvml
    try:
        gpus = []
        for slot, device in enumerate(devices()):
            handle = (nvml.nvmlDeviceGetHandleByIndex(int(device)) if device.isdigit()
                      else nvml.nvmlDeviceGetHandleByUUID(device))
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            gpus.append({"gpu": slot, "device": device,
                         "name": name.decode() if isinstance(name, bytes) else name,
                         "utilization_percent": nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                         "memory_used_bytes": memory.used,
                         "memory_total_bytes": memory.total})
        return gpus
    except Exception as exc:  # a driver error: report none rather than fail a scrape
        logging.getLogger(__name__).debug("reading GPUs through NVML failed: %r", exc)
        return []


def gpu_families(gpus_by_worker: dict[str, list[dict]]) -> list[list]:
    """GPU gauges in snapshot form, labelled by worker and slot."""
    families = []
    for name, field, doc in ((GPU_UTILIZATION, "utilization_percent",
                              "GPU utilisation over the last sample period, percent"),
                             (GPU_MEMORY_USED, "memory_used_bytes", "GPU memory in use"),
                             (GPU_MEMORY_TOTAL, "memory_total_bytes", "GPU memory")):
        samples = [[name, {"worker": worker, "gpu": str(g["gpu"])}, float(g[field])]
                   for worker, gpus in gpus_by_worker.items() for g in gpus]
        if samples:
            families.append([name, "gauge", doc, samples])
    return families


# -- snapshots and exposition -----------------------------------------------------------------
def snapshot(names: Iterable[str] | None = None) -> list[list]:
    """This process's serve metrics as plain lists: ``[name, type, help, samples]``
    with samples ``[sample_name, labels, value]``.

    ``names`` restricts it to some families (the dashboard samples only latencies).
    Counters' ``_created`` samples are left out: a sum of creation times means
    nothing, and they would double the series a scrape carries.
    """
    wanted = set(names) if names is not None else None
    families = []
    for metric in REGISTRY.collect():
        if wanted is not None and metric.name not in wanted:
            continue
        samples = [[s.name, s.labels, s.value] for s in metric.samples
                   if not s.name.endswith("_created")]
        families.append([metric.name, metric.type, metric.documentation, samples])
    return families


async def worker_snapshot(names: list[str] | None = None,
                          devices: Callable[[], list[str]] = list) -> dict[str, Any]:
    """``WorkerOp.METRICS``: this worker process's snapshot, with the GPUs ``devices()``
    names (see ``gpu_snapshot``).

    Taken in a thread: with many replicas it takes milliseconds, which the worker's
    event loop, serving those replicas, should not stall for (prometheus-client's
    values are thread-safe, and the gauges only read).
    """
    loop = asyncio.get_running_loop()
    families = await loop.run_in_executor(None, snapshot, names)
    gpus = await loop.run_in_executor(None, gpu_snapshot, devices) if names is None else []
    return {"process": PROCESS_ID, "families": families, "gpus": gpus}


def merge(snapshots: Iterable[list[list]]) -> list[Metric]:
    """One family per name from several processes' snapshots; samples with equal
    names and labels are summed (see the module docstring)."""
    parts: dict[str, tuple[str, str, list]] = {}
    for families in snapshots:
        for name, kind, doc, samples in families:
            entry = parts.get(name)
            if entry is None:
                entry = parts[name] = (kind, doc, [])
            entry[2].append(samples)
    out = []
    for name, (kind, doc, sources) in parts.items():
        metric = Metric(name, doc, kind)
        if len(sources) == 1 or all(labels.get("replica") for samples in sources
                                    for _, labels, _ in samples):
            # One process, or series of replicas (each lives in one process): no two
            # samples share labels, so there is nothing to sum. The usual case.
            metric.samples = [Sample(n, labels, value) for samples in sources
                              for n, labels, value in samples]
        else:
            values: dict[tuple, float] = {}
            for samples in sources:
                for sample_name, labels, value in samples:
                    key = (sample_name, tuple(labels.items()))
                    values[key] = values.get(key, 0.0) + value
            metric.samples = [Sample(sample_name, dict(labels), value)
                              for (sample_name, labels), value in values.items()]
        out.append(metric)
    return out


class _Families:
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def text(families: list[Metric]) -> bytes:
    """Prometheus text format of merged families."""
    return generate_latest(_Families(families))  # type: ignore[arg-type]


def exposition() -> tuple[bytes, str]:
    """This process's serve metrics in Prometheus text format, and the content type."""
    return text(merge([snapshot()])), CONTENT_TYPE_LATEST


# Aggregators of the serve instances whose controller runs in this process, by
# scheduler address: a HeadOnly proxy asks its own directly instead of by RPC.
aggregators: dict[str, Any] = {}


async def instance_exposition(router: Any) -> list:
    """``/-/metrics``: the whole instance's metrics, through its controller; this
    process's alone if the controller cannot be asked (it says so in a comment)."""
    from .protocol import ControllerOp

    try:
        local = aggregators.get(router.scheduler_address)
        if local is not None:
            body = await local.exposition()
        else:
            body = await getattr(router._pool(router.scheduler_address),
                                 ControllerOp.METRICS)()
    except Exception as exc:
        body = (b"# the controller could not be asked for the instance's metrics (%s); "
                b"these are this proxy's own\n" % type(exc).__name__.encode()
                + exposition()[0])
    return [200, [["content-type", CONTENT_TYPE_LATEST]], body]
