"""EveryNode across hosts: the scheduler and the workers in separate network namespaces.

Each namespace is a host with its own address (``netns_hosts``). The scheduler runs
with the preload in one of them; Dask workers run in the others, without nannies, so
that no worker ever restarts or joins unless the test starts it. The test process
talks to every host over the bridge, as a client on another machine would.
"""
from __future__ import annotations

import os
import signal
import socket
import sys

import pytest
import requests
from distributed import Client

import daskserve as serve
from conftest import wait_until
from netns_hosts import Host, HostNetwork, NamespacesUnavailable, check_available

pytestmark = pytest.mark.slow

TIMEOUT = 60  # for anything the cluster does; polls return as soon as it is done
HTTP_PORT = 8000  # the same on every host: each namespace has its own ports
SCHEDULER_PORT = 8786
ROUTES = ("/first", "/second")
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
# The repository first, so processes on the hosts run this checkout's daskserve; the
# tests directory so that workers import this module's backend by name.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, TESTS_DIR,
                                                  os.environ.get("PYTHONPATH")) if p)}


def echo_route(request):
    return request.url.path


def _serves_proxy(dask_worker=None) -> bool:
    return dask_worker.plugins["daskserve-worker"].proxy is not None


async def _drop_worker(address: str, dask_scheduler=None) -> None:
    """Remove a worker as the scheduler does one it lost contact with, without
    asking it to close."""
    await dask_scheduler.remove_worker(address, stimulus_id="test-drop", close=False)


REHOME_FAILED = "could take over its HTTP proxy"


@pytest.fixture
def network():
    try:
        check_available()
    except NamespacesUnavailable as exc:
        pytest.skip(f"no network namespaces here: {exc}")
    with HostNetwork() as net:
        yield net


class Cluster:
    """Dask processes on the hosts of one network, logging to ``log_dir``."""

    def __init__(self, network: HostNetwork, log_dir):
        self.network = network
        self.log_dir = log_dir
        self.head = network.add_host()
        self.address = f"tcp://{self.head.address}:{SCHEDULER_PORT}"
        self._logs = 0

    def _log_path(self, number: int, host: Host):
        return self.log_dir / f"{number}-{host.namespace}.log"

    def scheduler_log(self) -> str:
        return self._log_path(1, self.head).read_text(errors="replace")

    def _spawn(self, host: Host, module: str, *args: str):
        self._logs += 1
        log = open(self._log_path(self._logs, host), "wb")
        try:
            return host.spawn([sys.executable, "-m", module, *args], log, ENV, REPO_ROOT)
        finally:
            log.close()  # the child holds its own descriptor

    def start_scheduler(self) -> None:
        self._spawn(self.head, "distributed.cli.dask_scheduler", "--host", self.head.address,
                    "--port", str(SCHEDULER_PORT), "--no-dashboard",
                    "--preload", "scheduler_plugin", "--serve-http-location", "EveryNode",
                    "--serve-http-port", str(HTTP_PORT))

    def start_worker(self, host: Host):
        return self._spawn(host, "distributed.cli.dask_worker", self.address,
                           "--host", host.address, "--nthreads", "2", "--no-dashboard",
                           "--no-nanny")


def proxy_url(host: Host) -> str:
    return f"http://{host.address}:{HTTP_PORT}"


def serves_every_endpoint(url: str) -> bool:
    """Every route answers with its own path through the proxy at ``url``."""
    try:
        return all(requests.get(url + route, timeout=10).text == route for route in ROUTES)
    except requests.RequestException:
        return False


