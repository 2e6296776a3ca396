"""Handles: sync and async calls, options, pickling, composition, errors, context."""
from __future__ import annotations

import asyncio
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import cloudpickle
import pytest
import requests

import daskserve as serve

TIMEOUT = 30  # safety limit for every remote result


# -- backends ---------------------------------------------------------------------------
def record_call(*args, **kwargs):
    return {"args": args, "kwargs": kwargs}


def double(x):
    return 2 * x


async def async_increment(x):
    await asyncio.sleep(0)
    return x + 1


class Model:
    def __init__(self, weight):
        self.weight = weight

    def __call__(self, x):
        return ("call", x)

    def predict(self, x, scale=1):
        return ("predict", x * self.weight * scale)

    async def apredict(self, x):
        await asyncio.sleep(0)
        return ("apredict", x * self.weight)

    def _private(self):
        return "secret"


class ModelError(Exception):
    """A user exception type the caller must get back as itself."""


def fail_with_model_error(x):
    raise ModelError(f"cannot score {x!r}")


def fail_with_key_error(x):
    return {}[x]


def unpicklable_result(x):
    return threading.Lock()


class Composer:
    """Sync composition: a handle fetched in __init__, called from a sync handler."""

    def __init__(self):
        self.inner = serve.get_handle("doubler")

    def __call__(self, x):
        if hasattr(x, "query_params"):  # an HTTP request
            x = int(x.query_params["x"])
        return self.inner.remote(x).result(timeout=TIMEOUT) + 1


class AsyncComposer:
    """Async composition: an async handle awaited from an async handler."""

    def __init__(self):
        self.inner = serve.get_handle("doubler", sync=False)

    async def __call__(self, x):
        first, second = await asyncio.gather(self.inner.remote(x), self.inner.remote(x + 1))
        return first + second


class GivenHandle:
    """Composition through a handle passed in as an init arg (pickled to the worker)."""

    def __init__(self, handle):
        self.handle = handle

    def __call__(self, x):
        return ["outer", self.handle.remote(x).result(timeout=TIMEOUT)]


class ForwardsErrors:
    def __init__(self):
        self.inner = serve.get_handle("failing")

    def __call__(self, x):
        try:
            self.inner.remote(x).result(timeout=TIMEOUT)
        except ModelError as exc:
            return f"caught ModelError: {exc}"
        return "no error"


def whoami(*args):
    ctx = serve.get_replica_context()
    return {"backend_tag": ctx.backend_tag, "replica_tag": ctx.replica_tag}


async def async_whoami(*args):
    ctx = serve.get_replica_context()
    return {"backend_tag": ctx.backend_tag, "replica_tag": ctx.replica_tag}


# -- helpers ----------------------------------------------------------------------------
def _deploy(client, name, backend, *init_args, **kwargs):
    client.create_backend(name, backend, *init_args, **kwargs)
    client.create_endpoint(name, backend=name)
    return client.get_handle(name)


# -- sync handles -----------------------------------------------------------------------
def test_sync_handle_returns_future_result(serve_client):
    handle = _deploy(serve_client, "double", double)
    assert isinstance(handle, serve.ServeHandle)
    future = handle.remote(21)
    assert future.result(timeout=TIMEOUT) == 42


def test_args_and_kwargs_pass_straight_through(serve_client):
    handle = _deploy(serve_client, "record", record_call)
    result = handle.remote(1, "two", [3], key="value", n=None).result(timeout=TIMEOUT)
    assert result == {"args": (1, "two", [3]), "kwargs": {"key": "value", "n": None}}
    assert handle.remote().result(timeout=TIMEOUT) == {"args": (), "kwargs": {}}
    payload = {"nested": {"set": {1, 2}}, "bytes": b"\x00\xff"}
    assert handle.remote(payload).result(timeout=TIMEOUT) == {"args": (payload,),
                                                               "kwargs": {}}


