"""Shared fixtures: one real LocalCluster per session, a fresh serve instance per test.

Each test gets its own HTTP port so that a proxy still closing from the previous
test can never answer for the next one.
"""
from __future__ import annotations

import math
import os
import random
import socket
import subprocess
import time

import pytest
from distributed import Client, LocalCluster

import daskserve as serve


def _ephemeral_ports() -> range:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            low, high = map(int, ports.read().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default


_EPHEMERAL = _ephemeral_ports()
_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now that neither the kernel nor this session hands out again.

    A port the kernel picked (``bind(0)``) is released at once and may go next to
    any Dask listener or outgoing connection before the test binds it. Ports below
    the ephemeral range are only ever taken by asking for them by number.
    """
    rng = random.Random()
    for _ in range(10_000):
        port = rng.randrange(10_000, 65_536)
        if port in _handed_out or port in _EPHEMERAL:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port outside the ephemeral range")


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn_logged(args: list, log_path, env: dict | None = None) -> tuple:
    """Start ``args`` from the repository root with its output in ``log_path``.

    Returns the process and the open log file; the test closes both. Output goes to a
    file, not a pipe, so that a chatty process can never block on a full pipe."""
    log = open(log_path, "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    return proc, log


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited 15 s later."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def close_all(dask_client: Client | None, processes: list, logs: list) -> None:
    """Close a test's client, if any, then stop its processes (last started first)."""
    if dask_client is not None:
        dask_client.close(timeout=10)
    for proc in reversed(processes):
        stop_process(proc)
    for log in logs:
        log.close()


def wait_until(predicate, timeout: float = 60, interval: float = 0.05,
               what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy (and return that)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def dask_client():
    # Two worker processes with two threads each: four CPU slots for replicas.
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        yield client


@pytest.fixture
def http_port() -> int:
    return free_port()


@pytest.fixture
def serve_client(dask_client, http_port):
    client = serve.start(dask_client, http_options={"port": http_port})
    yield client
    client.shutdown()


@pytest.fixture
def base_url(serve_client, http_port) -> str:
    return f"http://127.0.0.1:{http_port}"


@pytest.fixture
def own_serve(dask_client, http_port):
    """Start serve instances with custom http_options; shut them down afterwards."""
    started = []

    def start(**options):
        client = serve.start(dask_client, http_options={"port": http_port, **options})
        started.append(client)
        return client

    yield start
    for client in started:
        client.shutdown()


def binomial_interval(n: int, p: float, alpha: float = 1e-6) -> tuple[int, int]:
    """Acceptance interval [lo, hi] for Binomial(n, p).

    P(X < lo) <= alpha/2 and P(X > hi) <= alpha/2, so a correct router lands
    outside with probability <= alpha. Exact tails by summing the pmf (log-space).
    """
    if p <= 0:
        return 0, 0
    if p >= 1:
        return n, n
    log_p, log_q = math.log(p), math.log1p(-p)
    lg_n1 = math.lgamma(n + 1)
    pmf = [math.exp(lg_n1 - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                    + k * log_p + (n - k) * log_q) for k in range(n + 1)]
    lo, tail = 0, 0.0
    while lo < n and tail + pmf[lo] <= alpha / 2:
        tail += pmf[lo]
        lo += 1
    hi, tail = n, 0.0
    while hi > 0 and tail + pmf[hi] <= alpha / 2:
        tail += pmf[hi]
        hi -= 1
    return lo, hi
