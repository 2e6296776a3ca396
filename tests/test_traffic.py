"""Traffic policies: validation, canary / incremental rollout, session affinity,
in-flight safety of policy changes, shadow testing and model composition.

Weighted routing is random, so split counts are checked against exact binomial
acceptance intervals chosen so that a correct router fails a check with
probability at most 1e-6 (see ``binomial_interval``).
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import cloudpickle
import pytest
import requests

import daskserve as serve
from conftest import binomial_interval, wait_until

# Worker processes cannot import this test module; ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

RESULT_TIMEOUT = 30


def name_of(tag):
    """A backend that answers with its own name (HTTP and handle calls alike)."""
    def backend(*args):
        return tag
    return backend


def http_get_many(urls_and_headers, workers: int = 8):
    """GET each (url, headers) concurrently; returns [(status, text)] in order."""
    local = threading.local()

    def one(item):
        url, headers = item
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        resp = session.get(url, headers=headers, timeout=RESULT_TIMEOUT)
        return resp.status_code, resp.text

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, urls_and_headers))


# -- backends (module level, pickled by value) ----------------------------------------
class FileGate:
    """Each call marks that it started, then waits until a release file exists.

    State lives in files (the cluster is local), so the test observes and opens
    the gate without sending anything to the replica it is holding up.
    """

    def __init__(self, name, directory):
        self.name = name
        self.dir = directory

    async def __call__(self, *args):
        mark = uuid.uuid4().hex
        open(os.path.join(self.dir, "started-" + mark), "w").close()
        while not os.path.exists(os.path.join(self.dir, "release")):
            await asyncio.sleep(0.01)
        open(os.path.join(self.dir, "finished-" + mark), "w").close()
        return self.name


def gate_counts(directory) -> tuple[int, int]:
    names = os.listdir(directory)
    return (sum(n.startswith("started-") for n in names),
            sum(n.startswith("finished-") for n in names))


def open_gate(directory) -> None:
    open(os.path.join(str(directory), "release"), "w").close()


class Recorder:
    """Counts every call made to it."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return "shadow"

    def count(self):
        return self.calls


def failing_backend(*args):
    raise RuntimeError("shadow failure that must not reach the caller")


def times_two(x):
    return x * 2


async def plus_ten(x):
    await asyncio.sleep(0.01)
    return x + 10


def _arg(request_or_value):
    if hasattr(request_or_value, "query_params"):
        return float(request_or_value.query_params["x"])
    return request_or_value


class SyncEnsemble:
    """Sync handler composing two endpoints through sync handles (taken in __init__)."""

    def __init__(self):
        self.a = serve.get_handle("double")
        self.b = serve.get_handle("plus10")

    def __call__(self, x):
        x = _arg(x)
        fa, fb = self.a.remote(x), self.b.remote(x)
        return (fa.result(timeout=30) + fb.result(timeout=30)) / 2


class AsyncEnsemble:
    """Async handler composing two endpoints through async handles passed in."""

    def __init__(self, handle_a, handle_b):
        self.a, self.b = handle_a, handle_b

    async def __call__(self, x):
        x = _arg(x)
        ra, rb = await asyncio.wait_for(
            asyncio.gather(self.a.remote(x), self.b.remote(x)), 30)
        return (ra + rb) / 2


# -- 1. validation ----------------------------------------------------------------------
def test_binomial_interval_helper_is_sane():
    assert binomial_interval(2000, 0.0) == (0, 0)
    assert binomial_interval(2000, 1.0) == (2000, 2000)
    lo, hi = binomial_interval(2000, 0.5)
    assert lo < 1000 < hi and 1000 - lo == hi - 1000
    assert 100 < hi - 1000 < 150  # about 4.9 standard deviations (sd ~ 22.4)