def test_many_calls_from_many_threads(serve_client):
    handle = _deploy(serve_client, "double", double, config={"num_replicas": 2})
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = list(pool.map(lambda i: handle.remote(i), range(300)))
    assert [f.result(timeout=TIMEOUT) for f in futures] == [2 * i for i in range(300)]


def test_options_method_name(serve_client):
    handle = _deploy(serve_client, "model", Model, 10)
    predict = handle.options(method_name="predict")
    assert predict.remote(2).result(timeout=TIMEOUT) == ("predict", 20)
    assert predict.remote(2, scale=3).result(timeout=TIMEOUT) == ("predict", 60)
    apredict = handle.options(method_name="apredict")
    assert apredict.remote(4).result(timeout=TIMEOUT) == ("apredict", 40)
    # options() returns a new handle; the original still calls __call__.
    assert handle.remote(2).result(timeout=TIMEOUT) == ("call", 2)


def test_unknown_or_private_method_name_raises(serve_client):
    handle = _deploy(serve_client, "model", Model, 1)
    with pytest.raises(AttributeError, match="no_such_method"):
        handle.options(method_name="no_such_method").remote(1).result(timeout=TIMEOUT)
    with pytest.raises(AttributeError):
        handle.options(method_name="_private").remote().result(timeout=TIMEOUT)
    assert handle.remote(5).result(timeout=TIMEOUT) == ("call", 5)


# -- async handles -------------------------------------------------------------------------
def test_async_handle_inside_asyncio_run(serve_client):
    _deploy(serve_client, "inc", async_increment)
    handle = serve_client.get_handle("inc", sync=False)
    assert isinstance(handle, serve.AsyncServeHandle)

    async def main():
        single = await handle.remote(1)
        many = await asyncio.gather(*(handle.remote(i) for i in range(50)))
        return single, many

    single, many = asyncio.run(main())
    assert single == 2
    assert many == [i + 1 for i in range(50)]


def test_async_handle_with_options(serve_client):
    _deploy(serve_client, "model", Model, 3)
    handle = serve_client.get_handle("model", sync=False).options(method_name="predict")

    async def main():
        return await handle.remote(5, scale=2)

    assert asyncio.run(main()) == ("predict", 30)


def test_async_handle_raises_user_exception(serve_client):
    _deploy(serve_client, "failing", fail_with_model_error)
    handle = serve_client.get_handle("failing", sync=False)

    async def main():
        return await handle.remote("x")

    with pytest.raises(ModelError, match="cannot score 'x'"):
        asyncio.run(main())


# -- pickling ------------------------------------------------------------------------------
@pytest.mark.parametrize("dumps, loads", [(pickle.dumps, pickle.loads),
                                          (cloudpickle.dumps, cloudpickle.loads)])
def test_handles_are_picklable(serve_client, dumps, loads):
    handle = _deploy(serve_client, "model", Model, 2)
    copy = loads(dumps(handle.options(method_name="predict")))
    assert copy.endpoint_name == "model"
    assert copy.remote(4).result(timeout=TIMEOUT) == ("predict", 8)

    async_copy = loads(dumps(serve_client.get_handle("model", sync=False)))

    async def main():
        return await async_copy.remote(1)

    assert asyncio.run(main()) == ("call", 1)


# -- composition ----------------------------------------------------------------------------
def test_composition_sync_handler_with_sync_handle(serve_client, base_url):
    _deploy(serve_client, "doubler", double)
    serve_client.create_backend("composer", Composer)
    serve_client.create_endpoint("composer", backend="composer", route="/compose")
    handle = serve_client.get_handle("composer")
    assert handle.remote(20).result(timeout=TIMEOUT) == 41
    reply = requests.get(f"{base_url}/compose", params={"x": "5"}, timeout=TIMEOUT)
    assert reply.status_code == 200 and reply.json() == 11


def test_composition_async_handler_with_async_handle(serve_client):
    _deploy(serve_client, "doubler", double)
    handle = _deploy(serve_client, "async_composer", AsyncComposer)
    assert handle.remote(10).result(timeout=TIMEOUT) == 20 + 22
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: handle.remote(i).result(timeout=TIMEOUT), range(40)))
    assert results == [2 * i + 2 * (i + 1) for i in range(40)]


