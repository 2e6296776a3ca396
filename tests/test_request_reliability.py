"""Request-path reliability: nothing a caller sends or a handler does may wedge a backend.

1. Arguments or results that cannot be pickled or unpickled fail only their own call,
   at once, and free its slot.
2. Requests to a backend with no free replica are bounded: dropped when their HTTP
   client leaves, refused past ``max_queued_requests``, failed after ``queue_timeout_s``.
3. Work abandoned by a timeout or a cancelled call stops counting against
   ``max_concurrent_queries``, is cancelled on the replica where it can be, and never
   holds up a scale-down.
7. Results nobody collects (their caller died) expire on the replica.

Every check that could hang on a regression waits through ``result(timeout=...)`` or
``wait_until``, so a hang fails the test instead of the suite.
"""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import dask
import pytest
import requests
from distributed import Client, LocalCluster
from prometheus_client.parser import text_string_to_metric_families

import daskserve as serve
from daskserve.worker_plugin import PLUGIN_NAME

from conftest import free_port, wait_until

TIMEOUT = 30  # safety limit for every result; never a measure of speed


# -- backends ---------------------------------------------------------------------------
class TwoArgError(Exception):
    """Pickles fine, but unpickling calls ``TwoArgError(message)`` and fails."""

    def __init__(self, message, detail):
        super().__init__(message)
        self.detail = detail


def _refuse_to_load(what):
    raise RuntimeError(f"{what} refuses to be unpickled")


class LoadsBadly:
    """Pickles anywhere; unpickling it anywhere fails."""

    def __reduce__(self):
        return _refuse_to_load, ("LoadsBadly",)


def echo_or_misbehave(x):
    if x == "raise":
        raise TwoArgError("bad input 'raise'", "detail")
    if x == "unloadable":
        return LoadsBadly()
    return x


class Hangs:
    """Hangs on request until cancelled; counts the cancellations it saw."""

    def __init__(self):
        self.cancelled = 0

    async def __call__(self, request):
        if request.query_params.get("hang"):
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return "ok"

    async def hang(self):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    def echo(self, x):
        return x

    async def nap(self, seconds):
        await asyncio.sleep(seconds)
        return seconds

    def cancellations(self):
        return self.cancelled


_release_sync = threading.Event()  # per worker process
_sync_started = []


def sync_hang(request):
    if request.query_params.get("n") == "warm":
        return "warm"
    _sync_started.append(request.query_params.get("n"))
    _release_sync.wait(120)
    return "released"


def _release_sync_hangs():
    _release_sync.set()
    return len(_sync_started)


def _reset_sync_hangs():
    _release_sync.clear()
    _sync_started.clear()


class Counter:
    """Counts the requests that reached it."""

    def __init__(self):
        self.seen = 0

    def __call__(self, request):
        self.seen += 1
        return self.seen


async def slow(delay):
    await asyncio.sleep(delay)
    return delay


# -- helpers ----------------------------------------------------------------------------
def _deploy(client, name, backend, *init_args, route=None, methods=("GET",), **kwargs):
    client.create_backend(name, backend, *init_args, **kwargs)
    client.create_endpoint(name, backend=name, route=route, methods=list(methods))
    return client.get_handle(name)


def _same_tick(client, endpoint, *calls, method="__call__"):
    """Make handle calls from the router's own loop in one tick, so they travel as one
    message; returns each call's result or exception."""
    handle = client.get_handle(endpoint, sync=False).options(method_name=method)

    async def run():
        coros = [handle.remote(*args) for args in calls]
        return await asyncio.wait_for(asyncio.gather(*coros, return_exceptions=True),
                                      TIMEOUT)

    return client.dask_client.sync(run)


def _http_count(port, status):
    text = requests.get(f"http://127.0.0.1:{port}/-/metrics", timeout=TIMEOUT).text
    total = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "serve_num_http_requests_total"
                    and sample.labels.get("status") == str(status)):
                total += sample.value
    return total


def _in_background(fn, *args, **kwargs):
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn, *args, **kwargs)
    pool.shutdown(wait=False)
    return future


# -- 1. (un)picklable arguments and results ------------------------------------------------
def test_unpicklable_argument_fails_only_its_call_and_frees_its_slot(serve_client):
    handle = _deploy(serve_client, "echo", echo_or_misbehave,
                     config={"max_concurrent_queries": 2})
    lock = threading.Lock()
    bad, good = _same_tick(serve_client, "echo", (lock,), (7,))
    assert isinstance(bad, serve.SerializationError) and isinstance(bad, TypeError)
    assert "argument 0" in str(bad) and "lock" in str(bad) and "echo" in str(bad)
    assert good == 7
    # More failures than max_concurrent_queries: each released its slot.
    for _ in range(3):
        with pytest.raises(TypeError, match="lock"):
            handle.remote(x=lock).result(timeout=TIMEOUT)
    assert handle.remote(8).result(timeout=TIMEOUT) == 8


