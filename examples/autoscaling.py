"""Replicas follow the load, and an adaptive Dask cluster follows the replicas.

One single-threaded worker to begin with, and ``cluster.adapt`` allowing three. A
burst of HTTP requests makes the backend want three replicas; two fit on no worker,
so the cluster starts workers for them. When the burst ends the backend drains back
to one replica and the emptied workers are retired.

Run: python examples/autoscaling.py
"""
import os
import threading
import time

import requests
from distributed import Client, LocalCluster

import daskserve as serve

PORT = int(os.environ.get("DASKSERVE_PORT", "8000"))


def model(request):
    time.sleep(0.2)  # a fixed service time
    return "ok"


def wait_for(what, condition, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what}")
        time.sleep(0.25)


if __name__ == "__main__":
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as dask_client:
        cluster.adapt(minimum=1, maximum=3, interval="500ms", wait_count=2)
        client = serve.start(dask_client, http_options={"port": PORT})
        client.create_backend("model", model, config={"autoscaling_config": {
            "min_replicas": 1, "max_replicas": 3,
            "target_num_ongoing_requests_per_replica": 2,
            "upscale_delay_s": 1.0, "downscale_delay_s": 3.0}})
        client.create_endpoint("model", backend="model", route="/model")
        url = f"http://127.0.0.1:{PORT}/model"

        def workers():
            return len(dask_client.scheduler_info(n_workers=-1)["workers"])

        def running():
            return client.list_backends()["model"]["replicas"].get("running", 0)

        burst = threading.Event()
        failures = []

        def caller():
            with requests.Session() as session:
                while burst.is_set():
                    if session.get(url, timeout=60).status_code != 200:
                        failures.append(1)

        burst.set()
        callers = [threading.Thread(target=caller) for _ in range(8)]
        for thread in callers:
            thread.start()
        wait_for("3 replicas", lambda: running() == 3 and workers() == 3)
        print(f"under load: {running()} replicas on {workers()} workers")
        print("why:", client.list_backends()["model"]["autoscaling"]["reason"])

        burst.clear()
        for thread in callers:
            thread.join()
        wait_for("the cluster to shrink", lambda: running() == 1 and workers() == 1)
        print(f"after the load: {running()} replica on {workers()} worker")
        print("why:", client.list_backends()["model"]["autoscaling"]["reason"])
        print(f"failed requests: {len(failures)}")
        client.shutdown()
