"""What the controller shows: the instance's metrics and the ``/serve`` page.

Metrics are pulled, not pushed: a scrape (a proxy's ``/-/metrics``, the scheduler's
``/metrics``, ``ControllerOp.METRICS``) asks every worker for a snapshot of its
registry at that moment, all at once and each under ``WORKER_TIMEOUT_S``, so a scrape
costs nothing while nobody scrapes, shows counts as of the scrape, needs no worker
port, and a stuck worker delays it by at most that deadline (it is then left out and
counted in ``serve_metrics_unanswered_workers``).

The page's request rates and latency percentiles need history, which a scrape does
not keep: a sampler reads the proxies' end-to-end latency histograms every
``SAMPLE_S`` (from this process for a HeadOnly proxy, by RPC from the workers running
EveryNode proxies, and from nowhere else) and keeps ``HISTORY_S`` of them; rates and
percentiles come from the differences between samples, as Prometheus computes them.

The scheduler's HTTP server (the Dask dashboard's address) gets three routes, added
once per server and answering for whichever instance runs at the time: ``/serve``
(the page: plain HTML and JavaScript, nothing fetched from the internet),
``/serve/api/status`` (the JSON it reads) and ``/metrics`` (Dask's own metrics, then
the instance's).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import deque
from typing import Any

import cloudpickle
from distributed.http.scheduler.prometheus.core import PrometheusHandler
from distributed.http.utils import RequestHandler
from prometheus_client.core import GaugeMetricFamily

from daskserve import metrics
from daskserve.protocol import ControllerOp, WorkerOp

from .dashboard_page import PAGE
from .state import describe_backend

logger = logging.getLogger(__name__)

WORKER_TIMEOUT_S = 5.0
SAMPLE_S = 2.0
HISTORY_S = 300.0
LATENCY = "serve_http_request_latency_ms"


class ServeObservability:
    """The controller's metrics aggregation, traffic history and dashboard data."""

    def __init__(self, controller: Any):
        self.controller = controller
        self.scheduler = controller.scheduler
        self.history: deque[tuple[float, dict[str, tuple[float, list]]]] = deque(
            maxlen=int(HISTORY_S / SAMPLE_S) + 1)
        self._sampler: asyncio.Task | None = None
        self._merging: asyncio.Future | None = None

    async def start(self) -> "ServeObservability":
        self.scheduler.handlers[ControllerOp.METRICS] = self.exposition
        metrics.aggregators[self.scheduler.address] = self
        install_routes(self.scheduler)
        self._sampler = asyncio.ensure_future(self._sample_forever())
        return self

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        if metrics.aggregators.get(self.scheduler.address) is self:
            del metrics.aggregators[self.scheduler.address]
        self.scheduler.handlers.pop(ControllerOp.METRICS, None)

    # -- gathering ------------------------------------------------------------------------
    async def gather(self, names: list[str] | None = None,
                     workers: list[str] | None = None) -> tuple[list, dict, list]:
        """Snapshots of this process and of ``workers`` (default: all, and the
        processes of replicas that live outside their worker, as packed-env replicas
        do), each process once; the GPUs of each worker; who did not answer in time."""
        if workers is None:
            addresses = list(self.scheduler.workers)
            addresses += sorted({r.address for b in self.controller.observed.backends.values()
                                 for r in b.replicas.values()
                                 if r.address and r.address not in self.scheduler.workers})
        else:
            addresses = list(workers)

        async def ask(address: str) -> Any:
            call = getattr(self.scheduler.rpc(address), WorkerOp.METRICS)(names=names)
            return await asyncio.wait_for(call, WORKER_TIMEOUT_S)

        loop = asyncio.get_running_loop()
        local = loop.run_in_executor(None, metrics.snapshot, names)  # see ``families``
        answers = await asyncio.gather(*(ask(a) for a in addresses), return_exceptions=True)
        seen = {metrics.PROCESS_ID}
        snapshots = [await local]
        gpus: dict[str, list] = {}
        unanswered = []
        for address, answer in zip(addresses, answers):
            if not isinstance(answer, dict):
                logger.debug("worker %s gave no metrics: %r", address, answer)
                unanswered.append(address)
                continue
            if answer["process"] in seen:  # a worker in a process already counted
                continue
            seen.add(answer["process"])
            snapshots.append(answer["families"])
            if answer.get("gpus"):
                gpus[address] = answer["gpus"]
        return snapshots, gpus, unanswered

    async def families(self) -> tuple[list, dict, list]:
        """The instance's merged metric families.

        Scrapes that arrive while one is being gathered share it: ``/-/metrics`` is
        open to every HTTP client of a proxy, and however many ask at once, the
        workers are asked once at a time.
        """
        merging = self._merging
        if merging is None:
            merging = self._merging = asyncio.ensure_future(self._families())
            merging.add_done_callback(self._merged)
        return await asyncio.shield(merging)

    def _merged(self, future: asyncio.Future) -> None:
        if self._merging is future:
            self._merging = None

    async def _families(self) -> tuple[list, dict, list]:
        """Merging hundreds of replicas' series takes a while (benchmarks/
        metrics_scrape.py); it runs in a thread, so the scheduler's event loop (and a
        HeadOnly proxy on it) keeps its turn every few milliseconds instead of waiting
        for the whole merge."""
        snapshots, gpus, unanswered = await self.gather()
        merged = await asyncio.get_running_loop().run_in_executor(
            None, metrics.merge, [*snapshots, metrics.gpu_families(gpus)])
        missing = GaugeMetricFamily("serve_metrics_unanswered_workers", "Workers whose "
                                    "metrics this scrape lacks: they did not answer within "
                                    f"{WORKER_TIMEOUT_S}s")
        missing.add_metric([], len(unanswered))
        merged.append(missing)
        return merged, gpus, unanswered

    async def exposition(self) -> bytes:
        """``ControllerOp.METRICS``: the whole instance in Prometheus text format."""
        merged, _, _ = await self.families()
        return await asyncio.get_running_loop().run_in_executor(None, metrics.text, merged)

    # -- traffic history ------------------------------------------------------------------
    async def _sample_forever(self) -> None:
        while True:
            try:
                await self.sample()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a sampler failure must not end the sampling
                logger.debug("sampling endpoint latencies failed: %r", exc)
            await asyncio.sleep(SAMPLE_S)

    async def sample(self) -> None:
        """Record every endpoint's request count and latency buckets now."""
        proxies = list(self.controller.proxies.on_hosts.values())
        snapshots, _, _ = await self.gather([LATENCY], proxies)
        point: dict[str, tuple[float, list]] = {}
        for family in metrics.merge(snapshots):
            if family.name != LATENCY:
                continue
            buckets: dict[str, list] = {}
            for s in family.samples:
                endpoint = s.labels.get("endpoint", "")
                if s.name.endswith("_bucket"):
                    buckets.setdefault(endpoint, []).append((float(s.labels["le"]), s.value))
                elif s.name.endswith("_count"):
                    point[endpoint] = (s.value, [])
            for endpoint, pairs in buckets.items():
                if endpoint in point:
                    point[endpoint] = (point[endpoint][0], sorted(pairs))
        self.history.append((time.time(), point))

    def traffic(self, endpoint: str) -> dict[str, list]:
        """Rate and p50/p99 latency of an endpoint between consecutive samples."""
        out: dict[str, list] = {"t": [], "rate": [], "p50_ms": [], "p99_ms": []}
        points = list(self.history)
        for (t0, before), (t1, after) in zip(points, points[1:]):
            now, then = after.get(endpoint), before.get(endpoint, (0.0, []))
            if now is None or t1 <= t0:
                continue
            count = now[0] - then[0]
            if count < 0:  # a proxy's counts went away with it: no rate for this step
                continue
            delta = _bucket_delta(then[1], now[1])
            out["t"].append(round(t1, 3))
            out["rate"].append(round(count / (t1 - t0), 3))
            out["p50_ms"].append(_quantile(0.5, delta, count))
            out["p99_ms"].append(_quantile(0.99, delta, count))
        return out

    # -- the page's data --------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        """Everything ``/serve`` shows, in one JSON-native dict."""
        controller = self.controller
        merged, gpus, unanswered = await self.families()
        by_name = {family.name: family for family in merged}

        def per(name: str, sample: str, key: str = "replica") -> dict[str, float]:
            family = by_name.get(name)
            if family is None:
                return {}
            return {s.labels.get(key, ""): s.value for s in family.samples
                    if s.name == sample}

        in_flight = per(metrics.REPLICA_PROCESSING, metrics.REPLICA_PROCESSING)
        queued = per(metrics.REPLICA_QUEUED, metrics.REPLICA_QUEUED)
        requests = per("serve_backend_request_counter", "serve_backend_request_counter_total")
        errors = per("serve_backend_error_counter", "serve_backend_error_counter_total")
        router_queued = per(metrics.ROUTER_QUEUED, metrics.ROUTER_QUEUED, "backend")

        backends = {}
        replicas = []
        for tag, spec in controller.desired.backends.items():
            observed = controller.observed.of(tag)
            autoscaler = getattr(controller, "autoscaler", None)
            described = describe_backend(spec, observed,
                                         autoscaler.status(spec) if autoscaler else None)
            config = {k: v for k, v in described.items()
                      if k not in ("user_config", "replica_options", "replicas", "status",
                                   "pending_reason", "last_error", "autoscaling")}
            # user_config stays pickled here (the controller never unpickles user data)
            raw = spec.config.get("user_config")
            config["user_config"] = None if raw in (None, _NONE_PICKLED) else \
                f"set ({len(raw)} bytes, pickled)"
            backends[tag] = {"config": config,
                             "replica_options": described.get("replica_options"),
                             "status": described.get("status"),
                             "replicas": described.get("replicas"),
                             "pending_reason": described.get("pending_reason"),
                             "last_error": described.get("last_error"),
                             "autoscaling": described.get("autoscaling"),
                             "router_queued": router_queued.get(tag, 0)}
            for replica in observed.replicas.values():
                replicas.append({"tag": replica.tag, "backend": tag,
                                 "worker": replica.worker, "state": replica.status,
                                 "in_flight": in_flight.get(replica.tag),
                                 "queued": queued.get(replica.tag),
                                 "requests": requests.get(replica.tag),
                                 "errors": errors.get(replica.tag)})
        endpoints = {}
        for name, endpoint in controller.desired.endpoints.items():
            endpoints[name] = {**endpoint.describe(), "traffic_history": self.traffic(name)}
        return {
            "time": time.time(), "epoch": controller.epoch, "version": controller.version,
            "proxies": controller.proxies.addresses(),
            "sample_interval_s": SAMPLE_S, "history_s": HISTORY_S,
            "endpoints": endpoints, "backends": backends, "replicas": replicas,
            "gpus": [{"worker": worker, **gpu} for worker, found in gpus.items()
                     for gpu in found],
            "unanswered_workers": unanswered,
        }