def refuses(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.settimeout(10)
        return sock.connect_ex((host, int(port))) != 0


def workers_on(dask_client: Client, host: Host) -> set[str]:
    return {address for address, worker in dask_client.scheduler_info()["workers"].items()
            if worker["host"] == host.address}


def proxy_worker_on(dask_client: Client, host: Host) -> str:
    [address] = [a for a, on in dask_client.run(
        _serves_proxy, workers=list(workers_on(dask_client, host))).items() if on]
    return address


def test_every_node_proxies_follow_hosts(network, tmp_path):
    cluster = Cluster(network, tmp_path)
    cluster.start_scheduler()
    two_workers, one_worker = network.add_host(), network.add_host()
    pair = [cluster.start_worker(two_workers), cluster.start_worker(two_workers)]
    cluster.start_worker(one_worker)
    dask_client = Client(cluster.address, timeout=TIMEOUT, set_as_default=False)
    try:
        dask_client.wait_for_workers(3, timeout=TIMEOUT)
        client = serve.connect(dask_client)
        client.create_backend("echo", echo_route, config={"num_replicas": 2},
                              replica_options={"num_cpus": 0.5})
        for route in ROUTES:
            client.create_endpoint(route.strip("/"), backend="echo", route=route)

        def proxies() -> set[str]:
            return set(client.info()["proxies"])

        # One proxy per host, on the same port, each serving every endpoint.
        wait_until(lambda: proxies() == {proxy_url(two_workers), proxy_url(one_worker)},
                   timeout=TIMEOUT, what=f"a proxy on each worker host, logs in {tmp_path}")
        for url in proxies():
            assert serves_every_endpoint(url), url

        # Both replicas keep off the proxy's worker of the host with two workers; the
        # host with one worker has no other choice.
        proxy_worker = proxy_worker_on(dask_client, two_workers)
        cpus = {address: worker["used"].get("CPU", 0)
                for address, worker in client.info()["workers"].items()}
        assert cpus == {**dict.fromkeys(workers_on(dask_client, two_workers), 0.5),
                        **dict.fromkeys(workers_on(dask_client, one_worker), 0.5),
                        proxy_worker: 0}

        # A host that joins gets a proxy that serves.
        joined = network.add_host()
        cluster.start_worker(joined)
        wait_until(lambda: proxy_url(joined) in proxies(), timeout=TIMEOUT,
                   what="a proxy on the host that joined")
        wait_until(lambda: serves_every_endpoint(proxy_url(joined)), timeout=TIMEOUT,
                   what="the new host's proxy to serve")

        # A host whose workers stop loses its proxy; the others keep serving.
        one_worker.stop()
        wait_until(lambda: proxy_url(one_worker) not in proxies(), timeout=TIMEOUT,
                   what="the stopped host's proxy to leave the list")
        assert proxies() == {proxy_url(two_workers), proxy_url(joined)}
        assert refuses(proxy_url(one_worker))
        for url in proxies():
            assert serves_every_endpoint(url), url

        # A killed proxy worker: its host's other worker takes the proxy over.
        proxy_worker = proxy_worker_on(dask_client, two_workers)
        pid = dask_client.run(os.getpid, workers=[proxy_worker])[proxy_worker]
        [killed] = [proc for proc in pair if proc.pid == pid]
        before = set(dask_client.scheduler_info()["workers"])
        killed.kill()
        wait_until(lambda: proxy_worker not in dask_client.scheduler_info()["workers"],
                   timeout=TIMEOUT, what="the scheduler to lose the proxy's worker")
        wait_until(lambda: serves_every_endpoint(proxy_url(two_workers)), timeout=TIMEOUT,
                   what="the host's proxy back on its other worker")
        assert set(dask_client.scheduler_info()["workers"]) == before - {proxy_worker}
        [survivor] = workers_on(dask_client, two_workers)
        assert dask_client.run(_serves_proxy, workers=[survivor]) == {survivor: True}
        assert proxies() == {proxy_url(two_workers), proxy_url(joined)}

        # A proxy worker the scheduler drops while its process lives on (frozen here)
        # still holds the port, so its host's other worker cannot take the proxy over
        # at once; it does when that process is gone, with no worker joining.
        sibling = cluster.start_worker(two_workers)
        wait_until(lambda: len(workers_on(dask_client, two_workers)) == 2, timeout=TIMEOUT,
                   what="a second worker on the host again")
        [frozen] = [proc for proc in pair if proc is not killed]
        failures = cluster.scheduler_log().count(REHOME_FAILED)
        frozen.send_signal(signal.SIGSTOP)
        dask_client.run_on_scheduler(_drop_worker, survivor)
        wait_until(lambda: cluster.scheduler_log().count(REHOME_FAILED) > failures,
                   timeout=TIMEOUT,
                   what="the host's other worker to fail to take the held port")
        before = set(dask_client.scheduler_info()["workers"])
        frozen.kill()
        wait_until(lambda: serves_every_endpoint(proxy_url(two_workers)), timeout=TIMEOUT,
                   what="the host's proxy back once the dropped worker exited")
        assert set(dask_client.scheduler_info()["workers"]) == before
        [address] = workers_on(dask_client, two_workers)
        assert dask_client.run(_serves_proxy, workers=[address]) == {address: True}
        assert sibling.poll() is None
    finally:
        dask_client.close()
