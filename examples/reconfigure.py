"""Change a model's parameters at runtime with user_config and reconfigure().

Run: python examples/reconfigure.py
"""
import os

import requests
from distributed import Client, LocalCluster

import daskserve as serve

PORT = int(os.environ.get("DASKSERVE_PORT", "8000"))


class Threshold:
    def __init__(self):
        self.threshold = None

    def reconfigure(self, config):
        # Called at start and whenever user_config changes, on every replica.
        self.threshold = config["threshold"]

    def __call__(self, request):
        score = float(request.query_params["score"])
        return {"score": score, "threshold": self.threshold,
                "accept": score > self.threshold}


if __name__ == "__main__":
    with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=":0") as cluster, \
            Client(cluster) as dask_client:
        client = serve.start(dask_client, http_options={"port": PORT})
        client.create_backend("threshold", Threshold,
                              config={"num_replicas": 2, "user_config": {"threshold": 0.2}})
        client.create_endpoint("threshold", backend="threshold", route="/threshold")
        url = f"http://127.0.0.1:{PORT}/threshold?score=0.5"

        print(requests.get(url).json())
        client.update_backend_config("threshold", {"user_config": {"threshold": 0.9}})
        print(requests.get(url).json())
        client.shutdown()
