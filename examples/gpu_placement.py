"""Place replicas by GPU share: two half-GPU backends share one GPU worker.

The cluster here declares a ``GPU`` resource so the example runs anywhere; on
real GPU nodes (e.g. dask-cuda) workers need no flag: daskserve finds their
NVIDIA GPUs and sets CUDA_VISIBLE_DEVICES for each replica.

Run: python examples/gpu_placement.py
"""
import os

from distributed import Client, LocalCluster

import daskserve as serve


def model(*args):
    ctx = serve.get_replica_context()
    return {"backend": ctx.backend_tag, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}


if __name__ == "__main__":
    with LocalCluster(n_workers=1, threads_per_worker=2, resources={"GPU": 1},
                      dashboard_address=":0") as cluster, Client(cluster) as dask_client:
        client = serve.start(dask_client, http_options={"location": "NoServer"})
        for name in ("model_a", "model_b", "model_c"):
            client.create_backend(name, model,
                                  replica_options={"num_gpus": 0.5, "num_cpus": 0.5})
            client.create_endpoint(name, backend=name)
        for name, info in client.list_backends().items():
            print(name, info["status"], info["replicas"])
        print(client.get_handle("model_a").remote().result(timeout=30))
        client.shutdown()
