"""Starting, connecting to and shutting down serve instances."""
from __future__ import annotations

import json
import socket
import sys
import threading

import pytest
import requests
from distributed import Client, LocalCluster

import daskserve as serve
from conftest import close_all, free_port, spawn_logged, wait_until

TIMEOUT = 30  # safety limit for every remote result and HTTP request


def square(x):
    return x * x


def hello(request):
    return "hello"


def _port_refuses(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(5)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _plugin_installed(dask_scheduler=None) -> bool:
    return "daskserve" in dask_scheduler.plugins


def _actor_count(dask_worker=None) -> int:
    return len(dask_worker.state.actors)


def inc(x):
    return x + 1


# -- start / connect -----------------------------------------------------------------------
def test_start_is_idempotent(dask_client, http_port):
    first = serve.start(dask_client, http_options={"port": http_port})
    try:
        first.create_backend("hello", hello)
        first.create_endpoint("hello", backend="hello", route="/hello")

        second = serve.start(dask_client, http_options={"port": http_port})
        # The second start attached to the running instance instead of replacing it.
        assert set(second.list_backends()) == {"hello"}
        assert second.list_endpoints()["hello"]["route"] == "/hello"
        second.create_backend("square", square)
        second.create_endpoint("square", backend="square")
        assert set(first.list_backends()) == {"hello", "square"}
        assert first.get_handle("square").remote(6).result(timeout=TIMEOUT) == 36
        reply = requests.get(f"http://127.0.0.1:{http_port}/hello", timeout=TIMEOUT)
        assert reply.status_code == 200 and reply.text == "hello"
    finally:
        first.shutdown()


def test_connect_attaches_to_running_instance(serve_client, dask_client, base_url):
    serve_client.create_backend("square", square)
    attached = serve.connect(dask_client)
    assert set(attached.list_backends()) == {"square"}
    attached.create_endpoint("square", backend="square", route="/square")
    assert serve_client.list_endpoints()["square"]["route"] == "/square"
    assert attached.get_handle("square").remote(9).result(timeout=TIMEOUT) == 81
    assert serve_client.get_handle("square").remote(3).result(timeout=TIMEOUT) == 9


def test_connect_without_instance_raises(dask_client):
    with pytest.raises(RuntimeError):
        serve.connect(dask_client)


def test_invalid_http_options_name_the_field_and_start_nothing(dask_client):
    with pytest.raises(ValueError, match="location"):
        serve.start(dask_client, http_options={"location": "Nowhere"})
    with pytest.raises(ValueError, match="portt"):
        serve.start(dask_client, http_options={"portt": 8000})
    with pytest.raises(TypeError, match="port"):
        serve.start(dask_client, http_options={"port": "8000"})
    with pytest.raises(TypeError, match="http_options"):
        serve.start(dask_client, http_options=["port", 8000])
    assert not dask_client.run_on_scheduler(_plugin_installed)
    with pytest.raises(RuntimeError):
        serve.connect(dask_client)


def test_start_on_a_busy_port_fails_cleanly(dask_client, http_port):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", http_port))
        blocker.listen()
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{http_port}"):
            serve.start(dask_client, http_options={"port": http_port})
    # Nothing half-installed is left behind: a later start on a free port works.
    assert not dask_client.run_on_scheduler(_plugin_installed)
    client = serve.start(dask_client, http_options={"port": http_port})
    try:
        client.create_backend("hello", hello)
        client.create_endpoint("hello", backend="hello", route="/hello")
        assert requests.get(f"http://127.0.0.1:{http_port}/hello",
                            timeout=TIMEOUT).text == "hello"
    finally:
        client.shutdown()


def test_module_level_functions_act_on_latest_client(dask_client, http_port):
    first = serve.start(dask_client, http_options={"port": http_port})
    try:
        with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                          dashboard_address=":0") as other_cluster, \
                Client(other_cluster, set_as_default=False) as other_dask:
            second = serve.start(other_dask, http_options={"location": "NoServer"})
            try:
                serve.create_backend("on_second", square)
                serve.create_endpoint("on_second", backend="on_second")
                assert set(second.list_backends()) == {"on_second"}
                assert first.list_backends() == {}
                assert serve.list_endpoints() == second.list_endpoints()
                handle = serve.get_handle("on_second")
                assert handle.remote(5).result(timeout=TIMEOUT) == 25

                serve.connect(dask_client)  # the first instance is the latest again
                serve.create_backend("on_first", square)
                assert set(first.list_backends()) == {"on_first"}
                assert set(second.list_backends()) == {"on_second"}
                assert serve.list_backends() == first.list_backends()
            finally:
                second.shutdown()
    finally:
        first.shutdown()


