"""@accept_batch: batches form, wrong lengths and exceptions fail only their batch."""
from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor

import cloudpickle
import pytest
import requests

import daskserve as serve

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SizeRecorder:
    """Returns, for each input, the size of the batch it travelled in."""

    def __init__(self):
        self.sizes = []

    @serve.accept_batch
    def __call__(self, items):
        self.sizes.append(len(items))
        return [len(items)] * len(items)

    def batch_sizes(self):
        return self.sizes


class AsyncDoubler:
    @serve.accept_batch
    async def __call__(self, items):
        await asyncio.sleep(0.01)
        return [2 * x for x in items]


@serve.accept_batch
def http_batch(requests_):
    return [r.query_params["x"] for r in requests_]


@serve.accept_batch
def wrong_length(items):
    return items[:-1] if len(items) > 1 else []


@serve.accept_batch
def fails_on_poison(items):
    if "poison" in items:
        raise ValueError("poisoned batch")
    return [x.upper() for x in items]


def _gather(handle, args):
    async def run():
        return await asyncio.gather(*(handle.remote(a) for a in args),
                                    return_exceptions=True)
    return asyncio.run(run())


def test_sync_batches_fill_up_to_max_batch_size(serve_client):
    serve_client.create_backend("sizes", SizeRecorder,
                                config={"max_batch_size": 8, "batch_wait_timeout": 0.2})
    serve_client.create_endpoint("sizes", backend="sizes")
    handle = serve_client.get_handle("sizes", sync=False)
    results = _gather(handle, range(32))
    assert all(isinstance(r, int) and 1 <= r <= 8 for r in results)
    sizes = serve_client.get_handle("sizes").options(method_name="batch_sizes").remote().result(30)
    assert sum(sizes) == 32
    assert max(sizes) == 8  # with a 0.2 s wait, 32 concurrent calls fill whole batches


def test_async_batch_handler_over_handles(serve_client):
    serve_client.create_backend("double", AsyncDoubler, config={"max_batch_size": 4})
    serve_client.create_endpoint("double", backend="double")
    assert _gather(serve_client.get_handle("double", sync=False), range(10)) == \
        [2 * x for x in range(10)]


def test_batch_handler_over_http(serve_client, base_url):
    serve_client.create_backend("echo", http_batch,
                                config={"max_batch_size": 5, "batch_wait_timeout": 0.05})
    serve_client.create_endpoint("echo", backend="echo", route="/echo")
    with ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(lambda i: requests.get(f"{base_url}/echo?x={i}", timeout=30),
                                range(20)))
    assert [r.text for r in replies] == [str(i) for i in range(20)]


def test_wrong_length_fails_every_request_of_the_batch(serve_client, base_url):
    serve_client.create_backend("short", wrong_length, config={"max_batch_size": 4})
    serve_client.create_endpoint("short", backend="short", route="/short")
    results = _gather(serve_client.get_handle("short", sync=False), range(4))
    assert all(isinstance(r, ValueError) and "same length" in str(r) for r in results)
    reply = requests.get(f"{base_url}/short", timeout=30)
    assert reply.status_code == 500
    assert reply.json()["error"] == "BatchLengthError"


def test_exception_fails_only_its_batch(serve_client):
    serve_client.create_backend("poison", fails_on_poison,
                                config={"max_batch_size": 2, "batch_wait_timeout": 0.2})
    serve_client.create_endpoint("poison", backend="poison")
    handle = serve_client.get_handle("poison", sync=False)
    results = _gather(handle, ["a", "b", "poison", "c"])
    failed = [r for r in results if isinstance(r, ValueError)]
    assert 1 <= len(failed) <= 2 and all("poisoned batch" in str(r) for r in failed)
    assert isinstance(results[2], ValueError)
    for item, result in zip(["a", "b", "poison", "c"], results):
        assert isinstance(result, ValueError) or result == item.upper()
    assert sum(isinstance(r, str) for r in results) >= 2  # the other batch succeeded


def test_max_batch_size_above_concurrency_limit_is_refused(serve_client):
    with pytest.raises(ValueError, match="max_concurrent_queries"):
        serve_client.create_backend("big", SizeRecorder,
                                    config={"max_batch_size": 200,
                                            "max_concurrent_queries": 100})
    with pytest.raises(ValueError, match="max_batch_size"):
        serve.BackendConfig(max_batch_size=10, max_concurrent_queries=5)


def test_max_batch_size_requires_accept_batch(serve_client):
    def plain(x):
        return x
    with pytest.raises(Exception, match="accept_batch"):
        serve_client.create_backend("plain", plain, config={"max_batch_size": 4})
    assert "plain" not in serve_client.list_backends()
