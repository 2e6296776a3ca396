"""The thread lane: lone requests to ``def`` handlers run in the thread that reads them.

The replica reports the thread each call ran on, which tells the lane (its threads
are named ``daskserve-lane``) from the handler pool and the event loop.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import daskserve as serve
from daskserve.channel import Channel, ChannelError
from daskserve.lane import LaneServer

TIMEOUT = 30
LANE = "daskserve-lane"


def thread_name(*args):
    return threading.current_thread().name


async def thread_name_async(*args):
    return threading.current_thread().name


@serve.accept_batch
def thread_names_batched(requests_):
    return [threading.current_thread().name] * len(requests_)


class Mixed:
    def __call__(self, request):
        return threading.current_thread().name

    async def on_loop(self):
        return threading.current_thread().name

    def slow(self, seconds):
        time.sleep(seconds)
        return threading.current_thread().name


def _deploy(client, name, backend, **config):
    client.create_backend(name, backend, config=config)
    client.create_endpoint(name, backend=name, route=f"/{name}")


def _http_threads(base_url, name, count):
    return [requests.get(f"{base_url}/{name}", timeout=TIMEOUT).text for _ in range(count)]


def test_lone_requests_to_a_def_handler_take_the_lane(serve_client, base_url):
    _deploy(serve_client, "lane_def", thread_name)
    first, *rest = _http_threads(base_url, "lane_def", 4)
    assert first.startswith("daskserve-lane_def#")  # the first finds out: handler pool
    assert rest == [LANE] * 3
    handle = serve_client.get_handle("lane_def")  # its own router, which learns too
    assert [handle.remote().result(timeout=TIMEOUT) for _ in range(3)][1:] == [LANE] * 2


def test_async_and_batched_handlers_never_take_it(serve_client, base_url):
    _deploy(serve_client, "lane_async", thread_name_async)
    _deploy(serve_client, "lane_batched", thread_names_batched, max_batch_size=4)
    for name in ("lane_async", "lane_batched"):
        threads = set(_http_threads(base_url, name, 4))
        assert LANE not in threads, (name, threads)
    # A class: its def methods take the lane, its async ones stay on the loop.
    _deploy(serve_client, "lane_mixed", Mixed)
    assert _http_threads(base_url, "lane_mixed", 3)[1:] == [LANE] * 2
    on_loop = serve_client.get_handle("lane_mixed").options(method_name="on_loop")
    assert LANE not in {on_loop.remote().result(timeout=TIMEOUT) for _ in range(3)}


def test_scale_down_lets_lane_calls_finish(serve_client):
    _deploy(serve_client, "lane_drain", Mixed, num_replicas=1)
    slow = serve_client.get_handle("lane_drain").options(method_name="slow")
    assert slow.remote(0).result(timeout=TIMEOUT) != LANE  # learnt: lane from now on
    running = slow.remote(2.0)
    time.sleep(0.5)  # it is running on the lane now
    serve_client.update_backend_config("lane_drain", {"num_replicas": 0})
    assert running.result(timeout=TIMEOUT) == LANE  # drained, not cut off


def test_concurrent_lone_requests_all_answer(serve_client, base_url):
    _deploy(serve_client, "lane_load", Mixed, sync_threads=3)
    _http_threads(base_url, "lane_load", 1)
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(
            lambda _: requests.get(f"{base_url}/lane_load", timeout=TIMEOUT), range(300)))
    assert {reply.status_code for reply in replies} == {200}
    assert LANE in {reply.text for reply in replies}


def _stop_lane(dask_worker):
    dask_worker.plugins["daskserve-worker"].lane.stop()


def _restart_lane(dask_worker):
    plugin = dask_worker.plugins["daskserve-worker"]
    plugin.lane.start(dask_worker.address, None)


def test_an_unreachable_lane_leaves_requests_to_the_channel(serve_client, base_url,
                                                            dask_client):
    _deploy(serve_client, "lane_gone", thread_name)
    assert _http_threads(base_url, "lane_gone", 2)[1] == LANE
    dask_client.run(_stop_lane)  # its connections close, and it refuses new ones
    try:
        threads = _http_threads(base_url, "lane_gone", 5)
    finally:
        dask_client.run(_restart_lane)
    assert LANE not in threads
    assert all(name.startswith("daskserve-lane_gone#") for name in threads), threads


def test_the_lane_server_answers_its_frames_and_shrugs_off_stray_bytes():
    server = LaneServer("double", lambda x: 2 * x)
    address = server.start("tcp://127.0.0.1:1", None)
    try:
        host, port = address[len("tcp://"):].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as stray:
            # Not a frame: its first four bytes read as a length of about 1.2 GB.
            stray.sendall(b"GET / HTTP/1.1\r\nHost: lane\r\n\r\n")

        async def use() -> int:
            channel = await Channel.open(address, None)
            try:
                with pytest.raises(ChannelError, match="unknown lane operation"):
                    await channel.request("triple", x=1)
                return await asyncio.wait_for(channel.request("double", x=21), 5)
            finally:
                channel.close()

        assert asyncio.run(use()) == 42
    finally:
        server.stop()