# -- shutdown -----------------------------------------------------------------------------
def test_shutdown_removes_everything_and_cluster_stays_healthy(dask_client, http_port):
    workers_before = set(dask_client.scheduler_info()["workers"])
    client = serve.start(dask_client, http_options={"port": http_port})
    client.create_backend("square", square, config={"num_replicas": 2})
    client.create_backend("hello", hello)
    client.create_endpoint("square", backend="square")
    client.create_endpoint("hello", backend="hello", route="/hello")
    assert client.get_handle("square").remote(4).result(timeout=TIMEOUT) == 16
    assert requests.get(f"http://127.0.0.1:{http_port}/hello", timeout=TIMEOUT).text == "hello"
    assert sum(dask_client.run(_actor_count).values()) >= 3

    client.shutdown()

    # The proxy, the controller and every replica are gone ...
    assert _port_refuses(http_port)
    assert not dask_client.run_on_scheduler(_plugin_installed)
    with pytest.raises(RuntimeError):
        serve.connect(dask_client)
    wait_until(lambda: sum(dask_client.run(_actor_count).values()) == 0,
                what="replica actors released")
    # ... while the Dask cluster keeps working.
    assert set(dask_client.scheduler_info()["workers"]) == workers_before
    assert dask_client.submit(inc, 41, pure=False).result(timeout=TIMEOUT) == 42

    # A new instance starts from scratch and can use every CPU slot again.
    port = free_port()
    again = serve.start(dask_client, http_options={"port": port})
    try:
        assert again.list_backends() == {} and again.list_endpoints() == {}
        again.create_backend("square", square, config={"num_replicas": 4})
        again.create_endpoint("square", backend="square", route="/sq")
        assert again.list_backends()["square"]["status"] == "RUNNING"
        assert again.get_handle("square").remote(7).result(timeout=TIMEOUT) == 49
        assert requests.get(f"http://127.0.0.1:{port}/-/routes",
                            timeout=TIMEOUT).json() == {"/sq": "square"}
    finally:
        again.shutdown()


def test_module_level_shutdown(dask_client, http_port):
    serve.start(dask_client, http_options={"port": http_port})
    serve.create_backend("square", square)
    serve.shutdown()
    assert not dask_client.run_on_scheduler(_plugin_installed)
    assert _port_refuses(http_port)
    with pytest.raises(RuntimeError):
        serve.list_backends()


def _constant(*args):
    return "from an owned cluster"


async def _current_thread() -> threading.Thread:
    return threading.current_thread()


def test_start_without_a_client_owns_its_cluster(http_port):
    client = serve.start(None, http_options={"port": http_port})
    dask_client = client.dask_client
    # The cluster's event loop runs in a thread of this process; it must end with it.
    loop_thread = dask_client.sync(_current_thread)
    try:
        assert isinstance(dask_client, Client)
        client.create_backend("constant", _constant, replica_options={"num_cpus": 0.5})
        client.create_endpoint("constant", backend="constant", route="/constant")
        handle = client.get_handle("constant")
        assert handle.remote().result(timeout=TIMEOUT) == "from an owned cluster"
        reply = requests.get(f"http://127.0.0.1:{http_port}/constant", timeout=TIMEOUT)
        assert reply.text == "from an owned cluster"
    finally:
        client.shutdown()
    assert dask_client.status == "closed"  # shutdown closed the cluster it made
    assert _port_refuses(http_port)
    # The controller's own Dask client used to hold that loop open after the cluster
    # closed; a loop thread still running at interpreter exit can crash the process.
    loop_thread.join(timeout=TIMEOUT)
    assert not loop_thread.is_alive(), "the owned cluster's event loop outlived it"


