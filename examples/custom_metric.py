"""Define your own metrics in a backend; read them with the built-in ones.

A backend creates ``serve.metrics.Counter/Gauge/Histogram`` objects (usually in
``__init__``) and records into them; daskserve tags every value with the backend and
replica that recorded it and serves them beside its own metrics at the proxy's
``/-/metrics`` and the Dask dashboard's ``/metrics``.

Run: python examples/custom_metric.py
"""
import os

import requests
from distributed import Client, LocalCluster
from prometheus_client.parser import text_string_to_metric_families

import daskserve as serve

PORT = int(os.environ.get("DASKSERVE_PORT", "8000"))


class Classifier:
    def __init__(self):
        self.predictions = serve.metrics.Counter(
            "classifier_predictions", "Predictions made, by predicted label",
            tag_keys=("label", "model_version"))
        self.predictions.set_default_tags({"model_version": "v1"})
        self.score = serve.metrics.Histogram(
            "classifier_score", "Scores of the predictions", boundaries=[0.25, 0.5, 0.75])
        self.threshold = serve.metrics.Gauge("classifier_threshold", "Decision threshold")
        self.threshold.set(0.5)

    def __call__(self, request):
        score = float(request.query_params["score"])
        label = "cat" if score >= 0.5 else "dog"
        self.predictions.inc(tags={"label": label})
        self.score.observe(score)
        return {"label": label}


if __name__ == "__main__":
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as dask_client:
        client = serve.start(dask_client, http_options={"port": PORT})
        client.create_backend("classifier", Classifier)
        client.create_endpoint("classifier", backend="classifier", route="/classify")

        for score in (0.9, 0.8, 0.1):
            requests.get(f"http://127.0.0.1:{PORT}/classify", params={"score": score})

        text = requests.get(f"http://127.0.0.1:{PORT}/-/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in ("classifier_predictions_total", "classifier_score_count",
                                   "classifier_threshold",
                                   "serve_backend_request_counter_total"):
                    labels = dict(sample.labels)
                    labels["replica"] = "classifier#..." if labels.get("replica") else ""
                    tags = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
                    print(f"{sample.name}{{{tags}}} {sample.value}")
        client.shutdown()