_NONE_PICKLED = cloudpickle.dumps(None)  # how a client sends "no user_config"


def _bucket_delta(before: list, after: list) -> list:
    if len(before) != len(after):
        return after  # the proxy's series started within this step
    return [(le, value - old) for (le, value), (_, old) in zip(after, before)]


def _quantile(q: float, buckets: list, count: float) -> float | None:
    """Linear interpolation inside the bucket holding the q-th request, as
    Prometheus's ``histogram_quantile`` does; None without requests."""
    if count <= 0 or not buckets:
        return None
    rank = q * count
    lower, below = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(le):
                return round(lower, 3)  # beyond the last finite bound: say that bound
            if cumulative == below:
                return round(le, 3)
            return round(lower + (le - lower) * (rank - below) / (cumulative - below), 3)
        lower, below = le, cumulative
    return round(lower, 3)


# -- HTTP routes on the scheduler's dashboard server -------------------------------------------
def _observability(server: Any) -> ServeObservability | None:
    from .controller import PLUGIN_NAME

    controller = server.plugins.get(PLUGIN_NAME) if server is not None else None
    return getattr(controller, "observability", None)


class ServePageHandler(RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.write(PAGE)


class ServeStatusHandler(RequestHandler):
    async def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        observability = _observability(self.server)
        if observability is None:
            self.write(json.dumps({"running": False}))
            return
        status = await observability.status()
        self.write(json.dumps({"running": True, **status}, default=str))


class ServeMetricsHandler(PrometheusHandler):
    """Dask's ``/metrics``, followed by the serve instance's."""

    async def get(self) -> None:
        observability = _observability(self.server)
        serve = await observability.exposition() if observability is not None else b""
        super().get()
        self.write(serve)


def install_routes(scheduler: Any) -> None:
    """Add the routes to the scheduler's HTTP server, once: they find the instance
    running at each request, so a restarted instance needs no new ones (Tornado
    cannot remove routes)."""
    app = getattr(scheduler, "http_application", None)
    if app is None or getattr(app, "_daskserve_routes", False):
        return
    prefix = _prefix(app)
    app.add_handlers(r".*", [
        (prefix + "serve", ServePageHandler, {"dask_server": scheduler}),
        (prefix + "serve/", ServePageHandler, {"dask_server": scheduler}),
        (prefix + "serve/api/status", ServeStatusHandler, {"dask_server": scheduler}),
        (prefix + "metrics", ServeMetricsHandler, {"dask_server": scheduler}),
    ])
    app._daskserve_routes = True


def _prefix(app: Any) -> str:
    """The dashboard's URL prefix (``--dashboard-prefix``), read off Dask's own
    ``/metrics`` route, since the scheduler does not keep it."""
    for rule in getattr(app.wildcard_router, "rules", []):
        regex = getattr(rule.matcher, "regex", None)
        if regex is not None and regex.pattern.endswith("/metrics$"):
            return regex.pattern[:-len("metrics$")]
    return "/"
