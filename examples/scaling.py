"""Scale a backend up and down at runtime while requests keep flowing.

Run: python examples/scaling.py
"""
import os
from concurrent.futures import ThreadPoolExecutor

import requests
from distributed import Client, LocalCluster

import daskserve as serve

PORT = int(os.environ.get("DASKSERVE_PORT", "8000"))


def whoami(request):
    return serve.get_replica_context().replica_tag


def replicas_seen(url, n=200):
    with ThreadPoolExecutor(8) as pool:
        return set(pool.map(lambda _: requests.get(url).text, range(n)))


if __name__ == "__main__":
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as dask_client:
        client = serve.start(dask_client, http_options={"port": PORT})
        # Half a CPU each, so four replicas fit on two single-threaded workers.
        client.create_backend("whoami", whoami, replica_options={"num_cpus": 0.5})
        client.create_endpoint("whoami", backend="whoami", route="/whoami")
        url = f"http://127.0.0.1:{PORT}/whoami"

        for count in (4, 1):
            client.update_backend_config("whoami", {"num_replicas": count})
            print(f"num_replicas={count}: served by {len(replicas_seen(url))} replica(s)")
        print(client.list_backends()["whoami"]["replicas"])
        client.shutdown()