def test_set_traffic_validation(serve_client):
    serve_client.create_backend("a", name_of("a"), replica_options={"num_cpus": 0.5})
    serve_client.create_backend("b", name_of("b"), replica_options={"num_cpus": 0.5})
    serve_client.create_endpoint("e", backend="a", route="/e")
    assert serve_client.list_endpoints()["e"]["traffic"] == {"a": 1.0}
    assert serve_client.list_endpoints()["e"]["shadows"] == {}

    with pytest.raises(ValueError, match="'a'"):
        serve_client.set_traffic("e", {"a": -0.5, "b": 1.5})
    with pytest.raises(ValueError, match="sum to 1"):
        serve_client.set_traffic("e", {"a": 0.5, "b": 0.4})
    with pytest.raises(ValueError, match="sum to 1"):
        serve_client.set_traffic("e", {"a": 0.5, "b": 0.5 + 1e-4})
    with pytest.raises(ValueError, match="no-such-backend"):
        serve_client.set_traffic("e", {"no-such-backend": 1.0})
    with pytest.raises(ValueError, match="no-such-endpoint"):
        serve_client.set_traffic("no-such-endpoint", {"a": 1.0})
    with pytest.raises(TypeError, match="dict"):
        serve_client.set_traffic("e", [("a", 1.0)])
    with pytest.raises((TypeError, ValueError)):
        serve_client.set_traffic("e", {})
    with pytest.raises(TypeError, match="'a'"):
        serve_client.set_traffic("e", {"a": "1.0"})
    # Nothing above changed the policy.
    assert serve_client.list_endpoints()["e"]["traffic"] == {"a": 1.0}

    # Within the tolerance of 1e-6 a sum is accepted.
    serve_client.set_traffic("e", {"a": 0.3, "b": 0.7 + 1e-9})
    traffic = serve_client.list_endpoints()["e"]["traffic"]
    assert set(traffic) == {"a", "b"} and abs(traffic["a"] - 0.3) < 1e-12

    # An endpoint created without a backend has no policy until set_traffic.
    serve_client.create_endpoint("bare")
    assert serve_client.list_endpoints()["bare"]["traffic"] == {}
    serve_client.set_traffic("bare", {"b": 1.0})
    assert serve_client.get_handle("bare").remote().result(RESULT_TIMEOUT) == "b"


# -- 2. canary and rollout ----------------------------------------------------------------
def _count_b(handle, n: int) -> int:
    futures = [handle.remote() for _ in range(n)]
    answers = [f.result(RESULT_TIMEOUT) for f in futures]
    assert set(answers) <= {"a", "b"}, set(answers)
    return answers.count("b")


def test_canary_rollout_and_rollback_follow_weights(serve_client, base_url):
    serve_client.create_backend("a", name_of("a"), replica_options={"num_cpus": 0.5})
    serve_client.create_backend("b", name_of("b"), replica_options={"num_cpus": 0.5})
    serve_client.create_endpoint("canary", backend="a", route="/canary")
    handle = serve_client.get_handle("canary")
    n = 2000

    assert _count_b(handle, n) == 0
    for weight_b in (0.01, 0.5):
        serve_client.set_traffic("canary", {"a": 1 - weight_b, "b": weight_b})
        assert serve_client.list_endpoints()["canary"]["traffic"] == {
            "a": pytest.approx(1 - weight_b), "b": pytest.approx(weight_b)}
        lo, hi = binomial_interval(n, weight_b)
        got = _count_b(handle, n)
        assert lo <= got <= hi, f"b served {got}/{n} at weight {weight_b}; " \
                                f"accepted [{lo}, {hi}]"

    # Weights 0 and 1 are exact.
    serve_client.set_traffic("canary", {"a": 0.0, "b": 1.0})
    assert _count_b(handle, n) == n
    # Rollback.
    serve_client.set_traffic("canary", {"a": 1.0})
    assert serve_client.list_endpoints()["canary"]["traffic"] == {"a": 1.0}
    assert _count_b(handle, n) == 0

    # HTTP follows the same policy: 50/50 over 400 requests.
    serve_client.set_traffic("canary", {"a": 0.5, "b": 0.5})
    answers = http_get_many([(f"{base_url}/canary", None)] * 400)
    assert all(status == 200 for status, _ in answers)
    got = sum(text == "b" for _, text in answers)
    lo, hi = binomial_interval(400, 0.5)
    assert lo <= got <= hi, f"b served {got}/400 HTTP requests; accepted [{lo}, {hi}]"


