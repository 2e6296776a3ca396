"""Batch scoring and live HTTP traffic, at once, on the same replicas.

A scikit-learn classifier is served at the HTTP route /iris. While a client keeps
calling that route, a Dask DataFrame of 200,000 flowers is scored with the same
deployed model through ``handle.map_partitions``: each partition is sent by the
task that holds it to a replica (on its own worker when there is one), so the
model is loaded once per replica and no partition passes through this process.

Run: python examples/batch_scoring.py
"""
import os
import threading

import dask.dataframe as dd
import numpy as np
import pandas as pd
import requests
from distributed import Client, LocalCluster
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

import daskserve as serve

PORT = int(os.environ.get("DASKSERVE_PORT", "8000"))
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
SPECIES = ["setosa", "versicolor", "virginica"]
PARTITIONS, ROWS = 8, 25_000


class IrisModel:
    def __init__(self, model):
        self.model = model  # unpickled once per replica

    def __call__(self, request):
        """HTTP: one flower from the query string."""
        row = [[float(request.query_params[name]) for name in FEATURES]]
        return {"species": SPECIES[int(self.model.predict(row)[0])]}

    def predict(self, flowers):
        """Batch: one partition of the DataFrame."""
        return pd.Series(self.model.predict(flowers[FEATURES].to_numpy()),
                         index=flowers.index, name="species")


def flowers(seed):
    """A partition, made where its task runs (as read_parquet would read it)."""
    rng = np.random.default_rng(seed)
    centers = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]])
    rows = centers[rng.integers(0, 3, ROWS)] + rng.normal(0, 0.3, (ROWS, 4))
    return pd.DataFrame(rows, columns=FEATURES, index=seed * ROWS + np.arange(ROWS))


def call_http_until(stop, answers):
    url = f"http://127.0.0.1:{PORT}/iris"
    flower = dict(zip(FEATURES, [6.6, 3.0, 5.6, 2.0]))
    for _ in range(100_000):  # bounded, in case stop never comes
        if stop.is_set():
            return
        reply = requests.get(url, params=flower, timeout=30)
        answers.append(reply.status_code == 200 and reply.json() == {"species": "virginica"})


if __name__ == "__main__":
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as dask_client:
        client = serve.start(dask_client, http_options={"port": PORT})
        iris = load_iris()
        model = LogisticRegression(max_iter=1000).fit(iris.data, iris.target)
        client.create_backend("iris:v1", IrisModel, model, config={"num_replicas": 2})
        client.create_endpoint("iris", backend="iris:v1", route="/iris")
        print(requests.get(f"http://127.0.0.1:{PORT}/iris",
                           params=dict(zip(FEATURES, [5.1, 3.5, 1.4, 0.2]))).json())

        ddf = dd.from_map(flowers, range(PARTITIONS), meta=flowers(0).iloc[:0])
        handle = client.get_handle("iris").options(method_name="predict")
        species = handle.map_partitions(ddf, meta=("species", "i8"))  # lazy

        stop, answers = threading.Event(), []
        http_client = threading.Thread(target=call_http_until, args=(stop, answers))
        http_client.start()
        try:
            scored = species.compute()  # the batch job, beside the live HTTP traffic
        finally:
            stop.set()
            http_client.join()

        print(f"scored {len(scored)} rows in {species.npartitions} partitions")
        print(f"HTTP requests answered while the batch job ran: {sum(answers)}, "
              f"failed: {len(answers) - sum(answers)}")
        local = model.predict(ddf.compute()[FEATURES].to_numpy())
        print("batch results match the model run locally:",
              bool((scored.sort_index().to_numpy() == local).all()))
        print("species counts:", {SPECIES[k]: int(v)
                                  for k, v in scored.value_counts().sort_index().items()})
        client.shutdown()
