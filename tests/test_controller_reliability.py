"""The controller under stress: shutdown with requests in flight, scheduler restarts,
concurrent updates, lost proxy workers, and inputs it must refuse.

Most tests here reproduce a defect of an earlier version and guard its fix.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from distributed import Client, LocalCluster

import daskserve as serve
from conftest import (REPO_ROOT, close_all, free_port, spawn_logged, stop_process,
                      wait_until)

TIMEOUT = 30  # safety limit for every remote result and HTTP request
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
IN_FLIGHT = 30


# -- backends (module level: workers import this module by name) ---------------------------
_gates: dict[str, dict] = {}  # per worker process: gate name -> arrivals and its event


def _gate(name: str) -> dict:
    if name not in _gates:
        _gates[name] = {"arrived": 0, "open": asyncio.Event()}
    return _gates[name]


class Gated:
    """Holds every request until the test opens its gate, so requests stay in flight."""

    def __init__(self, name: str):
        self.name = name

    async def __call__(self, *args):
        gate = _gate(self.name)
        gate["arrived"] += 1
        await gate["open"].wait()
        return "released"


def _arrived(name: str) -> int:
    return _gates[name]["arrived"] if name in _gates else 0


async def _open_gate(name: str) -> None:
    _gate(name)["open"].set()


def _arrivals(dask_client: Client, name: str) -> int:
    return sum(dask_client.run(_arrived, name).values())


class ReconfigureRefused(Exception):
    """The user's own exception type, raised by ``reconfigure``."""


class Configurable:
    def __init__(self):
        self.config = None

    def reconfigure(self, config):
        if config == "refuse":
            raise ReconfigureRefused(f"cannot use {config!r}")
        self.config = config

    def __call__(self, *args):
        return self.config


def hello(*args):
    return "hello"


def where_old(*args):
    return "old"


def from_new_instance(*args):
    return "new"


# -- helpers -------------------------------------------------------------------------------
def _get(url: str) -> tuple:
    try:
        reply = requests.get(url, timeout=2 * TIMEOUT)
        return reply.status_code, reply.text
    except requests.RequestException as exc:
        return "failed", repr(exc)


