"""A cluster secured with Dask's TLS ``Security``: control calls, the proxy's routes
to replicas and handles all travel over TLS and work."""
from __future__ import annotations

import threading

import requests
from distributed import Client, LocalCluster
from distributed.security import Security

import daskserve as serve
from conftest import free_port


def answer(*args):
    return f"over tls in {threading.current_thread().name}"


def test_serving_on_a_tls_cluster():
    security = Security.temporary()
    port = free_port()
    with LocalCluster(n_workers=1, threads_per_worker=1, security=security,
                      dashboard_address=":0") as cluster, \
            Client(cluster, security=security) as dask_client:
        assert cluster.scheduler_address.startswith("tls://")
        client = serve.start(dask_client, http_options={"port": port})
        try:
            client.create_backend("answer", answer)
            client.create_endpoint("answer", backend="answer", route="/answer")
            handle = client.get_handle("answer")
            replies = [requests.get(f"http://127.0.0.1:{port}/answer", timeout=30).text,
                       handle.remote().result(timeout=30)]
            # Later lone requests take the thread lane, which speaks TLS too.
            replies += [requests.get(f"http://127.0.0.1:{port}/answer", timeout=30).text,
                        handle.remote().result(timeout=30)]
            assert all(reply.startswith("over tls in ") for reply in replies), replies
            assert replies[2:] == ["over tls in daskserve-lane"] * 2, replies
        finally:
            client.shutdown()