# -- 3. session affinity --------------------------------------------------------------------
def test_shard_key_affinity_over_http_and_handles(serve_client, base_url):
    serve_client.create_backend("a", name_of("a"), replica_options={"num_cpus": 0.5})
    serve_client.create_backend("b", name_of("b"), replica_options={"num_cpus": 0.5})
    serve_client.create_endpoint("sharded", backend="a", route="/sharded")
    serve_client.set_traffic("sharded", {"a": 0.3, "b": 0.7})
    url = f"{base_url}/sharded"
    keys = [f"user-{i}" for i in range(1000)]

    first = http_get_many([(url, {"X-SERVE-SHARD-KEY": k}) for k in keys])
    assert all(status == 200 for status, _ in first)
    by_http = {k: text for k, (_, text) in zip(keys, first)}

    # The same key always maps to the same backend (repeat a subset over HTTP).
    again = http_get_many([(url, {"X-SERVE-SHARD-KEY": k}) for k in keys[:200] * 3])
    assert [text for _, text in again] == [by_http[k] for k in keys[:200] * 3]

    # A handle with the same shard key agrees with HTTP.
    handle = serve_client.get_handle("sharded")
    futures = [handle.options(shard_key=k).remote() for k in keys]
    by_handle = {k: f.result(RESULT_TIMEOUT) for k, f in zip(keys, futures)}
    assert by_handle == by_http

    # Over many keys the split follows the weights.
    got = sum(v == "b" for v in by_http.values())
    lo, hi = binomial_interval(len(keys), 0.7)
    assert lo <= got <= hi, f"{got}/{len(keys)} keys map to b; accepted [{lo}, {hi}]"


# -- 4. traffic changes keep in-flight requests -----------------------------------------------
def test_traffic_change_does_not_drop_in_flight_requests(serve_client, base_url, tmp_path):
    serve_client.create_backend("a", FileGate, "a", str(tmp_path),
                                replica_options={"num_cpus": 0.5})
    serve_client.create_backend("b", name_of("b"), replica_options={"num_cpus": 0.5})
    serve_client.create_endpoint("switch", backend="a", route="/switch")
    handle = serve_client.get_handle("switch")

    pool = ThreadPoolExecutor(20)
    try:
        http_futures = [pool.submit(requests.get, f"{base_url}/switch",
                                    timeout=RESULT_TIMEOUT) for _ in range(20)]
        handle_futures = [handle.remote() for _ in range(10)]
        # Every request is executing on "a" (held in the gate) ...
        wait_until(lambda: gate_counts(tmp_path) == (30, 0), 30,
                   what="30 requests to start on a")
        # ... when the traffic moves to "b".
        serve_client.set_traffic("switch", {"b": 1.0})
        assert handle.remote().result(RESULT_TIMEOUT) == "b"
        assert requests.get(f"{base_url}/switch", timeout=RESULT_TIMEOUT).text == "b"
        assert gate_counts(tmp_path) == (30, 0)
        open_gate(tmp_path)

        responses = [f.result(timeout=RESULT_TIMEOUT) for f in http_futures]
        assert [(r.status_code, r.text) for r in responses] == [(200, "a")] * 20
        assert [f.result(RESULT_TIMEOUT) for f in handle_futures] == ["a"] * 10
        assert gate_counts(tmp_path) == (30, 30)
    finally:
        open_gate(tmp_path)
        pool.shutdown(wait=False, cancel_futures=True)


