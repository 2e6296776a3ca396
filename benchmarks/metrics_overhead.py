"""What metrics and the access log add to each request, measured in one process.

    python benchmarks/metrics_overhead.py [--n 200000]

A throughput A/B through the whole serving path (``run.py`` on two versions) cannot
resolve a few microseconds on a shared 2-core machine, so this times the added calls
themselves, exactly as the request path makes them, against the same loop without
them:

- proxy side, per HTTP request: ``ProxyObserver.begin`` and ``done`` (count, latency
  histogram, access-log test), the router's request counter and its trace read;
  with the access log off, on (lines to /dev/null), and main's single uncached
  ``record_http`` for comparison;
- replica side, per request: the wrapper ``instrument_replica`` puts around
  ``ReplicaExecutor._run`` (count and processing-time histogram), awaited on an
  event loop, against the bare coroutine.

Stand-ins replace the proxy's connection objects and the executor: only the
attributes the hooks read exist.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time

from prometheus_client import Counter, CollectorRegistry

from daskserve import metrics
from daskserve.context import ReplicaContext


class _StartLine:
    method = "GET"


class _Exchange:
    start_line = _StartLine()
    client = ("127.0.0.1", 5000)
    started = 0.0


class _Router:
    endpoints = {"noop": object()}


class _Options:
    def __init__(self, access_log: bool):
        self.access_log = access_log


def per_call_us(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def proxy_side(access_log: bool):
    observer = metrics.ProxyObserver(_Options(access_log))
    exchange, router = _Exchange(), _Router()
    now = time.perf_counter

    def request() -> None:
        exchange.started = now()
        observer.begin()
        metrics.router_request(router, "noop")
        trace = metrics.access_trace()
        if trace is not None:
            trace.note("noop", "noop#0")
        observer.done(exchange, "/noop", 200, "noop")
    return request


def main_record_http():
    """main's hook: one uncached ``labels()`` lookup and ``inc`` per request."""
    registry = CollectorRegistry()
    counter = Counter("serve_num_http_requests", "x", ["route", "method", "status",
                                                       "endpoint"], registry=registry)
    return lambda: counter.labels("/noop", "GET", "200", "noop").inc()


class _Executor:
    def __init__(self) -> None:
        self.context = ReplicaContext("noop", "noop#0", "tcp://127.0.0.1:1")
        self._methods: dict = {}
        self.in_flight = 0

    async def _run(self, name, args, kwargs):
        return "ok"


async def replica_side(n: int) -> tuple[float, float]:
    bare = _Executor()
    wrapped = _Executor()
    metrics.instrument_replica(wrapped)

    async def loop(executor: _Executor) -> float:
        run = executor._run
        start = time.perf_counter()
        for _ in range(n):
            await run("__call__", (), {})
        return (time.perf_counter() - start) / n * 1e6

    return await loop(bare), await loop(wrapped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    args = parser.parse_args()
    access = logging.getLogger("daskserve.access")
    access.addHandler(logging.StreamHandler(open(os.devnull, "w")))
    access.propagate = False

    rounds = []
    for _ in range(3):  # interleaved, so drift on a shared machine hits all alike
        rounds.append((per_call_us(lambda: None, args.n),
                       per_call_us(main_record_http(), args.n),
                       per_call_us(proxy_side(False), args.n),
                       per_call_us(proxy_side(True), args.n // 10),
                       *asyncio.run(replica_side(args.n))))
    empty, main, off, on, bare, wrapped = (min(r[i] for r in rounds) for i in range(6))
    print(f"best of 3 rounds, {args.n:,} calls each (access log on: {args.n // 10:,})\n")
    print("| per request | µs |\n|---|---|")
    print(f"| proxy side, main's `record_http` (uncached labels) | {main - empty:.2f} |")
    print(f"| proxy side, now, access log off (counter, latency, router count, trace) "
          f"| {off - empty:.2f} |")
    print(f"| proxy side, now, access log on (one JSON line to /dev/null) | "
          f"{on - empty:.2f} |")
    print(f"| replica side, `_run` wrapper (count + processing histogram) | "
          f"{wrapped - bare:.2f} |")


if __name__ == "__main__":
    main()
