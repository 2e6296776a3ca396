"""Shared fixtures: one real LocalCluster per session, a fresh serve instance per test.

Each test gets its own HTTP port so that a proxy still closing from the previous
test can never answer for the next one.
"""
from __future__ import annotations

import socket
import time

import pytest
from distributed import Client, LocalCluster

import daskserve as serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
