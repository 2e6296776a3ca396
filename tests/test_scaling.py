"""Backend configuration, scaling and placement.

Covers ``BackendConfig`` validation and updates, scaling a backend up and down
while requests keep flowing, the ``max_concurrent_queries`` limit, ``user_config``
/ ``reconfigure``, and where replicas go: fractional GPUs, custom resources,
pending replicas that start once a fitting worker joins, ``OMP_NUM_THREADS`` and
``env_vars``, and (on machines with NVIDIA GPUs) ``CUDA_VISIBLE_DEVICES``.
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import uuid

import cloudpickle
import pytest
import requests
from distributed import Client, LocalCluster

import daskserve as serve
from conftest import wait_until
from daskserve import BackendConfig

# Worker processes cannot import this test module; ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

RESULT_TIMEOUT = 60


# -- backends (module level, pickled by value) ---------------------------------------
def replica_tag_backend(*args):
    return serve.get_replica_context().replica_tag


def slow_replica_tag_backend(*args):
    time.sleep(0.005)  # keeps requests in flight while replicas come and go
    return serve.get_replica_context().replica_tag


def echo_backend(x=None):
    return x


class ConcurrencyProbe:
    """Tracks how many requests run at once inside this replica."""

    def __init__(self):
        self.cur = 0
        self.max_seen = 0

    async def __call__(self, *args):
        self.cur += 1
        self.max_seen = max(self.max_seen, self.cur)
        try:
            await asyncio.sleep(0.05)
        finally:
            self.cur -= 1
        return "ok"

    def peak(self):
        return self.max_seen

    def reset(self):
        self.max_seen = 0
        return True


class HeldAndFast:
    """``__call__`` waits until a release file exists; ``ping`` answers at once."""

    def __init__(self, directory):
        self.dir = directory

    async def __call__(self, *args):
        open(os.path.join(self.dir, "started-" + uuid.uuid4().hex), "w").close()
        while not os.path.exists(os.path.join(self.dir, "release")):
            await asyncio.sleep(0.01)
        return "held"

    def ping(self):
        return "pong"


class Configurable:
    """Records every ``user_config`` it is reconfigured with."""

    def __init__(self):
        self.history = []

    def reconfigure(self, user_config):
        self.history.append(user_config)

    def __call__(self, *args):
        return (serve.get_replica_context().replica_tag,
                self.history[-1] if self.history else None,
                list(self.history))


class EnvProbe:
    """Captures the environment the replica was constructed in."""

    def __init__(self, *names):
        self.seen = {name: os.environ.get(name) for name in names}

    def __call__(self, *args):
        return self.seen


# -- 1. BackendConfig validation ------------------------------------------------------
def test_backend_config_class_defaults_and_validation():
    config = BackendConfig()
    assert config.to_dict() == {"num_replicas": 1, "max_batch_size": None,
                                "batch_wait_timeout": 0.0, "max_concurrent_queries": 100,
                                "user_config": None, "max_queued_requests": -1,
                                "queue_timeout_s": 30.0, "autoscaling_config": None,
                                "health_check_period_s": 10.0,
                                "health_check_timeout_s": 30.0, "sync_threads": None}
    assert BackendConfig(num_replicas=3, max_concurrent_queries=7).num_replicas == 3

    bad = [
        ({"num_replicas": -1}, ValueError, "num_replicas"),
        ({"num_replicas": 1.5}, TypeError, "num_replicas"),
        ({"num_replicas": "2"}, TypeError, "num_replicas"),
        ({"max_concurrent_queries": 0}, ValueError, "max_concurrent_queries"),
        ({"max_concurrent_queries": True}, TypeError, "max_concurrent_queries"),
        ({"batch_wait_timeout": -0.5}, ValueError, "batch_wait_timeout"),
        ({"batch_wait_timeout": float("nan")}, ValueError, "batch_wait_timeout"),
        ({"max_batch_size": 0}, ValueError, "max_batch_size"),
    ]
    for kwargs, exc_type, field_name in bad:
        with pytest.raises(exc_type, match=field_name):
            BackendConfig(**kwargs)


def test_backend_config_dict_and_class_forms_and_updates(serve_client):
    # Class form.
    serve_client.create_backend("cls", echo_backend,
                                config=BackendConfig(num_replicas=2, max_concurrent_queries=9),
                                replica_options={"num_cpus": 0.5})
    # Dict form.
    serve_client.create_backend("dct", echo_backend,
                                config={"max_concurrent_queries": 5},
                                replica_options={"num_cpus": 0.5})

    listed = serve_client.list_backends()
    assert listed["cls"]["num_replicas"] == 2
    assert listed["cls"]["max_concurrent_queries"] == 9
    assert listed["dct"]["num_replicas"] == 1
    assert listed["dct"]["max_concurrent_queries"] == 5
    for field_name in ("num_replicas", "max_batch_size", "batch_wait_timeout",
                       "max_concurrent_queries", "user_config"):
        assert field_name in listed["cls"] and field_name in listed["dct"]
    assert serve_client.get_backend_config("cls") == BackendConfig(num_replicas=2,
                                                                   max_concurrent_queries=9)

    # A full BackendConfig replaces every field.
    serve_client.update_backend_config("cls", BackendConfig(max_concurrent_queries=3))
    assert serve_client.get_backend_config("cls") == BackendConfig(num_replicas=1,
                                                                   max_concurrent_queries=3)
    assert serve_client.list_backends()["cls"]["num_replicas"] == 1

    # A partial dict changes only the fields it names.
    serve_client.update_backend_config("dct", {"num_replicas": 2})
    assert serve_client.get_backend_config("dct") == BackendConfig(num_replicas=2,
                                                                   max_concurrent_queries=5)
    serve_client.update_backend_config("dct", {"max_concurrent_queries": 11})
    assert serve_client.get_backend_config("dct") == BackendConfig(num_replicas=2,
                                                                   max_concurrent_queries=11)

    # Both still serve after the updates.
    serve_client.create_endpoint("ecls", backend="cls")
    serve_client.create_endpoint("edct", backend="dct")
    assert serve_client.get_handle("ecls").remote(1).result(RESULT_TIMEOUT) == 1
    assert serve_client.get_handle("edct").remote(2).result(RESULT_TIMEOUT) == 2


def test_backend_config_invalid_fields_name_the_field(serve_client):
    # Unknown field names on create: refused, and nothing is created.
    with pytest.raises((ValueError, TypeError), match="num_replica"):
        serve_client.create_backend("typo", echo_backend, config={"num_replica": 2})
    with pytest.raises((ValueError, TypeError), match="max_concurrent_queries"):
        serve_client.create_backend("neg", echo_backend, config={"max_concurrent_queries": -3})
    with pytest.raises((ValueError, TypeError), match="num_cpu"):
        serve_client.create_backend("opt", echo_backend, replica_options={"num_cpu": 1})
    with pytest.raises((ValueError, TypeError), match="num_gpus"):
        serve_client.create_backend("gpu", echo_backend, replica_options={"num_gpus": -1})
    with pytest.raises((ValueError, TypeError), match="env_vars"):
        serve_client.create_backend("env", echo_backend,
                                    replica_options={"env_vars": {"X": 1}})
    with pytest.raises(TypeError, match="config"):
        serve_client.create_backend("lst", echo_backend, config=[("num_replicas", 2)])
    assert not set(serve_client.list_backends()) & {"typo", "neg", "opt", "gpu", "env", "lst"}

    # Invalid updates: refused, naming the field, and the config is unchanged.
    serve_client.create_backend("b", echo_backend, config={"max_concurrent_queries": 4},
                                replica_options={"num_cpus": 0.5})
    before = serve_client.get_backend_config("b")
    with pytest.raises((ValueError, TypeError), match="num_replicas"):
        serve_client.update_backend_config("b", {"num_replicas": -1})
    with pytest.raises((ValueError, TypeError), match="bogus_field"):
        serve_client.update_backend_config("b", {"bogus_field": 1})
    with pytest.raises((ValueError, TypeError), match="batch_wait_timeout"):
        serve_client.update_backend_config("b", {"batch_wait_timeout": "soon"})
    with pytest.raises((ValueError, TypeError), match="max_concurrent_queries"):
        serve_client.update_backend_config("b", {"max_concurrent_queries": 0})
    assert serve_client.get_backend_config("b") == before
    assert serve_client.list_backends()["b"]["max_concurrent_queries"] == 4

    # Unknown backend.
    with pytest.raises(ValueError, match="no-such-backend"):
        serve_client.update_backend_config("no-such-backend", {"num_replicas": 2})


def test_create_backend_returns_with_its_replicas_running(serve_client):
    # Right after serve.start: the workers of the cluster can host these replicas,
    # so create_backend returns only once they run (as update_backend_config does).
    serve_client.create_backend("ready", replica_tag_backend,
                                config={"num_replicas": 2},
                                replica_options={"num_cpus": 0.5})
    entry = serve_client.list_backends()["ready"]
    assert (entry["status"], entry["replicas"]) == ("RUNNING", {"running": 2})


# -- 2. scaling under load -------------------------------------------------------------
def test_scale_up_and_down_under_continuous_traffic(serve_client, base_url):
    serve_client.create_backend("scaled", slow_replica_tag_backend,
                                replica_options={"num_cpus": 0.5})
    serve_client.create_endpoint("scaled", backend="scaled", route="/scaled")

    phase = {"name": "one"}
    results: list[tuple[str, int, str]] = []  # (phase at send time, status, body)
    lock = threading.Lock()
    stop = threading.Event()
    max_requests_per_thread = 3000
    hard_deadline = time.monotonic() + 60

    def client_loop():
        with requests.Session() as session:
            for _ in range(max_requests_per_thread):
                if stop.is_set() or time.monotonic() > hard_deadline:
                    return
                sent_in = phase["name"]
                try:
                    resp = session.get(f"{base_url}/scaled", timeout=30)
                    outcome = (sent_in, resp.status_code, resp.text)
                except requests.RequestException as exc:
                    outcome = (sent_in, -1, repr(exc))
                with lock:
                    results.append(outcome)

    def seen(name):
        with lock:
            return [r for r in results if r[0] == name]

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(seen("one")) >= 20, 20, what="traffic on one replica")

        phase["name"] = "scaling-up"
        serve_client.update_backend_config("scaled", {"num_replicas": 4})
        assert serve_client.list_backends()["scaled"]["replicas"] == {"running": 4}
        phase["name"] = "four"
        wait_until(lambda: (len({r[2] for r in seen("four") if r[1] == 200}) >= 4
                            and len(seen("four")) >= 100) or len(seen("four")) >= 1500,
                   30, what="requests on four replicas")
        four_tags = {r[2] for r in seen("four") if r[1] == 200}

        phase["name"] = "scaling-down"
        serve_client.update_backend_config("scaled", {"num_replicas": 1})
        assert serve_client.list_backends()["scaled"]["replicas"] == {"running": 1}
        phase["name"] = "one-again"
        wait_until(lambda: len(seen("one-again")) >= 100, 20, what="traffic after scale-down")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=40)

    with lock:
        failures = [r for r in results if r[1] != 200]
        total = len(results)
    assert total > 0
    assert failures == [], f"{len(failures)} of {total} requests failed, e.g. {failures[:5]}"
    assert len(four_tags) == 4, f"only {four_tags} answered while 4 replicas ran"
    final_tags = {r[2] for r in seen("one-again")}
    assert len(final_tags) == 1 and final_tags <= four_tags


# -- 3. max_concurrent_queries ------------------------------------------------------------
def test_max_concurrent_queries_is_never_exceeded(serve_client, base_url):
    serve_client.create_backend("limited", ConcurrencyProbe,
                                config={"max_concurrent_queries": 2},
                                replica_options={"num_cpus": 0.5})
    serve_client.create_endpoint("limited", backend="limited", route="/limited")
    handle = serve_client.get_handle("limited")

    # Through a handle.
    futures = [handle.remote(i) for i in range(20)]
    assert [f.result(RESULT_TIMEOUT) for f in futures] == ["ok"] * 20
    peak = handle.options(method_name="peak").remote().result(RESULT_TIMEOUT)
    assert peak == 2, f"peak concurrency {peak}, limit is 2"

    # Through HTTP.
    assert handle.options(method_name="reset").remote().result(RESULT_TIMEOUT) is True
    statuses = []
    lock = threading.Lock()

    def one():
        resp = requests.get(f"{base_url}/limited", timeout=RESULT_TIMEOUT)
        with lock:
            statuses.append((resp.status_code, resp.text))

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=RESULT_TIMEOUT)
    assert len(statuses) == 20
    assert all(code == 200 for code, _ in statuses), statuses
    peak = handle.options(method_name="peak").remote().result(RESULT_TIMEOUT)
    assert peak == 2, f"peak concurrency {peak} over HTTP, limit is 2"


def test_fast_call_is_not_held_behind_slow_calls_on_the_same_replica(serve_client, tmp_path):
    # Requests on one replica run concurrently, so each must come back when it is
    # done, not when the slowest request that reached the replica with it is done.
    serve_client.create_backend("mixed", HeldAndFast, str(tmp_path),
                                replica_options={"num_cpus": 0.5})
    serve_client.create_endpoint("mixed", backend="mixed")
    handle = serve_client.get_handle("mixed")
    try:
        held = [handle.remote() for _ in range(10)]
        pong = handle.options(method_name="ping").remote()
        # The gate stays closed until after this answer: a ping queued behind the
        # held calls would never answer (the timeout only guards against a hang).
        assert pong.result(timeout=20) == "pong"
        assert not any(f.done() for f in held)
    finally:
        open(os.path.join(str(tmp_path), "release"), "w").close()
    assert [f.result(RESULT_TIMEOUT) for f in held] == ["held"] * 10


# -- 4. user_config and reconfigure --------------------------------------------------------
def _sample_replicas(handle, want: int, max_rounds: int = 20) -> dict:
    """Call the backend until ``want`` distinct replicas answered; tag -> last answer."""
    answers: dict = {}
    for _ in range(max_rounds):
        for fut in [handle.remote() for _ in range(40)]:
            tag, current, history = fut.result(RESULT_TIMEOUT)
            answers[tag] = (current, history)
        if len(answers) >= want:
            break
    return answers


def test_user_config_reconfigure_on_start_scale_up_and_update(serve_client):
    serve_client.create_backend("cfg", Configurable, config={"user_config": {"v": 1}},
                                replica_options={"num_cpus": 0.5})
    serve_client.create_endpoint("cfg", backend="cfg")
    handle = serve_client.get_handle("cfg")

    # Called at start.
    tag, current, history = handle.remote().result(RESULT_TIMEOUT)
    assert current == {"v": 1}
    assert history == [{"v": 1}]
    assert serve_client.list_backends()["cfg"]["user_config"] == {"v": 1}

    # New replicas from a scale-up are configured before they serve.
    serve_client.update_backend_config("cfg", {"num_replicas": 3})
    answers = _sample_replicas(handle, 3)
    assert len(answers) == 3, f"only reached replicas {sorted(answers)}"
    for tag, (current, history) in answers.items():
        assert current == {"v": 1}, (tag, history)
        assert history[0] == {"v": 1}, (tag, history)

    # An update reaches every replica, and every later request sees it.
    serve_client.update_backend_config("cfg", {"user_config": {"v": 2}})
    assert serve_client.get_backend_config("cfg").user_config == {"v": 2}
    assert serve_client.list_backends()["cfg"]["user_config"] == {"v": 2}
    assert serve_client.get_backend_config("cfg").num_replicas == 3
    answers_after = _sample_replicas(handle, 3)
    assert set(answers_after) == set(answers), "the update must not replace replicas"
    for tag, (current, history) in answers_after.items():
        assert current == {"v": 2}, (tag, history)
        assert history[0] == {"v": 1} and history[-1] == {"v": 2}, (tag, history)


def test_user_config_without_reconfigure_is_refused(serve_client):
    with pytest.raises(Exception, match="reconfigure"):
        serve_client.create_backend("noreconf", echo_backend,
                                    config={"user_config": {"a": 1}},
                                    replica_options={"num_cpus": 0.5})
    assert "noreconf" not in serve_client.list_backends()


# -- 5. placement on dedicated clusters ----------------------------------------------------
class _DedicatedCluster:
    """A private LocalCluster with one resource-declaring worker and a serve instance."""

    def __init__(self, resources: dict):
        self.cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                    resources=resources, dashboard_address=":0")
        self.client = Client(self.cluster)
        self.serve = serve.start(self.client, http_options={"location": "NoServer"})

    def close(self):
        try:
            self.serve.shutdown()
        finally:
            self.client.close()
            self.cluster.close()


def _status(client, tag):
    entry = client.list_backends()[tag]
    return entry["status"], entry["replicas"]


def test_fractional_gpus_share_a_worker_and_pending_backend_starts_on_new_worker():
    env = _DedicatedCluster({"GPU": 1})
    try:
        client = env.serve
        half_gpu = {"num_gpus": 0.5, "num_cpus": 0.1}
        client.create_backend("g1", replica_tag_backend, replica_options=half_gpu)
        client.create_backend("g2", replica_tag_backend, replica_options=half_gpu)
        # create_backend returns once a replica that fits has started.
        assert _status(client, "g1") == ("RUNNING", {"running": 1})
        assert _status(client, "g2") == ("RUNNING", {"running": 1})

        # The single GPU is fully booked: the third backend is created but pending.
        client.create_backend("g3", replica_tag_backend, replica_options=half_gpu)
        assert _status(client, "g3") == ("PENDING", {"pending": 1})
        assert set(client.list_backends()) == {"g1", "g2", "g3"}

        # The others keep serving.
        client.create_endpoint("g1", backend="g1")
        client.create_endpoint("g2", backend="g2")
        assert client.get_handle("g1").remote().result(RESULT_TIMEOUT).startswith("g1#")
        assert client.get_handle("g2").remote().result(RESULT_TIMEOUT).startswith("g2#")

        # A second GPU worker joins; the pending replica starts there.
        env.cluster.scale(2)
        env.client.wait_for_workers(2, timeout=60)
        wait_until(lambda: _status(client, "g3") == ("RUNNING", {"running": 1}), 60,
                   what="pending backend g3 to start on the new GPU worker")
        client.create_endpoint("g3", backend="g3")
        assert client.get_handle("g3").remote().result(RESULT_TIMEOUT).startswith("g3#")
        assert client.get_handle("g1").remote().result(RESULT_TIMEOUT).startswith("g1#")
    finally:
        env.close()


def test_custom_resource_placement_and_pending_until_worker_joins():
    env = _DedicatedCluster({"TPU": 1})
    try:
        client = env.serve
        tpu = {"resources": {"TPU": 1}, "num_cpus": 0.1}
        client.create_backend("t1", replica_tag_backend, replica_options=tpu)
        assert _status(client, "t1") == ("RUNNING", {"running": 1})
        # No worker offers this resource at all: pending, not an error.
        client.create_backend("nope", replica_tag_backend,
                              replica_options={"resources": {"FPGA": 1}, "num_cpus": 0.1})
        assert _status(client, "nope") == ("PENDING", {"pending": 1})
        # The only TPU is taken.
        client.create_backend("t2", replica_tag_backend, replica_options=tpu)
        assert _status(client, "t2") == ("PENDING", {"pending": 1})

        client.create_endpoint("t1", backend="t1")
        assert client.get_handle("t1").remote().result(RESULT_TIMEOUT).startswith("t1#")

        env.cluster.scale(2)
        env.client.wait_for_workers(2, timeout=60)
        wait_until(lambda: _status(client, "t2") == ("RUNNING", {"running": 1}), 60,
                   what="pending backend t2 to start on the new TPU worker")
        assert _status(client, "nope") == ("PENDING", {"pending": 1})
        client.create_endpoint("t2", backend="t2")
        assert client.get_handle("t2").remote().result(RESULT_TIMEOUT).startswith("t2#")

        # Deleting a pending backend works and the controller keeps serving.
        client.delete_backend("nope")
        assert "nope" not in client.list_backends()
        assert client.get_handle("t1").remote().result(RESULT_TIMEOUT).startswith("t1#")
    finally:
        env.close()


def test_omp_num_threads_follows_num_cpus_and_env_vars_override(serve_client):
    names = ("OMP_NUM_THREADS", "DASKSERVE_TEST_FLAG")
    serve_client.create_backend("two_cpus", EnvProbe, *names,
                                replica_options={"num_cpus": 2})
    serve_client.create_backend("half_cpu", EnvProbe, *names,
                                replica_options={"num_cpus": 0.5})
    serve_client.create_backend("custom", EnvProbe, *names,
                                replica_options={"num_cpus": 1,
                                                 "env_vars": {"OMP_NUM_THREADS": "3",
                                                              "DASKSERVE_TEST_FLAG": "on"}})
    seen = {}
    for tag in ("two_cpus", "half_cpu", "custom"):
        serve_client.create_endpoint(tag, backend=tag)
        seen[tag] = serve_client.get_handle(tag).remote().result(RESULT_TIMEOUT)

    assert seen["two_cpus"]["OMP_NUM_THREADS"] == "2"
    assert seen["half_cpu"]["OMP_NUM_THREADS"] == "1"   # rounded up, never 0
    assert seen["custom"]["OMP_NUM_THREADS"] == "3"
    assert seen["custom"]["DASKSERVE_TEST_FLAG"] == "on"
    assert seen["two_cpus"]["DASKSERVE_TEST_FLAG"] is None   # set by nobody before it

    # A replica's variables leave with it: one placed afterwards sees the worker's own.
    serve_client.delete_endpoint("custom")
    serve_client.delete_backend("custom")
    serve_client.create_backend("after", EnvProbe, *names, config={"num_replicas": 2})
    serve_client.create_endpoint("after", backend="after")
    handle = serve_client.get_handle("after")
    after = [handle.remote().result(RESULT_TIMEOUT) for _ in range(10)]
    assert all(s["DASKSERVE_TEST_FLAG"] is None and s["OMP_NUM_THREADS"] == "1"
               for s in after), after


# -- 6. real NVIDIA GPUs -------------------------------------------------------------------
def _nvidia_gpus() -> list[tuple[str, str]]:
    """(index, uuid) of the NVIDIA GPUs NVML sees here; empty without a driver."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
            gpus.append((str(i), uuid.decode() if isinstance(uuid, bytes) else uuid))
        return gpus
    except Exception:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def test_gpu_replica_sees_exactly_one_cuda_device(serve_client):
    gpus = _nvidia_gpus()
    if not gpus:
        pytest.skip("no NVIDIA GPU visible through nvidia-ml-py on this machine")
    serve_client.create_backend("gpu", EnvProbe, "CUDA_VISIBLE_DEVICES",
                                replica_options={"num_gpus": 1})
    assert _status(serve_client, "gpu") == ("RUNNING", {"running": 1})
    serve_client.create_endpoint("gpu", backend="gpu")
    visible = serve_client.get_handle("gpu").remote().result(RESULT_TIMEOUT)[
        "CUDA_VISIBLE_DEVICES"]
    assert visible is not None, "a num_gpus=1 replica must get CUDA_VISIBLE_DEVICES"
    devices = [d.strip() for d in visible.split(",") if d.strip()]
    assert len(devices) == 1, f"CUDA_VISIBLE_DEVICES={visible!r} names {len(devices)} GPUs"
    known = {i for i, _ in gpus} | {u for _, u in gpus}
    assert devices[0] in known, f"{devices[0]!r} is not one of this machine's GPUs {known}"
