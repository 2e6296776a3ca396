"""Serve a stateful class: one instance per replica, built with init arguments.

Run: python examples/quickstart_class.py
"""
import os

import requests
from distributed import Client, LocalCluster

import daskserve as serve

PORT = int(os.environ.get("DASKSERVE_PORT", "8000"))


class Counter:
    def __init__(self, start):
        self.count = start

    def __call__(self, request):
        self.count += 1
        return {"count": self.count}

    def peek(self):
        return self.count


if __name__ == "__main__":
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as dask_client:
        client = serve.start(dask_client, http_options={"port": PORT})
        client.create_backend("counter", Counter, 100)
        client.create_endpoint("counter", backend="counter", route="/counter")

        for _ in range(3):
            print(requests.get(f"http://127.0.0.1:{PORT}/counter").json())
        handle = client.get_handle("counter")
        print("peek via handle:", handle.options(method_name="peek").remote().result())
        client.shutdown()