def test_exception_that_cannot_be_unpickled_in_the_caller(serve_client):
    handle = _deploy(serve_client, "echo", echo_or_misbehave,
                     config={"max_concurrent_queries": 2})
    bad, good = _same_tick(serve_client, "echo", ("raise",), (3,))
    assert isinstance(bad, serve.SerializationError)
    assert "TwoArgError" in str(bad) and "bad input 'raise'" in str(bad)
    assert "echo" in str(bad)
    assert good == 3
    for _ in range(3):
        with pytest.raises(serve.SerializationError, match="TwoArgError"):
            handle.remote("raise").result(timeout=TIMEOUT)
    assert handle.remote(4).result(timeout=TIMEOUT) == 4


def test_result_that_cannot_be_unpickled_in_the_caller(serve_client):
    handle = _deploy(serve_client, "echo", echo_or_misbehave,
                     config={"max_concurrent_queries": 2})
    first, bad, last = _same_tick(serve_client, "echo", (1,), ("unloadable",), (2,))
    assert (first, last) == (1, 2)
    assert isinstance(bad, serve.SerializationError)
    assert "LoadsBadly refuses to be unpickled" in str(bad)
    for _ in range(3):
        with pytest.raises(serve.SerializationError, match="unpickled"):
            handle.remote("unloadable").result(timeout=TIMEOUT)
    assert handle.remote(5).result(timeout=TIMEOUT) == 5


def test_argument_that_cannot_be_unpickled_on_the_replica(serve_client):
    handle = _deploy(serve_client, "echo", echo_or_misbehave,
                     config={"max_concurrent_queries": 2})
    good, bad, also_good = _same_tick(serve_client, "echo", (1,), (LoadsBadly(),), (2,))
    assert (good, also_good) == (1, 2)
    assert isinstance(bad, serve.SerializationError)
    assert "LoadsBadly refuses to be unpickled" in str(bad) and "replica" in str(bad)
    for _ in range(3):
        with pytest.raises(serve.SerializationError):
            handle.remote(LoadsBadly()).result(timeout=TIMEOUT)
    assert handle.remote(6).result(timeout=TIMEOUT) == 6


# -- 2. no running replica: disconnects, max_queued_requests, queue deadline ---------------
def test_requests_of_disconnected_clients_leave_the_queue(serve_client, http_port):
    serve_client.create_backend("counter", Counter, config={"num_replicas": 0})
    serve_client.create_endpoint("counter", backend="counter", route="/count",
                                 methods=["GET", "POST"])
    body = b"x" * (256 * 1024)
    gone = 5
    for _ in range(gone):
        with socket.create_connection(("127.0.0.1", http_port), timeout=TIMEOUT) as sock:
            sock.sendall(b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                         % len(body) + body)
    # The proxy notices each client leaving and answers its request as 499.
    wait_until(lambda: _http_count(http_port, 499) >= gone, timeout=TIMEOUT,
               what="the proxy to drop the requests of disconnected clients")
    serve_client.update_backend_config("counter", {"num_replicas": 1})
    reply = requests.get(f"http://127.0.0.1:{http_port}/count", timeout=TIMEOUT)
    # Only this request reached the replica: none of the abandoned ones ran.
    assert reply.status_code == 200 and reply.json() == 1


def test_max_queued_requests_is_validated():
    assert serve.BackendConfig().max_queued_requests == -1
    assert serve.BackendConfig(max_queued_requests=0).max_queued_requests == 0
    for value, error in [(-2, ValueError), (1.5, TypeError), ("3", TypeError),
                         (True, TypeError)]:
        with pytest.raises(error, match="max_queued_requests"):
            serve.BackendConfig(max_queued_requests=value)


def test_handles_past_max_queued_requests_are_refused_at_once(serve_client):
    handle = _deploy(serve_client, "echo", echo_or_misbehave,
                     config={"num_replicas": 0, "max_queued_requests": 2})
    waiting = [handle.remote(i) for i in range(2)]
    with pytest.raises(serve.BackPressureError, match="max_queued_requests"):
        handle.remote(99).result(timeout=TIMEOUT)
    assert not any(f.done() for f in waiting)
    serve_client.update_backend_config("echo", {"num_replicas": 1})
    assert [f.result(timeout=TIMEOUT) for f in waiting] == [0, 1]


