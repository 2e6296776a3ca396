"""Losing a worker: the controller survives and replaces the replicas it hosted."""
from __future__ import annotations

import os
import signal

import requests
from distributed import Client, LocalCluster

import daskserve as serve
from conftest import free_port, wait_until


def where_am_i(*args):
    return serve.get_replica_context().replica_tag


def test_replica_on_a_lost_worker_is_replaced():
    port = free_port()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as dask_client:
        client = serve.start(dask_client, http_options={"port": port})
        try:
            client.create_backend("where", where_am_i)
            client.create_endpoint("where", backend="where", route="/where")
            handle = client.get_handle("where")
            first = handle.remote().result(timeout=30)
            pid, lost = next((pid, address) for address, (pid, actors)
                             in dask_client.run(_pid_and_actors).items() if actors)

            os.kill(pid, signal.SIGKILL)  # a crash: the nanny brings up a fresh worker

            def replacement_host():
                hosts = [a for a, (_, actors)
                         in dask_client.run(_pid_and_actors, on_error="ignore").items()
                         if actors and a != lost]
                return hosts and client.list_backends()["where"]["status"] == "RUNNING"
            wait_until(replacement_host, timeout=60, what="a replacement replica")
            second = wait_until(lambda: _answer(port), timeout=30, what="HTTP to recover")
            assert second.startswith("where#") and second != first
            assert handle.remote().result(timeout=30) == second
        finally:
            client.shutdown()


def _pid_and_actors(dask_worker):
    return os.getpid(), list(dask_worker.state.actors)


def _answer(port: int) -> str | None:
    reply = requests.get(f"http://127.0.0.1:{port}/where", timeout=10)
    return reply.text if reply.status_code == 200 else None
