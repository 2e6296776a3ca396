"""Prometheus metrics of this process, exposed at ``/-/metrics``.

Each process (proxy host, worker, client) keeps its own registry so that serve
metrics never mix with whatever else the process registers globally.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from .config import HTTP_METHODS

REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter(
    "serve_num_http_requests", "HTTP requests answered by this proxy",
    ["route", "method", "status", "endpoint"], registry=REGISTRY)


def record_http(route: str, method: str, status: int, endpoint: str) -> None:
    """Count one answered request.

    Every distinct label set is a series kept for the life of the process, so
    labels must come from bounded sets, never from what a client may invent:
    ``route`` is an endpoint's route, a built-in route or "" (callers ensure it),
    and a method outside the standard ones counts as "other".
    """
    if method not in HTTP_METHODS:
        method = "other"
    HTTP_REQUESTS.labels(route, method, str(status), endpoint).inc()


def exposition() -> tuple[bytes, str]:
    """The registry in Prometheus text format and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