def test_composition_with_handle_passed_as_init_arg(serve_client):
    inner = _deploy(serve_client, "model", Model, 7)
    outer = _deploy(serve_client, "outer", GivenHandle, inner.options(method_name="predict"))
    assert outer.remote(3).result(timeout=TIMEOUT) == ["outer", ("predict", 21)]


def test_composition_propagates_inner_exception_type(serve_client):
    _deploy(serve_client, "failing", fail_with_model_error)
    handle = _deploy(serve_client, "forwarder", ForwardsErrors)
    assert handle.remote(9).result(timeout=TIMEOUT) == "caught ModelError: cannot score 9"


# -- errors ---------------------------------------------------------------------------------
def test_handler_exception_is_raised_with_original_type(serve_client):
    handle = _deploy(serve_client, "failing", fail_with_model_error)
    with pytest.raises(ModelError, match="cannot score 42"):
        handle.remote(42).result(timeout=TIMEOUT)
    _deploy(serve_client, "keyerror", fail_with_key_error)
    with pytest.raises(KeyError, match="missing"):
        serve_client.get_handle("keyerror").remote("missing").result(timeout=TIMEOUT)
    # The replica survives its handler's exceptions.
    with pytest.raises(ModelError):
        handle.remote(1).result(timeout=TIMEOUT)


def test_unpicklable_result_raises_naming_the_type(serve_client):
    handle = _deploy(serve_client, "unpicklable", unpicklable_result)
    with pytest.raises(TypeError, match="lock"):
        handle.remote(1).result(timeout=TIMEOUT)


def test_get_handle_of_unknown_endpoint_raises_key_error(serve_client):
    with pytest.raises(KeyError, match="nowhere"):
        serve_client.get_handle("nowhere")
    with pytest.raises(KeyError):
        serve_client.get_handle("nowhere", sync=False)
    with pytest.raises(KeyError):
        serve.get_handle("nowhere")


def test_one_error_type_for_an_endpoint_that_does_not_exist(serve_client):
    """Every way of naming a missing endpoint raises EndpointNotFoundError, which is a
    KeyError and a ValueError too."""
    attempts = [
        lambda: serve_client.get_handle("nowhere"),
        lambda: serve_client.set_traffic("nowhere", {"x": 1.0}),
        lambda: serve_client.delete_endpoint("nowhere"),
    ]
    serve_client.create_backend("present", double)
    attempts.append(lambda: serve_client.shadow_traffic("nowhere", "present", 0.5))
    serve_client.create_endpoint("gone", backend="present")
    handle = serve_client.get_handle("gone")
    serve_client.delete_endpoint("gone")
    attempts.append(lambda: handle.remote().result(timeout=TIMEOUT))
    for attempt in attempts:
        with pytest.raises(serve.EndpointNotFoundError, match="does not exist") as info:
            attempt()
        assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


# -- replica context ----------------------------------------------------------------------
def test_replica_context_in_handler(serve_client):
    handle = _deploy(serve_client, "whoami", whoami, config={"num_replicas": 2})
    seen = [handle.remote().result(timeout=TIMEOUT) for _ in range(40)]
    assert {s["backend_tag"] for s in seen} == {"whoami"}
    replica_tags = {s["replica_tag"] for s in seen}
    assert all(isinstance(tag, str) and tag for tag in replica_tags)
    # Two replicas, two identities (40 calls all on one of two replicas: odds ~2**-39).
    assert len(replica_tags) == 2


def test_replica_context_in_async_handler(serve_client):
    handle = _deploy(serve_client, "async_whoami", async_whoami)
    ctx = handle.remote().result(timeout=TIMEOUT)
    assert ctx["backend_tag"] == "async_whoami"
    assert ctx["replica_tag"]


def test_replica_context_outside_a_replica_raises():
    with pytest.raises(RuntimeError):
        serve.get_replica_context()