def test_http_past_max_queued_requests_gets_503_with_retry_after(serve_client, http_port):
    serve_client.create_backend("counter", Counter,
                                config={"num_replicas": 0, "max_queued_requests": 2})
    serve_client.create_endpoint("counter", backend="counter", route="/count")
    url = f"http://127.0.0.1:{http_port}/count"
    with ThreadPoolExecutor(max_workers=3) as pool:
        replies = [pool.submit(requests.get, url, timeout=TIMEOUT) for _ in range(3)]
        refused = next(iter(_first_done(replies))).result()
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"] == "BackPressureError"
        assert "counter" in refused.json()["message"]
        serve_client.update_backend_config("counter", {"num_replicas": 1})
        statuses = sorted(r.result(timeout=TIMEOUT).status_code for r in replies)
    assert statuses == [200, 200, 503]


def _first_done(futures):
    from concurrent.futures import FIRST_COMPLETED, wait
    done, _ = wait(futures, timeout=TIMEOUT, return_when=FIRST_COMPLETED)
    assert done, "no request was answered"
    return done


def test_queue_timeout_has_a_default_and_is_validated():
    assert serve.BackendConfig().queue_timeout_s == 30.0
    assert serve.BackendConfig(queue_timeout_s=None).queue_timeout_s is None
    for value, error in [(0, ValueError), (-1, ValueError), ("5", TypeError)]:
        with pytest.raises(error, match="queue_timeout_s"):
            serve.BackendConfig(queue_timeout_s=value)


@pytest.mark.parametrize("why", ["no replica", "pending replica"])
def test_requests_fail_after_queue_timeout_when_no_replica_runs(serve_client, http_port, why):
    if why == "no replica":
        kwargs = {"config": {"num_replicas": 0, "queue_timeout_s": 0.5}}
    else:
        kwargs = {"config": {"queue_timeout_s": 0.5},
                  "replica_options": {"resources": {"unobtainium": 1}}}
    serve_client.create_backend("nowhere", echo_or_misbehave, **kwargs)
    serve_client.create_endpoint("nowhere", backend="nowhere", route="/nowhere")
    handle = serve_client.get_handle("nowhere")
    with pytest.raises(serve.QueueTimeoutError) as caught:
        handle.remote(1).result(timeout=TIMEOUT)
    assert isinstance(caught.value, serve.BackPressureError)
    assert "'nowhere'" in str(caught.value) and "no running replica" in str(caught.value)
    reply = requests.get(f"http://127.0.0.1:{http_port}/nowhere", timeout=TIMEOUT)
    assert reply.status_code == 503 and reply.headers["Retry-After"] == "1"
    assert reply.json()["error"] == "QueueTimeoutError"
    assert "'nowhere'" in reply.json()["message"]


# -- 3. hung handlers ------------------------------------------------------------------------
def test_timed_out_async_requests_free_their_slots_and_are_cancelled(own_serve, http_port):
    client, url = own_serve(request_timeout_s=1.0), f"http://127.0.0.1:{http_port}"
    handle = _deploy(client, "hangs", Hangs, route="/hangs",
                     config={"max_concurrent_queries": 2})
    for _ in range(3):  # more than max_concurrent_queries
        assert requests.get(f"{url}/hangs?hang=1", timeout=TIMEOUT).status_code == 504
    reply = requests.get(f"{url}/hangs", timeout=TIMEOUT)
    assert reply.status_code == 200 and reply.text == "ok"
    counts = handle.options(method_name="cancellations")
    wait_until(lambda: counts.remote().result(timeout=TIMEOUT) == 3, timeout=TIMEOUT,
               what="the replica to cancel the three abandoned requests")
    # Nothing left in flight: the scale-down drains at once instead of waiting for
    # its timeout.
    _in_background(client.update_backend_config, "hangs",
                   {"num_replicas": 0}).result(timeout=60)


def test_cancelled_handle_calls_free_their_slots_and_are_cancelled(serve_client):
    handle = _deploy(serve_client, "hangs", Hangs, config={"max_concurrent_queries": 1})
    hang = serve_client.get_handle("hangs", sync=False).options(method_name="hang")

    async def give_up():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(hang.remote(), 0.5)

    for _ in range(2):
        serve_client.dask_client.sync(give_up)
    assert handle.options(method_name="echo").remote(1).result(timeout=TIMEOUT) == 1
    counts = handle.options(method_name="cancellations")
    wait_until(lambda: counts.remote().result(timeout=TIMEOUT) == 2, timeout=TIMEOUT,
               what="the replica to cancel the abandoned calls")