# -- proxy locations ------------------------------------------------------------------------
@pytest.mark.parametrize("location", ["NoServer", None])
def test_no_server_location_starts_no_proxy(dask_client, http_port, location):
    client = serve.start(dask_client, http_options={"port": http_port, "location": location})
    try:
        client.create_backend("square", square)
        client.create_endpoint("square", backend="square", route="/square")
        assert _port_refuses(http_port)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{http_port}/square", timeout=TIMEOUT)
        # Handles work without any proxy.
        assert client.get_handle("square").remote(11).result(timeout=TIMEOUT) == 121
    finally:
        client.shutdown()


def test_every_node_location_serves_http(dask_client, http_port):
    client = serve.start(dask_client, http_options={"port": http_port,
                                                    "location": "EveryNode"})
    try:
        client.create_backend("hello", hello)
        client.create_endpoint("hello", backend="hello", route="/hello")
        reply = requests.get(f"http://127.0.0.1:{http_port}/hello", timeout=TIMEOUT)
        assert reply.status_code == 200 and reply.text == "hello"
    finally:
        client.shutdown()
    wait_until(lambda: _port_refuses(http_port), what="worker proxy closed")


# -- the scheduler preload ------------------------------------------------------------------
@pytest.mark.slow
def test_scheduler_preload_starts_an_instance(tmp_path, http_port):
    scheduler_file = tmp_path / "scheduler.json"
    processes = []
    logs = []
    dask_client = None
    try:
        scheduler, log = spawn_logged(
            [sys.executable, "-m", "distributed.cli.dask_scheduler",
             "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(scheduler_file),
             "--preload", "scheduler_plugin",
             "--serve-http-host", "127.0.0.1", "--serve-http-port", str(http_port)],
            tmp_path / "scheduler.log")
        processes.append(scheduler)
        logs.append(log)

        def scheduler_ready():
            if scheduler.poll() is not None:
                raise AssertionError("dask scheduler exited:\n" +
                                     (tmp_path / "scheduler.log").read_text()[-3000:])
            return scheduler_file.exists() and scheduler_file.stat().st_size > 0

        wait_until(scheduler_ready, timeout=60, what="scheduler file written")
        address = json.loads(scheduler_file.read_text())["address"]

        worker, log = spawn_logged(
            [sys.executable, "-m", "distributed.cli.dask_worker", address,
             "--nthreads", "2", "--nworkers", "1", "--no-dashboard", "--host", "127.0.0.1"],
            tmp_path / "worker.log")
        processes.append(worker)
        logs.append(log)

        # The proxy came up with the scheduler, before any Python client attached.
        base_url = f"http://127.0.0.1:{http_port}"
        def healthy():
            scheduler_ready()  # fails at once, with its log, if the scheduler died
            try:
                return requests.get(f"{base_url}/-/healthz", timeout=TIMEOUT).status_code
            except requests.ConnectionError:
                return None

        assert wait_until(healthy, timeout=60, what="preloaded proxy answering") == 200

        dask_client = Client(address, timeout=TIMEOUT, set_as_default=False)
        dask_client.wait_for_workers(1, timeout=60)
        client = serve.connect(dask_client)
        assert client.list_backends() == {}

        def cube(request):  # defined here so it travels by value to the plain worker
            return {"cube": int(request.query_params["x"]) ** 3}

        client.create_backend("cube", cube)
        client.create_endpoint("cube", backend="cube", route="/cube")
        reply = requests.get(f"{base_url}/cube", params={"x": "3"}, timeout=TIMEOUT)
        assert reply.status_code == 200
        assert reply.json() == {"cube": 27}
        assert requests.get(f"{base_url}/-/routes", timeout=TIMEOUT).json() == {"/cube": "cube"}

        # serve.start on that scheduler attaches to the preloaded instance.
        attached = serve.start(dask_client)
        assert set(attached.list_backends()) == {"cube"}
        assert requests.get(f"{base_url}/cube", params={"x": "2"},
                            timeout=TIMEOUT).json() == {"cube": 8}
    finally:
        close_all(dask_client, processes, logs)
