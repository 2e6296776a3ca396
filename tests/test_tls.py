"""A cluster secured with Dask's TLS ``Security``: control calls, the proxy's routes
to replicas and handles all travel over TLS and work."""
from __future__ import annotations

import requests
from distributed import Client, LocalCluster
from distributed.security import Security

import daskserve as serve
from conftest import free_port


def answer(*args):
    return "over tls"


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
            assert requests.get(f"http://127.0.0.1:{port}/answer", timeout=30).text == \
                "over tls"
            assert client.get_handle("answer").remote().result(timeout=30) == "over tls"
        finally:
            client.shutdown()
