"""A replica that stays unhealthy is replaced; one that is only busy is not.

Every backend here is probed five times a second and may stay unhealthy for one
second (``HEALTH``), so each test finishes in seconds. A wedged call sleeps far longer
than any test waits, so a test that sees it end early sees the controller's doing.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import daskserve as serve
from conftest import wait_until
from daskserve.errors import ReplicaUnavailableError

TIMEOUT = 15   # safety limit for every request
WEDGE_S = 20   # a stuck model call: longer than any request may take here
HEALTH = {"health_check_period_s": 0.2, "health_check_timeout_s": 1.0}


class Wedgeable:
    """Answers with its replica's tag, unless asked to hang."""

    def __call__(self, request):
        if request.query_params.get("wedge"):
            time.sleep(WEDGE_S)
        return serve.get_replica_context().replica_tag

    def wedge(self):
        time.sleep(WEDGE_S)


class Breakable:
    """Healthy until a request breaks it; then its check_health raises. It still
    serves: a request can take ``sleep`` seconds."""

    def __init__(self):
        self.broken = False

    def __call__(self, request):
        if request.query_params.get("break"):
            self.broken = True
        time.sleep(float(request.query_params.get("sleep", 0)))
        return serve.get_replica_context().replica_tag

    def check_health(self):
        if self.broken:
            raise RuntimeError("the model lost its GPU")


class AsyncBreakable(Breakable):
    async def check_health(self):
        Breakable.check_health(self)


def slow(request):
    time.sleep(0.3)
    return serve.get_replica_context().replica_tag


def _deploy(client, name, backend, **config):
    client.create_backend(name, backend, config={**HEALTH, **config})
    client.create_endpoint(name, backend=name, route=f"/{name}")


def _tag(base_url: str, name: str) -> str:
    reply = requests.get(f"{base_url}/{name}", timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    return reply.text


def test_a_replica_whose_threads_all_hang_is_replaced(serve_client, base_url):
    _deploy(serve_client, "wedged", Wedgeable, max_concurrent_queries=2)
    first = _tag(base_url, "wedged")
    handle = serve_client.get_handle("wedged").options(method_name="wedge")
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        http = pool.submit(requests.get, f"{base_url}/wedged", params={"wedge": "1"},
                           timeout=TIMEOUT)
        call = handle.remote()  # both of the replica's threads are stuck now
        reply = http.result()
        with pytest.raises(ReplicaUnavailableError) as raised:
            call.result(timeout=TIMEOUT)
    assert time.monotonic() - started < TIMEOUT  # ended by the controller, not by sleep

    assert reply.status_code == 503, reply.text
    body = reply.json()
    assert (body["error"], body["backend"], body["replica"]) == (
        "ReplicaUnavailableError", "wedged", first)
    assert "unhealthy" in body["message"]
    assert (raised.value.backend, raised.value.replica) == ("wedged", first)

    second = _tag(base_url, "wedged")  # the replacement serves
    assert second.startswith("wedged#") and second != first
    entry = serve_client.list_backends()["wedged"]
    assert entry["status"] == "RUNNING" and entry["unhealthy_replaced"] == 1
    assert first in entry["last_unhealthy"]
    # seen as calls that stopped ending, or as no thread coming free for the probe
    assert "none of them ending" in entry["last_unhealthy"] or \
        "thread" in entry["last_unhealthy"]


@pytest.mark.parametrize("backend", [Breakable, AsyncBreakable])
def test_a_replica_whose_check_health_fails_drains_and_is_replaced(serve_client, base_url,
                                                                   backend):
    _deploy(serve_client, "breakable", backend)
    first = _tag(base_url, "breakable")
    broke = time.monotonic()
    requests.get(f"{base_url}/breakable", params={"break": "1"}, timeout=TIMEOUT)
    stop = threading.Event()

    def keep_calling() -> list[requests.Response]:
        # Calls that keep ending: busy, not stuck. Some are always in flight on the
        # broken replica when it is taken out; it drains, so they finish there.
        replies = []
        while not stop.is_set():
            replies.append(requests.get(f"{base_url}/breakable", params={"sleep": 0.3},
                                        timeout=TIMEOUT))
        return replies

    def replacement() -> str | None:
        reply = requests.get(f"{base_url}/breakable", timeout=TIMEOUT)
        assert reply.status_code == 200, reply.text  # nothing fails on the way
        return reply.text if reply.text != first else None

    with ThreadPoolExecutor(2) as pool:
        streams = [pool.submit(keep_calling) for _ in range(2)]
        try:
            second = wait_until(replacement, timeout=TIMEOUT, what="a replacement replica")
            replaced = time.monotonic()
        finally:
            stop.set()
        replies = [reply for stream in streams for reply in stream.result()]
    assert [reply.text for reply in replies if reply.status_code != 200] == []
    assert {reply.text for reply in replies} <= {first, second}
    # check_health had to keep failing for health_check_timeout_s first (less the
    # round trip of a probe that may have left just before the break)
    assert replaced - broke >= HEALTH["health_check_timeout_s"] - 0.1
    entry = serve_client.list_backends()["breakable"]
    assert entry["unhealthy_replaced"] == 1
    assert "the model lost its GPU" in entry["last_unhealthy"]

    time.sleep(3 * HEALTH["health_check_timeout_s"])  # the new one passes its probes
    assert _tag(base_url, "breakable") == second
    assert serve_client.list_backends()["breakable"]["unhealthy_replaced"] == 1


def test_a_busy_replica_that_keeps_finishing_calls_is_not_replaced(serve_client, base_url):
    _deploy(serve_client, "busy", slow, max_concurrent_queries=1)
    first = _tag(base_url, "busy")
    deadline = time.monotonic() + 3 * HEALTH["health_check_timeout_s"]

    def keep_calling() -> set[str]:
        tags = set()
        while time.monotonic() < deadline:
            tags.add(_tag(base_url, "busy"))
        return tags

    # Two callers keep its only thread busy (and one request always waiting) for
    # three health timeouts; every call takes 0.3 s, so calls keep ending.
    with ThreadPoolExecutor(2) as pool:
        tags = set().union(*pool.map(lambda _: keep_calling(), range(2)))
    assert tags == {first}
    assert serve_client.list_backends()["busy"]["unhealthy_replaced"] == 0