# -- 5. shadow testing -----------------------------------------------------------------------
def _settled_count(dask_client, control, backend: str) -> int:
    """The shadow's call count once no router holds a copy for it any longer.

    Shadow copies leave from two routers: the HTTP proxy's (in the scheduler) and
    this process's handle router. When neither has one in flight or waiting, every
    copy has run and the count is final.
    """
    from daskserve.handle import _router_for
    from scheduler_plugin import PLUGIN_NAME

    def proxy_load(dask_scheduler, backend=backend, name=PLUGIN_NAME):
        return dask_scheduler.plugins[name].proxies.head.router.load(backend)

    handle_router, _ = _router_for(control.scheduler_address)
    wait_until(lambda: handle_router.load(backend) == 0
               and dask_client.run_on_scheduler(proxy_load) == 0,
               20, what=f"routers to hold no copy for {backend!r}")
    return control.options(method_name="count").remote().result(RESULT_TIMEOUT)


def test_shadow_traffic(serve_client, base_url, tmp_path, dask_client):
    serve_client.create_backend("primary", name_of("primary"),
                                replica_options={"num_cpus": 0.5})
    serve_client.create_backend("recorder", Recorder, replica_options={"num_cpus": 0.5})
    serve_client.create_endpoint("e", backend="primary", route="/e")
    serve_client.create_endpoint("recorder-control", backend="recorder")
    recorder = serve_client.get_handle("recorder-control")
    handle = serve_client.get_handle("e")
    url = f"{base_url}/e"

    # Every request is duplicated; callers see only the primary.
    serve_client.shadow_traffic("e", "recorder", 1.0)
    assert serve_client.list_endpoints()["e"]["shadows"] == {"recorder": 1.0}
    assert serve_client.list_endpoints()["e"]["traffic"] == {"primary": 1.0}
    answers = http_get_many([(url, None)] * 20)
    assert answers == [(200, "primary")] * 20
    assert [handle.remote().result(RESULT_TIMEOUT) for _ in range(10)] == ["primary"] * 10
    wait_until(lambda: recorder.options(method_name="count").remote().result(
        RESULT_TIMEOUT) == 30, 20, what="30 shadowed calls")

    # A backend still shadowed cannot be deleted.
    with pytest.raises(ValueError, match="'e'"):
        serve_client.delete_backend("recorder")
    assert "recorder" in serve_client.list_backends()

    # A failing shadow never fails the caller.
    serve_client.create_backend("broken", failing_backend, replica_options={"num_cpus": 0.5})
    serve_client.shadow_traffic("e", "broken", 1.0)
    assert http_get_many([(url, None)] * 10) == [(200, "primary")] * 10
    assert [handle.remote().result(RESULT_TIMEOUT) for _ in range(5)] == ["primary"] * 5
    serve_client.shadow_traffic("e", "broken", 0)
    assert "broken" not in serve_client.list_endpoints()["e"]["shadows"]
    serve_client.delete_backend("broken")

    # A slow shadow never holds the primary back: the primary's answer arrives
    # while the shadow copy is still running (blocked in its gate).
    gate_dir = tmp_path / "slow-shadow"
    gate_dir.mkdir()
    serve_client.create_backend("slow", FileGate, "slow", str(gate_dir),
                                replica_options={"num_cpus": 0.5})
    serve_client.shadow_traffic("e", "slow", 1.0)
    try:
        assert requests.get(url, timeout=RESULT_TIMEOUT).text == "primary"
        assert handle.remote().result(RESULT_TIMEOUT) == "primary"
        wait_until(lambda: gate_counts(gate_dir)[0] == 2, 20,
                   what="the slow shadow to receive 2 copies")
        assert gate_counts(gate_dir) == (2, 0)
    finally:
        open_gate(gate_dir)
    wait_until(lambda: gate_counts(gate_dir) == (2, 2), 20, what="the slow shadow to finish")
    serve_client.shadow_traffic("e", "slow", 0)

    # Proportion 0 stops shadowing.
    base = _settled_count(dask_client, recorder, "recorder")
    serve_client.shadow_traffic("e", "recorder", 0)
    assert serve_client.list_endpoints()["e"]["shadows"] == {}
    assert http_get_many([(url, None)] * 20) == [(200, "primary")] * 20
    assert [handle.remote().result(RESULT_TIMEOUT) for _ in range(10)] == ["primary"] * 10
    assert _settled_count(dask_client, recorder, "recorder") == base

    # Proportion p shadows about p of the requests.
    p, n = 0.3, 1000
    serve_client.shadow_traffic("e", "recorder", p)
    assert serve_client.list_endpoints()["e"]["shadows"] == {"recorder": pytest.approx(p)}
    futures = [handle.remote() for _ in range(n)]
    assert all(f.result(RESULT_TIMEOUT) == "primary" for f in futures)
    got = _settled_count(dask_client, recorder, "recorder") - base
    lo, hi = binomial_interval(n, p)
    assert lo <= got <= hi, f"{got}/{n} requests shadowed at p={p}; accepted [{lo}, {hi}]"

    # Once no longer shadowed (and not in traffic), it can be deleted.
    serve_client.shadow_traffic("e", "recorder", 0)
    serve_client.delete_endpoint("recorder-control")
    serve_client.delete_backend("recorder")
    assert "recorder" not in serve_client.list_backends()
    assert handle.remote().result(RESULT_TIMEOUT) == "primary"


