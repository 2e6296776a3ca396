"""Serve a stateless function over HTTP and call it from Python.

Run: python examples/quickstart_function.py
"""
import os

import requests
from distributed import Client, LocalCluster

import daskserve as serve

PORT = int(os.environ.get("DASKSERVE_PORT", "8000"))


def echo(request):
    return {"you_sent": request.query_params.get("text", "")}


if __name__ == "__main__":
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as dask_client:
        client = serve.start(dask_client, http_options={"port": PORT})
        client.create_backend("echo", echo)
        client.create_endpoint("echo", backend="echo", route="/echo")

        print(requests.get(f"http://127.0.0.1:{PORT}/echo", params={"text": "hi"}).json())
        client.shutdown()