def test_cancelling_one_call_of_a_message_spares_its_siblings(serve_client):
    _deploy(serve_client, "hangs", Hangs, config={"max_concurrent_queries": 3})
    handle = serve_client.get_handle("hangs", sync=False)
    echo, nap, hang = (handle.options(method_name=m) for m in ("echo", "nap", "hang"))

    async def run():
        # One message: the echo comes back at once, the rest stay under its ticket.
        calls = [asyncio.ensure_future(c) for c in (echo.remote(1), nap.remote(0.5),
                                                    hang.remote())]
        assert await asyncio.wait_for(calls[0], TIMEOUT) == 1
        calls[2].cancel()
        napped = await asyncio.wait_for(calls[1], TIMEOUT)
        # Every slot is free again: three calls in one tick all get a replica.
        again = await asyncio.wait_for(asyncio.gather(*(echo.remote(i) for i in range(3))),
                                       TIMEOUT)
        return napped, again

    assert serve_client.dask_client.sync(run) == (0.5, [0, 1, 2])
    counts = serve_client.get_handle("hangs").options(method_name="cancellations")
    wait_until(lambda: counts.remote().result(timeout=TIMEOUT) == 1, timeout=TIMEOUT,
               what="the replica to cancel the abandoned call")


# warm: a first request returned, so the rest take the thread lane (daskserve/lane.py)
@pytest.mark.parametrize("warm", [False, True])
def test_timed_out_sync_requests_never_hold_up_a_scale_down(own_serve, dask_client,
                                                            http_port, warm):
    client, url = own_serve(request_timeout_s=1.0), f"http://127.0.0.1:{http_port}"
    dask_client.run(_reset_sync_hangs)
    _deploy(client, "sync_hang", sync_hang, route="/sync_hang",
            config={"max_concurrent_queries": 2})
    if warm:
        assert requests.get(f"{url}/sync_hang?n=warm", timeout=TIMEOUT).text == "warm"
    try:
        for n in range(4):
            assert requests.get(f"{url}/sync_hang?n={n}", timeout=TIMEOUT).status_code == 504
        # Both threads of the replica's pool are stuck in user code: the scale-down
        # must still not wait for them, since nobody waits for their answers.
        _in_background(client.update_backend_config, "sync_hang",
                       {"num_replicas": 0}).result(timeout=60)
    finally:
        started = sum(dask_client.run(_release_sync_hangs).values())
    # The pool stayed bounded: the two requests that queued behind the stuck threads
    # were given up before they started, so they never ran.
    assert started == 2


# -- 7. results nobody collects ----------------------------------------------------------------
CALLER = textwrap.dedent("""
    import asyncio, sys
    from distributed import Client
    import daskserve as serve

    client = Client(sys.argv[1])
    handle = serve.connect(client).get_handle("slow", sync=False)

    async def main():
        await handle.remote(0)   # the router has its routing table
        # One message: the first result comes back at once, a ticket holds the rest.
        calls = [asyncio.ensure_future(handle.remote(d)) for d in (0, 1, 3600)]
        await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
        print("first result in", flush=True)
        await asyncio.sleep(3600)

    client.sync(main)
""")


def _replica_state(dask_worker):
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    executors = getattr(plugin, "executors", {})
    return {tag: (e.in_flight, len(e._tickets)) for tag, e in executors.items()}


def test_results_of_a_dead_caller_expire_and_free_the_replica(tmp_path):
    script = tmp_path / "caller.py"
    script.write_text(CALLER)
    with dask.config.set({"daskserve.uncollected-result-ttl": "1s"}), \
            LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                         dashboard_address=":0") as cluster, Client(cluster) as dask_client:
        client = serve.start(dask_client, http_options={"port": free_port()})
        try:
            client.create_backend("slow", slow)
            client.create_endpoint("slow", backend="slow")
            caller = subprocess.Popen([sys.executable, str(script), cluster.scheduler_address],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
            try:
                line = _in_background(caller.stdout.readline).result(timeout=60)
                assert line.strip() == "first result in", line
            finally:
                caller.kill()
                caller.wait(timeout=TIMEOUT)

            def idle():
                states = [s for worker in dask_client.run(_replica_state).values()
                          for s in worker.values()]
                return states and all(s == (0, 0) for s in states)

            # The 1 s call finishes into a dead connection and the hour-long one is
            # never collected: both leave the replica's books.
            wait_until(idle, timeout=60, what="the dead caller's results to expire")
            _in_background(client.update_backend_config, "slow",
                           {"num_replicas": 0}).result(timeout=60)
        finally:
            client.shutdown()
