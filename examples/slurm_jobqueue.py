"""Serve a model on an HPC cluster: SLURM jobs are the Dask workers (dask-jobqueue).

Run on a machine that can submit SLURM jobs, with dask-jobqueue installed:
    python examples/slurm_jobqueue.py

The controller and the HTTP proxy run in this process (next to the Dask scheduler),
the replicas inside the SLURM jobs. Queue, account and the rest come from your
dask-jobqueue config file (~/.config/dask/jobqueue.yaml) as usual; only what this
example needs is passed here.
"""
import os
import time

import requests
from dask_jobqueue import SLURMCluster
from distributed import Client

import daskserve as serve

PORT = int(os.environ.get("DASKSERVE_PORT", "8000"))


class Model:
    def __init__(self, weight):
        self.weight = weight  # stands in for loading weights, once per replica

    def __call__(self, request):
        x = float(request.query_params["x"])
        return {"y": self.weight * x, "slurm_job": os.environ.get("SLURM_JOB_ID")}


def wait_for(condition, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        time.sleep(0.5)


def jobs_answering(url, n=40):
    return {requests.get(url, params={"x": 1}).json()["slurm_job"] for _ in range(n)}


if __name__ == "__main__":
    # Two cores per job: one job can host both replicas after scaling down.
    cluster = SLURMCluster(cores=2, processes=1, memory="2GB", walltime="00:20:00",
                           scheduler_options={"dashboard_address": ":0"})
    dask_client = Client(cluster)
    cluster.scale(jobs=2)
    dask_client.wait_for_workers(2, timeout=120)

    client = serve.start(dask_client, http_options={"port": PORT})
    client.create_backend("model", Model, 2.0, config={"num_replicas": 2})
    client.create_endpoint("model", backend="model", route="/model")

    url = f"http://127.0.0.1:{PORT}/model"
    reply = requests.get(url, params={"x": 3}).json()
    print({"y": reply["y"]})
    print(f"replicas answer from {len(jobs_answering(url))} SLURM job(s)")

    # Give one job back to the queue: its replica moves to the job that is left.
    cluster.scale(jobs=1)
    wait_for(lambda: len(dask_client.scheduler_info(n_workers=-1)["workers"]) == 1,
             "one worker")
    wait_for(lambda: client.list_backends()["model"]["status"] == "RUNNING",
             "both replicas running")
    print(f"after scale(jobs=1): replicas answer from {len(jobs_answering(url))} "
          f"SLURM job(s)")
    print(client.list_backends()["model"]["replicas"])

    client.shutdown()
    dask_client.close()
    cluster.close()  # cancels the jobs