def _port_refuses(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(5)
        return sock.connect_ex(("127.0.0.1", port)) != 0


# The tests directory on PYTHONPATH lets subprocess workers import this module's backends.
WORKER_ENV = {"PYTHONPATH": os.pathsep.join(
    p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p)}


def _scheduler_args(port: int, *extra: str) -> list:
    return [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
            "--port", str(port), "--no-dashboard", "--preload", "scheduler_plugin", *extra]


def _worker_args(address: str, *extra: str) -> list:
    return [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "2",
            "--no-dashboard", "--host", "127.0.0.1", *extra]


def _hold_and_release(dask_client: Client, client, port: int, stop) -> list:
    """Serve a gated backend at ``/gated``, send IN_FLIGHT requests that it holds, call
    ``stop`` (which must begin a shutdown), wait until the proxy on ``port`` refuses new
    connections, open the gate, and return every request's outcome."""
    gate = uuid.uuid4().hex
    client.create_backend("gated", Gated, gate)
    client.create_endpoint("gated", backend="gated", route="/gated")
    url = f"http://127.0.0.1:{port}/gated"
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        replies = [pool.submit(_get, url) for _ in range(IN_FLIGHT)]
        wait_until(lambda: _arrivals(dask_client, gate) == IN_FLIGHT, timeout=TIMEOUT,
                   what=f"{IN_FLIGHT} requests held by the backend")
        stop()
        wait_until(lambda: _port_refuses(port), timeout=TIMEOUT,
                   what="the proxy to stop accepting connections")
        dask_client.run(_open_gate, gate)
        return [reply.result(timeout=3 * TIMEOUT) for reply in replies]


# -- shutdown finishes in-flight HTTP requests ---------------------------------------------
def test_shutdown_finishes_in_flight_http_requests(dask_client, http_port):
    client = serve.start(dask_client, http_options={"port": http_port})
    stopper = ThreadPoolExecutor(1)
    stopping = None
    try:
        def stop():
            nonlocal stopping
            stopping = stopper.submit(client.shutdown)

        outcomes = _hold_and_release(dask_client, client, http_port, stop)
        stopping.result(timeout=3 * TIMEOUT)
    finally:
        if stopping is None:
            client.shutdown()
        stopper.shutdown()
    assert outcomes == [(200, "released")] * IN_FLIGHT


@pytest.mark.slow
def test_sigterm_of_cli_start_finishes_in_flight_http_requests(tmp_path):
    port = free_port()
    cli, log = spawn_logged(
        [sys.executable, "-m", "daskserve.cli", "start", "--port", str(port)],
        tmp_path / "cli.log", env=WORKER_ENV)
    dask_client = None
    try:
        def scheduler_address():
            text = (tmp_path / "cli.log").read_text()
            if cli.poll() is not None:
                raise AssertionError(f"daskserve start exited:\n{text[-3000:]}")
            for line in text.splitlines():
                if line.startswith("local scheduler: "):
                    return line.split()[2].rstrip(";")
            return None

        address = wait_until(scheduler_address, timeout=90, what="daskserve start")
        dask_client = Client(address, timeout=TIMEOUT, set_as_default=False)
        outcomes = _hold_and_release(dask_client, serve.connect(dask_client), port,
                                     lambda: cli.send_signal(signal.SIGTERM))
        assert outcomes == [(200, "released")] * IN_FLIGHT
        assert cli.wait(timeout=3 * TIMEOUT) == 0
    finally:
        if dask_client is not None:
            dask_client.close(timeout=10)
        stop_process(cli)
        log.close()


@pytest.mark.slow
def test_sigterm_of_preloaded_scheduler_finishes_in_flight_http_requests(tmp_path):
    port, http_port = free_port(), free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes, logs = [], []
    dask_client = None
    try:
        scheduler, log = spawn_logged(
            _scheduler_args(port, "--serve-http-port", str(http_port)), tmp_path / "scheduler.log")
        processes.append(scheduler)
        logs.append(log)
        worker, log = spawn_logged(_worker_args(address), tmp_path / "worker.log",
                                   env=WORKER_ENV)
        processes.append(worker)
        logs.append(log)
        dask_client = Client(address, timeout=60, set_as_default=False)
        dask_client.wait_for_workers(1, timeout=60)
        outcomes = _hold_and_release(dask_client, serve.connect(dask_client), http_port,
                                     lambda: scheduler.send_signal(signal.SIGTERM))
        assert outcomes == [(200, "released")] * IN_FLIGHT
        scheduler.wait(timeout=3 * TIMEOUT)
    finally:
        close_all(dask_client, processes, logs)


# -- a restarted scheduler's routing tables replace the old instance's ---------------------
DRIVER = r"""
import json, sys
from distributed import Client
import daskserve as serve
from daskserve.handle import _router_for

address, timeout = sys.argv[1], float(sys.argv[2])
dask_client = Client(address, timeout=120)
handles = {"old": serve.connect(dask_client).get_handle("where")}
for line in sys.stdin:
    command, name = line.split()
    try:
        if command == "connect":
            handles[name] = serve.connect(dask_client).get_handle("where")
            result = "connected"
        else:
            result = handles[name].remote().result(timeout=timeout)
    except Exception as exc:
        result = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"result": result, "version": _router_for(address)[0].version}),
          flush=True)
"""


def _ask(driver: subprocess.Popen, command: str) -> dict:
    driver.stdin.write(command + "\n")
    driver.stdin.flush()
    return json.loads(driver.stdout.readline())


@pytest.mark.slow
def test_router_replaces_its_table_when_the_scheduler_restarts(tmp_path):
    """A driver process (a long-lived router with a handle made against the first
    instance) is paused while the scheduler and its worker are killed and restarted and
    the new instance's version counter reaches the driver's table version. Resumed, the
    driver's router must notice the new instance (the routing table's epoch) instead of
    keeping the old table, which names the dead worker."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    args = _scheduler_args(port, "--serve-http-location", "NoServer")
    processes, logs = [], []
    dask_client = driver = None

    def start(name, argv, env=None):
        proc, log = spawn_logged(argv, tmp_path / f"{name}.log", env)
        processes.append(proc)
        logs.append(log)
        return proc

    try:
        scheduler = start("scheduler-1", args)
        worker = start("worker-1", _worker_args(address, "--no-nanny"), WORKER_ENV)
        dask_client = Client(address, timeout=60, set_as_default=False)
        dask_client.wait_for_workers(1, timeout=60)
        client = serve.connect(dask_client)
        client.create_backend("where", where_old)
        client.create_endpoint("where", backend="where")
        for _ in range(20):  # the old instance's table version runs well ahead
            client.set_traffic("where", {"where": 1.0})
        dask_client.close()

        driver = subprocess.Popen([sys.executable, "-c", DRIVER, address, str(TIMEOUT)],
                                  text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  cwd=REPO_ROOT, env={**os.environ, **WORKER_ENV})
        first = _ask(driver, "call old")
        assert first["result"] == "old"
        old_version = first["version"]

        driver.send_signal(signal.SIGSTOP)
        # The scheduler goes first: had it seen its worker go, it would have sent the
        # driver one more table, and its version would differ from the new instance's.
        for proc in (scheduler, worker):
            proc.kill()
            proc.wait(timeout=TIMEOUT)
        start("scheduler-2", args)
        start("worker-2", _worker_args(address, "--no-nanny"), WORKER_ENV)
        dask_client = Client(address, timeout=60, set_as_default=False)
        dask_client.wait_for_workers(1, timeout=60)
        client = serve.connect(dask_client)
        client.create_backend("where", from_new_instance)
        client.create_endpoint("where", backend="where")
        version = client.info()["version"]
        assert version < old_version
        for _ in range(old_version - version):  # each change publishes one table
            client.set_traffic("where", {"where": 1.0})
        assert client.info()["version"] == old_version

        driver.send_signal(signal.SIGCONT)
        # A handle made against the new instance is served by it, not by the table
        # of the old one that has the same version number ...
        assert _ask(driver, "connect new")["result"] == "connected"
        assert _ask(driver, "call new")["result"] == "new"
        # ... and so is the handle made against the old instance.
        assert _ask(driver, "call old")["result"] == "new"
    finally:
        if driver is not None:
            driver.send_signal(signal.SIGCONT)
            stop_process(driver)
        close_all(dask_client, processes, logs)


def test_handle_of_a_previous_instance_does_not_wait_for_its_versions(dask_client):
    """Versions count per controller instance: a handle made after many changes in one
    instance must not wait, in the next instance, for a version that may never come."""
    first = serve.start(dask_client, http_options={"location": "NoServer"})
    try:
        first.create_backend("where", where_old, replica_options={"num_cpus": 0.5})
        first.create_endpoint("where", backend="where")
        for _ in range(20):
            first.set_traffic("where", {"where": 1.0})
        handle = first.get_handle("where")
        assert handle.remote().result(timeout=TIMEOUT) == "old"
    finally:
        first.shutdown()
    second = serve.start(dask_client, http_options={"location": "NoServer"})
    try:
        second.create_backend("where", from_new_instance, replica_options={"num_cpus": 0.5})
        second.create_endpoint("where", backend="where")
        assert second.info()["version"] < 20
        assert handle.remote().result(timeout=TIMEOUT) == "new"
    finally:
        second.shutdown()


# -- concurrent partial updates ------------------------------------------------------------
def test_concurrent_partial_updates_all_land(serve_client):
    serve_client.create_backend("cfg", Configurable, config={"user_config": "start"},
                                replica_options={"num_cpus": 0.5})
    fields = {
        "batch_wait_timeout": lambda r: r / 1000,
        "max_concurrent_queries": lambda r: 10 + r,
        "user_config": lambda r: f"round-{r}",
    }
    for round_ in range(20):
        barrier = threading.Barrier(len(fields))

        def update(field):
            barrier.wait(timeout=TIMEOUT)
            serve_client.update_backend_config("cfg", {field: fields[field](round_)})

        with ThreadPoolExecutor(len(fields)) as pool:
            for done in [pool.submit(update, field) for field in fields]:
                done.result(timeout=2 * TIMEOUT)
        config = serve_client.get_backend_config("cfg")
        assert {f: getattr(config, f) for f in fields} == \
            {f: value(round_) for f, value in fields.items()}, f"round {round_}"
    serve_client.create_endpoint("cfg", backend="cfg")
    assert serve_client.get_handle("cfg").remote().result(timeout=TIMEOUT) == "round-19"


def test_full_config_replaces_every_field(serve_client):
    serve_client.create_backend("cfg", Configurable,
                                config={"user_config": "a", "max_concurrent_queries": 7},
                                replica_options={"num_cpus": 0.5})
    serve_client.update_backend_config("cfg", serve.BackendConfig(user_config="b"))
    assert serve_client.get_backend_config("cfg") == serve.BackendConfig(user_config="b")


# -- a lost proxy worker's host gets its proxy back ----------------------------------------
def _serves_proxy(dask_worker=None) -> bool:
    return dask_worker.plugins["daskserve-worker"].proxy is not None


@pytest.mark.slow
def test_every_node_proxy_moves_to_another_worker_of_its_host(tmp_path):
    """Three worker processes on 127.0.0.1 share one EveryNode proxy. Its worker is
    killed. The workers run without nannies, so nothing restarts it and no worker
    joins: HTTP on the port can only answer again if the controller moved the proxy
    to one of the two surviving workers."""
    port = free_port()
    processes, logs = [], []
    with LocalCluster(n_workers=0, processes=True, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as dask_client:
        client = None
        try:
            for i in range(3):
                proc, log = spawn_logged(_worker_args(cluster.scheduler_address, "--no-nanny"),
                                         tmp_path / f"worker-{i}.log", WORKER_ENV)
                processes.append(proc)
                logs.append(log)
            dask_client.wait_for_workers(3, timeout=60)
            client = serve.start(dask_client, http_options={"port": port,
                                                            "location": "EveryNode"})
            client.create_backend("hello", hello, replica_options={"num_cpus": 0.5})
            client.create_endpoint("hello", backend="hello", route="/hello")
            url = f"http://127.0.0.1:{port}/hello"
            assert requests.get(url, timeout=TIMEOUT).text == "hello"

            before = set(dask_client.scheduler_info()["workers"])
            [proxy_worker] = [a for a, on in dask_client.run(_serves_proxy).items() if on]
            pid = dask_client.run(os.getpid, workers=[proxy_worker])[proxy_worker]
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: proxy_worker not in dask_client.scheduler_info()["workers"],
                       timeout=TIMEOUT, what="the scheduler to lose the proxy's worker")

            def answers():
                try:
                    return requests.get(url, timeout=TIMEOUT).text == "hello"
                except requests.ConnectionError:
                    return False

            wait_until(answers, timeout=TIMEOUT, what="HTTP on the port again")
            survivors = set(dask_client.scheduler_info()["workers"])
            assert survivors == before - {proxy_worker}  # no worker joined
            assert sum(dask_client.run(_serves_proxy).values()) == 1
        finally:
            if client is not None:
                client.shutdown()
            close_all(None, processes, logs)


# -- the dashboard of a cluster daskserve starts listens on loopback -----------------------
def _dashboard_hosts(dask_scheduler=None) -> list:
    from distributed.comm.utils import get_tcp_server_addresses

    return [address[0] for address in get_tcp_server_addresses(dask_scheduler.http_server)]


def _all_loopback(hosts: list) -> bool:
    return bool(hosts) and all(ipaddress.ip_address(h).is_loopback for h in hosts)


def test_owned_cluster_dashboard_listens_on_loopback():
    client = serve.start(http_options={"location": "NoServer"})
    try:
        hosts = client.dask_client.run_on_scheduler(_dashboard_hosts)
    finally:
        client.shutdown()
    assert _all_loopback(hosts), hosts


def test_cli_cluster_dashboard_listens_on_loopback():
    from daskserve.cli import _local_client

    dask_client = _local_client(workers=0, threads=1)
    try:
        hosts = dask_client.run_on_scheduler(_dashboard_hosts)
    finally:
        dask_client.close()
        dask_client.cluster.close()
    assert _all_loopback(hosts), hosts


# -- a second start with other http_options ------------------------------------------------
def test_second_start_with_other_http_options_is_refused(dask_client, http_port):
    client = serve.start(dask_client, http_options={"port": http_port})
    try:
        other = free_port()
        with pytest.raises(ValueError, match=f"port.*{other}") as info:
            serve.start(dask_client, http_options={"port": other, "location": "HeadOnly"})
        assert "location" not in str(info.value)  # only what differs is named
        with pytest.raises(ValueError, match="location"):
            serve.start(dask_client, http_options={"location": "EveryNode"})
        # The same options, or none, attach to the running instance.
        assert serve.start(dask_client, http_options={"port": http_port}).info() == client.info()
        assert serve.start(dask_client).info() == client.info()
    finally:
        client.shutdown()


# -- names and routes ----------------------------------------------------------------------
BAD_NAMES = ["nul\x00name", "a/b", "x" * 100_000, "tab\tname", "line\nbreak"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=["nul", "slash", "100k", "tab", "newline"])
def test_bad_backend_and_endpoint_names_are_refused(serve_client, name):
    with pytest.raises(ValueError, match="backend name"):
        serve_client.create_backend(name, hello)
    serve_client.create_backend("ok", hello, replica_options={"num_cpus": 0.5})
    with pytest.raises(ValueError, match="endpoint name"):
        serve_client.create_endpoint(name, backend="ok")
    assert set(serve_client.list_backends()) == {"ok"}
    assert serve_client.list_endpoints() == {}


@pytest.mark.parametrize("route", ["/a?b=1", "/a#top", "/a\x00b", "/ ", "/a\n", "/" + "x" * 5000])
def test_bad_routes_are_refused(serve_client, route):
    with pytest.raises(ValueError, match="route"):
        serve_client.create_endpoint("e", route=route)
    assert serve_client.list_endpoints() == {}


def test_long_printable_names_and_routes_are_accepted(serve_client, base_url):
    name = "n" * 256
    serve_client.create_backend(name, hello, replica_options={"num_cpus": 0.5})
    serve_client.create_endpoint(name, backend=name, route="/café/model:v1")
    reply = requests.get(f"{base_url}/caf%C3%A9/model:v1", timeout=TIMEOUT)
    assert reply.status_code == 200 and reply.text == "hello"


# -- reconfigure errors keep their type ----------------------------------------------------
def test_reconfigure_error_reaches_the_caller_with_its_type(serve_client):
    serve_client.create_backend("cfg", Configurable, config={"user_config": "fine"},
                                replica_options={"num_cpus": 0.5})
    with pytest.raises(ReconfigureRefused, match="cannot use 'refuse'") as info:
        serve_client.update_backend_config("cfg", {"user_config": "refuse"})
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "'cfg'" in notes and "replica 'cfg#" in notes, notes
    # The refused config was not kept.
    assert serve_client.get_backend_config("cfg").user_config == "fine"


# -- acknowledgements are kept for proxies only --------------------------------------------
def _ack_ids_beyond_proxies(dask_scheduler=None) -> list:
    controller = dask_scheduler.plugins["daskserve"]
    return sorted(set(controller._acks) - controller.proxies.listener_ids)


def test_controller_keeps_acks_of_proxies_only(serve_client, dask_client, base_url):
    serve_client.create_backend("hello", hello, replica_options={"num_cpus": 0.5})
    serve_client.create_endpoint("hello", backend="hello", route="/hello")
    assert serve_client.get_handle("hello").remote().result(timeout=TIMEOUT) == "hello"
    assert requests.get(f"{base_url}/hello", timeout=TIMEOUT).text == "hello"
    serve_client.set_traffic("hello", {"hello": 1.0})  # the handle's router polls again
    assert serve_client.get_handle("hello").remote().result(timeout=TIMEOUT) == "hello"
    assert dask_client.run_on_scheduler(_ack_ids_beyond_proxies) == []