def test_delete_backend_refuses_one_that_receives_traffic(serve_client):
    serve_client.create_backend("a", name_of("a"), replica_options={"num_cpus": 0.5})
    serve_client.create_backend("b", name_of("b"), replica_options={"num_cpus": 0.5})
    serve_client.create_endpoint("split", backend="a")
    serve_client.set_traffic("split", {"a": 0.5, "b": 0.5})
    with pytest.raises(ValueError, match="'split'"):
        serve_client.delete_backend("b")
    serve_client.set_traffic("split", {"a": 1.0})
    serve_client.delete_backend("b")
    assert set(serve_client.list_backends()) == {"a"}
    assert serve_client.get_handle("split").remote().result(RESULT_TIMEOUT) == "a"


# -- 6. composition ----------------------------------------------------------------------
def test_model_composition_ensemble_with_sync_and_async_handles(serve_client, base_url):
    small = {"num_cpus": 0.5}
    serve_client.create_backend("double", times_two, replica_options=small)
    serve_client.create_backend("plus10", plus_ten, replica_options=small)
    serve_client.create_endpoint("double", backend="double")
    serve_client.create_endpoint("plus10", backend="plus10")

    serve_client.create_backend("ens-sync", SyncEnsemble, replica_options=small)
    serve_client.create_backend(
        "ens-async", AsyncEnsemble,
        serve_client.get_handle("double", sync=False),
        serve_client.get_handle("plus10", sync=False),
        replica_options=small)
    serve_client.create_endpoint("ens-sync", backend="ens-sync", route="/ens-sync")
    serve_client.create_endpoint("ens-async", backend="ens-async", route="/ens-async")

    def expected(x):
        return (x * 2 + x + 10) / 2

    for name in ("ens-sync", "ens-async"):
        handle = serve_client.get_handle(name)
        futures = [handle.remote(x) for x in range(30)]
        assert [f.result(RESULT_TIMEOUT) for f in futures] == [expected(x) for x in range(30)]

        answers = http_get_many([(f"{base_url}/{name}?x={x}", None) for x in range(30)])
        assert all(status == 200 for status, _ in answers), answers
        assert [float(text) for _, text in answers] == [expected(x) for x in range(30)]

    # Both ensembles at once, from a driver-side async handle too.
    async def drive():
        handles = [serve_client.get_handle(n, sync=False) for n in ("ens-sync", "ens-async")]
        calls = [h.remote(x) for x in range(20) for h in handles]
        return await asyncio.wait_for(asyncio.gather(*calls), RESULT_TIMEOUT)

    results = asyncio.run(drive())
    assert results == [expected(x) for x in range(20) for _ in range(2)]
