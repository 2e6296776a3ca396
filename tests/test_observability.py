"""Metrics, custom metrics, the /serve page's JSON and the access log, on a real cluster.

Counts are read from real scrapes and compared with the requests each test sent.
Names carry a random suffix: the session's processes keep their registries across
tests, so a test must never count another's series.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import daskserve as serve
from daskserve import metrics as serve_metrics
from daskserve.gpus import count_gpus

from conftest import free_port, wait_until

TIMEOUT = 30


def flaky(request):
    if request.query_params.get("fail"):
        raise RuntimeError("asked to fail")
    return "ok"


class Calls:
    def __call__(self, x):
        if x < 0:
            raise ValueError("negative")
        return x


class Summer:
    @serve.accept_batch
    def __call__(self, xs):
        return [x + 1 for x in xs]


class Tagged:
    def __init__(self):
        self.seen = serve.metrics.Counter("obs_test_seen", "inputs seen",
                                          tag_keys=("colour",))
        self.seen.set_default_tags({"colour": "grey"})
        self.size = serve.metrics.Histogram("obs_test_size", "input sizes",
                                            boundaries=[1, 10], tag_keys=("colour",))
        self.level = serve.metrics.Gauge("obs_test_level", "last input")

    def __call__(self, x, colour=None):
        tags = {"colour": colour} if colour else None
        self.seen.inc(tags=tags)
        self.size.observe(x, tags={"colour": colour or "grey"})
        self.level.set(x)
        return x

    def bad_tag(self):
        self.seen.inc(tags={"flavour": "x"})


def name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:6]}"


def scrape(url: str) -> dict[tuple, float]:
    """Every sample of a Prometheus text page, as {(sample name, labels): value}."""
    text = requests.get(url, timeout=TIMEOUT).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, sample_name: str, **labels: str) -> float:
    return sum(value for (n, key), value in samples.items() if n == sample_name
               and all(dict(key).get(k) == v for k, v in labels.items()))


def dashboard(dask_client) -> str:
    return dask_client.dashboard_link.rsplit("/", 1)[0]


# -- the nine built-in metrics, counted ------------------------------------------------------
def test_counts_equal_the_requests_sent(dask_client, serve_client, base_url):
    backend, endpoint = name("flaky"), name("ep")
    serve_client.create_backend(backend, flaky, config={"num_replicas": 2})
    serve_client.create_endpoint(endpoint, backend=backend, route=f"/{endpoint}")
    calls_backend, calls_endpoint = name("calls"), name("calls_ep")
    serve_client.create_backend(calls_backend, Calls)
    serve_client.create_endpoint(calls_endpoint, backend=calls_backend)

    ok, failing, handle_ok, handle_failing = 7, 3, 5, 2
    with requests.Session() as session:
        for _ in range(ok):
            assert session.get(f"{base_url}/{endpoint}", timeout=TIMEOUT).status_code == 200
        for _ in range(failing):
            assert session.get(f"{base_url}/{endpoint}?fail=1",
                               timeout=TIMEOUT).status_code == 500
    handle = serve_client.get_handle(calls_endpoint)
    assert [handle.remote(i).result(TIMEOUT) for i in range(handle_ok)] == list(range(handle_ok))
    for _ in range(handle_failing):
        with pytest.raises(ValueError, match="negative"):
            handle.remote(-1).result(TIMEOUT)

    for url in (f"{base_url}/-/metrics", f"{dashboard(dask_client)}/metrics"):
        s = scrape(url)
        http = "serve_num_http_requests_total"
        assert total(s, http, endpoint=endpoint, status="200", route=f"/{endpoint}",
                     method="GET") == ok
        assert total(s, http, endpoint=endpoint, status="500") == failing
        assert total(s, "serve_http_request_latency_ms_count",
                     endpoint=endpoint) == ok + failing
        assert total(s, "serve_num_router_requests_total", endpoint=endpoint) == ok + failing
        assert total(s, "serve_num_router_requests_total",
                     endpoint=calls_endpoint) == handle_ok + handle_failing
        # replicas' own counts, pulled from the worker processes
        assert total(s, "serve_backend_request_counter_total", backend=backend) == ok + failing
        assert total(s, "serve_backend_error_counter_total", backend=backend) == failing
        assert total(s, "serve_backend_request_counter_total",
                     backend=calls_backend) == handle_ok + handle_failing
        assert total(s, "serve_backend_error_counter_total",
                     backend=calls_backend) == handle_failing
        assert total(s, "serve_backend_processing_latency_ms_count",
                     backend=backend) == ok + failing
        replicas = {dict(k)["replica"] for (n, k) in s
                    if n == "serve_backend_request_counter_total"
                    and dict(k)["backend"] == backend}
        assert len(replicas) == 2  # labelled per replica: both served some
        assert total(s, "serve_backend_replica_starts_total", backend=backend) == 2
        for gauge in ("serve_replica_queued_queries", "serve_replica_processing_queries"):
            assert {dict(k)["replica"] for (n, k) in s if n == gauge
                    and dict(k)["backend"] == backend} == replicas
            assert total(s, gauge, backend=backend) == 0  # nothing in flight now
        assert total(s, "serve_router_queued_queries", backend=backend) == 0
        assert total(s, "serve_metrics_unanswered_workers") == 0


def test_scaling_down_removes_the_replicas_series(serve_client, base_url):
    backend = name("scaled")
    serve_client.create_backend(backend, flaky, config={"num_replicas": 2})
    serve_client.create_endpoint(backend, backend=backend, route=f"/{backend}")
    for _ in range(4):
        requests.get(f"{base_url}/{backend}", timeout=TIMEOUT)

    def replicas() -> set[str]:
        s = scrape(f"{base_url}/-/metrics")
        return {dict(k)["replica"] for (n, k) in s
                if n == "serve_replica_processing_queries" and dict(k)["backend"] == backend}

    assert len(replicas()) == 2
    serve_client.update_backend_config(backend, {"num_replicas": 1})
    wait_until(lambda: len(replicas()) == 1, timeout=30, what="the drained replica's series")


def test_batches_record_their_sizes_and_waits(serve_client, base_url):
    backend = name("summer")
    serve_client.create_backend(backend, Summer, config={
        "max_batch_size": 4, "batch_wait_timeout": 0.5, "max_concurrent_queries": 8})
    serve_client.create_endpoint(backend, backend=backend)
    handle = serve_client.get_handle(backend)
    futures = [handle.remote(i) for i in range(8)]
    assert [f.result(TIMEOUT) for f in futures] == [i + 1 for i in range(8)]
    s = scrape(f"{base_url}/-/metrics")
    batches = total(s, "serve_replica_batch_size_count", backend=backend)
    assert total(s, "serve_replica_batch_size_sum", backend=backend) == 8
    assert 2 <= batches <= 8  # how the eight split depends on arrival, not their total
    assert total(s, "serve_backend_queuing_latency_ms_count", backend=backend) == 8
    assert total(s, "serve_backend_processing_latency_ms_count", backend=backend) == 8
    assert total(s, "serve_backend_request_counter_total", backend=backend) == 8


def test_every_node_proxy_serves_the_instances_metrics(dask_client, own_serve, http_port):
    client = own_serve(location="EveryNode")
    backend = name("everynode")
    client.create_backend(backend, flaky)
    client.create_endpoint(backend, backend=backend, route=f"/{backend}")
    url = f"http://127.0.0.1:{http_port}"
    for _ in range(3):
        assert requests.get(f"{url}/{backend}", timeout=TIMEOUT).status_code == 200
    s = scrape(f"{url}/-/metrics")  # a proxy in a worker, asking the controller by RPC
    assert total(s, "serve_num_http_requests_total", endpoint=backend, status="200") == 3
    assert total(s, "serve_backend_request_counter_total", backend=backend) == 3
    # the proxy lives in a worker: its counts reach the scheduler's /metrics as well
    s = scrape(f"{dashboard(dask_client)}/metrics")
    assert total(s, "serve_num_http_requests_total", endpoint=backend, status="200") == 3


# -- custom metrics --------------------------------------------------------------------------
def test_custom_metrics_are_tagged_with_backend_and_replica(serve_client, base_url):
    backend = name("tagged")
    serve_client.create_backend(backend, Tagged, config={"num_replicas": 2})
    serve_client.create_endpoint(backend, backend=backend)
    handle = serve_client.get_handle(backend)
    for x, colour in ((3, None), (5, "red"), (20, "red")):
        assert handle.remote(x, colour=colour).result(TIMEOUT) == x

    s = scrape(f"{base_url}/-/metrics")
    seen = {(dict(k)["colour"], dict(k)["replica"]): v for (n, k), v in s.items()
            if n == "obs_test_seen_total" and dict(k)["backend"] == backend}
    assert sum(v for (colour, _), v in seen.items() if colour == "grey") == 1
    assert sum(v for (colour, _), v in seen.items() if colour == "red") == 2
    running = {r for (_, r) in seen}
    assert running and all(r.startswith(f"{backend}#") for r in running)
    assert total(s, "obs_test_size_count", backend=backend) == 3
    assert total(s, "obs_test_size_bucket", backend=backend, colour="red", le="10.0") == 1
    assert {dict(k)["replica"] for (n, k) in s if n == "obs_test_level"
            and dict(k)["backend"] == backend} <= running

    with pytest.raises(ValueError, match="tag key 'flavour' was not declared"):
        handle.options(method_name="bad_tag").remote().result(TIMEOUT)


def test_custom_metric_definitions_are_checked():
    with pytest.raises(ValueError, match="built-in daskserve metric"):
        serve.metrics.Counter("serve_num_http_requests", "mine")
    with pytest.raises(ValueError, match="built-in daskserve metric"):
        serve.metrics.Counter("serve_backend_request_counter_total", "mine")
    with pytest.raises(ValueError, match="starts with one of"):
        serve.metrics.Gauge("dask_scheduler_workers", "mine")
    with pytest.raises(ValueError, match="added automatically"):
        serve.metrics.Counter(name("c"), "x", tag_keys=("replica",))
    with pytest.raises(ValueError, match="metric name must match"):
        serve.metrics.Counter("has-dash", "x")
    with pytest.raises(TypeError, match="tuple of strings"):
        serve.metrics.Counter(name("c"), "x", tag_keys="model")

    metric = name("defined")
    first = serve.metrics.Counter(metric, "x", tag_keys=("a",))
    again = serve.metrics.Counter(metric, "x", tag_keys=("a",))  # a second replica's __init__
    assert again._family is first._family
    with pytest.raises(ValueError, match="already defined in this process as Counter"):
        serve.metrics.Counter(metric, "x", tag_keys=("b",))
    with pytest.raises(ValueError, match="already defined in this process as Counter"):
        serve.metrics.Gauge(metric, "x", tag_keys=("a",))
    with pytest.raises(ValueError, match="no value for tag"):
        first.inc()
    with pytest.raises(ValueError, match="can only go up"):
        first.inc(-1, tags={"a": "x"})
    with pytest.raises(TypeError, match="must be a string"):
        first.inc(tags={"a": 3})
    first.inc(2, tags={"a": "x"})  # outside a replica: backend and replica are empty
    text = serve_metrics.exposition()[0].decode()
    assert f'{metric}_total{{a="x",backend="",replica=""}} 2.0' in text


def test_metrics_module_keeps_its_functions():
    from daskserve.metrics import Counter, Gauge, Histogram, exposition, record_http

    assert serve.metrics.Counter is Counter and Gauge and Histogram
    body, content_type = exposition()
    assert content_type.startswith("text/plain") and isinstance(body, bytes)
    record_http("", "BREW", 404, "")  # a made-up method counts as "other"
    assert 'method="other"' in exposition()[0].decode()


# -- the /serve page's JSON ------------------------------------------------------------------
def test_status_json_describes_the_instance_and_its_traffic(dask_client, serve_client,
                                                            base_url):
    backend = name("status")
    serve_client.create_backend(backend, flaky, config={"num_replicas": 2,
                                                        "user_config": None})
    serve_client.create_endpoint(backend, backend=backend, route=f"/{backend}",
                                 methods=["GET", "POST"])
    pending = name("pending")
    serve_client.create_backend(pending, flaky, replica_options={"resources": {"TPU": 1}})
    url = f"{dashboard(dask_client)}/serve/api/status"

    status = requests.get(url, timeout=TIMEOUT).json()
    assert status["running"] is True
    endpoint = status["endpoints"][backend]
    assert endpoint["route"] == f"/{backend}" and endpoint["methods"] == ["GET", "POST"]
    assert endpoint["traffic"] == {backend: 1.0}
    b = status["backends"][backend]
    assert b["status"] == "RUNNING" and b["config"]["num_replicas"] == 2
    assert b["config"]["user_config"] is None and b["last_error"] is None
    assert status["backends"][pending]["status"] == "PENDING"
    assert "TPU" in status["backends"][pending]["pending_reason"]
    mine = [r for r in status["replicas"] if r["backend"] == backend]
    assert len(mine) == 2
    workers = set(dask_client.scheduler_info()["workers"])
    for replica in mine:
        assert replica["state"] == "running" and replica["worker"] in workers
        assert replica["in_flight"] == 0 and replica["queued"] == 0
    assert status["gpus"] == [] or count_gpus()

    # Traffic shows as a rate once the sampler has seen it.
    sent = 0

    def rate_seen() -> bool:
        nonlocal sent
        for _ in range(5):
            requests.get(f"{base_url}/{backend}", timeout=TIMEOUT)
            sent += 1
        history = requests.get(url, timeout=TIMEOUT).json()["endpoints"][backend][
            "traffic_history"]
        return any(r > 0 for r in history["rate"]) and any(
            p is not None and p > 0 for p in history["p99_ms"])

    wait_until(rate_seen, timeout=60, interval=0.2, what="a request rate on the page's data")
    status = requests.get(url, timeout=TIMEOUT).json()
    assert sum(r["requests"] for r in status["replicas"] if r["backend"] == backend) == sent


def test_serve_page_is_self_contained(dask_client, serve_client):
    reply = requests.get(f"{dashboard(dask_client)}/serve", timeout=TIMEOUT)
    assert reply.status_code == 200 and "text/html" in reply.headers["content-type"]
    page = reply.text
    assert "/api/status" in page and "<canvas" not in page  # canvases are made by the script
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere


# -- access log ------------------------------------------------------------------------------
class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


@pytest.fixture
def access_lines():
    logger = logging.getLogger("daskserve.access")
    handler = _Lines()
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def test_access_log_is_off_by_default(serve_client, base_url, access_lines):
    backend = name("quiet")
    serve_client.create_backend(backend, flaky)
    serve_client.create_endpoint(backend, backend=backend, route=f"/{backend}")
    assert requests.get(f"{base_url}/{backend}", timeout=TIMEOUT).status_code == 200
    assert access_lines == []


def test_access_log_writes_one_line_per_request(own_serve, http_port, access_lines):
    client = own_serve(access_log=True)
    backend = name("logged")
    client.create_backend(backend, flaky)
    client.create_endpoint(backend, backend=backend, route=f"/{backend}")
    url = f"http://127.0.0.1:{http_port}"
    assert requests.get(f"{url}/{backend}", timeout=TIMEOUT).status_code == 200
    assert requests.get(f"{url}/{backend}?fail=1", timeout=TIMEOUT).status_code == 500
    assert requests.get(f"{url}/nowhere/{backend}", timeout=TIMEOUT).status_code == 404
    assert requests.post(f"{url}/{backend}", timeout=TIMEOUT).status_code == 405

    lines = [line for line in access_lines if line["endpoint"] == backend
             or line["status"] == 404]
    assert [(line["method"], line["status"]) for line in lines] == [
        ("GET", 200), ("GET", 500), ("GET", 404), ("POST", 405)]
    ok, failed, missing, refused = lines
    replica = ok["replica"]
    assert replica.startswith(f"{backend}#") and ok["backend"] == backend
    assert failed["replica"] == replica and ok["route"] == f"/{backend}"
    assert missing["route"] == "" and missing["backend"] is None  # no path echoed
    assert refused["backend"] is None and refused["route"] == f"/{backend}"
    for line in lines:
        assert line["latency_ms"] >= 0 and line["client"] == "127.0.0.1"


def test_access_log_option_is_checked(dask_client):
    with pytest.raises(TypeError, match="http_options.access_log"):
        serve.start(dask_client, http_options={"port": free_port(), "access_log": "yes"})


# -- GPUs ------------------------------------------------------------------------------------
def test_gpu_figures_where_gpus_exist(dask_client, serve_client, base_url):
    found = dask_client.run(count_gpus)
    if not any(found.values()):
        pytest.skip("no NVIDIA GPU visible to the workers (NVML finds none): GPU figures "
                    "are only shown where GPUs exist, never invented")
    s = scrape(f"{base_url}/-/metrics")
    for worker, gpus in found.items():
        for slot in range(gpus):
            for gauge in ("serve_gpu_utilization_percent", "serve_gpu_memory_used_bytes",
                          "serve_gpu_memory_total_bytes"):
                assert total(s, gauge, worker=worker, gpu=str(slot)) >= 0
            assert total(s, "serve_gpu_memory_total_bytes", worker=worker,
                         gpu=str(slot)) > 0
    status = requests.get(f"{dashboard(dask_client)}/serve/api/status",
                          timeout=TIMEOUT).json()
    assert len(status["gpus"]) == sum(found.values())


def test_router_queue_gauge_sees_waiting_requests(serve_client, base_url, tmp_path):
    """Requests past max_concurrent_queries wait in the router, and the gauge says so."""
    backend = name("gate")
    gate = tmp_path / "open"
    serve_client.create_backend(backend, Gate, str(gate),
                                config={"max_concurrent_queries": 1})
    serve_client.create_endpoint(backend, backend=backend)
    handle = serve_client.get_handle(backend)
    futures = [handle.remote(i) for i in range(4)]
    try:
        def gauges() -> tuple[float, float, float]:
            s = scrape(f"{base_url}/-/metrics")
            return (total(s, "serve_router_queued_queries", backend=backend),
                    total(s, "serve_router_in_flight_queries", backend=backend),
                    total(s, "serve_replica_processing_queries", backend=backend))

        # one request runs (held by the gate), the other three wait in this router
        wait_until(lambda: gauges() == (3, 1, 1), timeout=30,
                   what="three requests waiting in the router, one running")
    finally:
        gate.touch()
    assert [f.result(TIMEOUT) for f in futures] == [0, 1, 2, 3]
    assert gauges() == (0, 0, 0)


class Gate:
    """Holds every call until the test creates a file (workers share this machine)."""

    def __init__(self, path):
        self.path = path

    def __call__(self, x):
        for _ in range(600):  # at most a minute
            if os.path.exists(self.path):
                return x
            time.sleep(0.1)
        raise TimeoutError("the test never opened the gate")


def test_concurrent_scrapes_agree(serve_client, base_url):
    backend = name("conc")
    serve_client.create_backend(backend, flaky)
    serve_client.create_endpoint(backend, backend=backend, route=f"/{backend}")
    for _ in range(3):
        requests.get(f"{base_url}/{backend}", timeout=TIMEOUT)
    with ThreadPoolExecutor(4) as pool:
        scrapes = list(pool.map(lambda _: scrape(f"{base_url}/-/metrics"), range(4)))
    counts = {total(s, "serve_backend_request_counter_total", backend=backend)
              for s in scrapes}
    assert counts == {3}


# -- replicas in their own process (packed environments) -------------------------------------
def plain_answer(request):
    return "from a packed env"


@pytest.mark.slow
def test_packed_env_replicas_metrics_reach_the_scrape(tmp_path, monkeypatch):
    """A packed-env replica runs in a child process of its worker, with a server of its
    own: the controller asks that process too."""
    import sys
    from pathlib import Path

    import cloudpickle

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from conflicting_dependencies import make_venv

    monkeypatch.setenv("DASKSERVE_PACK_CACHE", str(tmp_path / "packs"))
    monkeypatch.setenv("DASKSERVE_ENV_CACHE", str(tmp_path / "unpacked"))  # workers inherit
    env = serve.PackedEnv.from_venv(make_venv(str(tmp_path / "venv")))
    # The env's interpreter cannot import this test module: send its functions by value.
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        _serve_from_packed_env(env)
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def _serve_from_packed_env(env) -> None:
    from distributed import Client, LocalCluster

    port = free_port()
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as dask_client:
        client = serve.start(dask_client, http_options={"port": port})
        try:
            backend = name("packed")
            client.create_backend(backend, plain_answer, replica_options={"env": env})
            client.create_endpoint(backend, backend=backend, route=f"/{backend}")
            for _ in range(3):
                assert requests.get(f"http://127.0.0.1:{port}/{backend}",
                                    timeout=TIMEOUT).text == "from a packed env"
            s = scrape(f"http://127.0.0.1:{port}/-/metrics")
            assert total(s, "serve_backend_request_counter_total", backend=backend) == 3
            assert total(s, "serve_metrics_unanswered_workers") == 0
            replica = next(dict(k)["replica"] for (n, k) in s
                           if n == "serve_replica_processing_queries"
                           and dict(k)["backend"] == backend)
            status = requests.get(f"{dashboard(dask_client)}/serve/api/status",
                                  timeout=TIMEOUT).json()
            mine = [r for r in status["replicas"] if r["tag"] == replica]
            assert mine and mine[0]["requests"] == 3 and mine[0]["in_flight"] == 0
        finally:
            client.shutdown()
