"""Model composition: an ensemble backend that calls two other endpoints.

The ensemble's async handler awaits both models concurrently through async
handles; each model scales on its own.

Run: python examples/composition.py
"""
import asyncio
import os

import requests
from distributed import Client, LocalCluster

import daskserve as serve

PORT = int(os.environ.get("DASKSERVE_PORT", "8000"))


def linear_model(x):
    return 2 * x + 1


def square_model(x):
    return x * x


class Ensemble:
    def __init__(self):
        self.models = [serve.get_handle("linear", sync=False),
                       serve.get_handle("square", sync=False)]

    async def __call__(self, request):
        x = float(request.query_params["x"])
        scores = await asyncio.gather(*(m.remote(x) for m in self.models))
        return {"x": x, "scores": scores, "mean": sum(scores) / len(scores)}


if __name__ == "__main__":
    with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=":0") as cluster, \
            Client(cluster) as dask_client:
        client = serve.start(dask_client, http_options={"port": PORT})
        small = {"num_cpus": 0.5}
        client.create_backend("linear", linear_model, replica_options=small)
        client.create_endpoint("linear", backend="linear")
        client.create_backend("square", square_model, replica_options=small)
        client.create_endpoint("square", backend="square")
        client.create_backend("ensemble", Ensemble, replica_options=small)
        client.create_endpoint("ensemble", backend="ensemble", route="/ensemble")

        print(requests.get(f"http://127.0.0.1:{PORT}/ensemble", params={"x": 3}).json())
        client.shutdown()
