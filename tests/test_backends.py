"""Backends: functions, classes, import paths, listing, config, deletion, errors."""
from __future__ import annotations

import asyncio
import importlib
import os
import sys
import textwrap
import uuid

import pytest
import requests

import daskserve as serve

TIMEOUT = 30  # safety limit for every remote result


# -- backends (module level: workers import this module by name) ----------------------
def echo(request):
    return {"x": request.query_params.get("x"), "method": request.method}


def add_one(x):
    return x + 1


def add_two(x):
    return x + 2


async def async_double(x):
    await asyncio.sleep(0)
    return 2 * x


class Counter:
    """Stateful class backend: constructed once per replica with init_args."""

    def __init__(self, start, step):
        self.value = start
        self.step = step

    def __call__(self, *args):
        self.value += self.step
        return self.value


class AsyncScaler:
    def __init__(self, factor):
        self.factor = factor

    async def __call__(self, x):
        await asyncio.sleep(0)
        return self.factor * x


class Configurable:
    def __init__(self):
        self.config = None

    def reconfigure(self, config):
        self.config = config

    def __call__(self, *args):
        return self.config


class ContextInInit:
    def __init__(self):
        ctx = serve.get_replica_context()
        self.seen = (ctx.backend_tag, ctx.replica_tag)

    def __call__(self, *args):
        return list(self.seen)


class BrokenInit:
    def __init__(self, message):
        raise ValueError(message)

    def __call__(self, *args):
        return "unreachable"


def _wait(handle, *args, **kwargs):
    return handle.remote(*args, **kwargs).result(timeout=TIMEOUT)


def _fresh(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


# -- function, class and import-path backends ---------------------------------------------
def test_function_backend_over_http_and_handle(serve_client, base_url):
    serve_client.create_backend("echo", echo)
    serve_client.create_endpoint("echo", backend="echo", route="/echo")
    reply = requests.get(f"{base_url}/echo", params={"x": "7"}, timeout=TIMEOUT)
    assert reply.status_code == 200
    assert reply.json() == {"x": "7", "method": "GET"}

    serve_client.create_backend("add_one", add_one)
    serve_client.create_endpoint("add_one", backend="add_one")
    assert _wait(serve_client.get_handle("add_one"), 41) == 42


def test_async_function_backend(serve_client):
    serve_client.create_backend("double", async_double)
    serve_client.create_endpoint("double", backend="double")
    assert _wait(serve_client.get_handle("double"), 21) == 42


def test_class_backend_is_built_once_with_init_args(serve_client):
    serve_client.create_backend("counter", Counter, 100, 5)
    serve_client.create_endpoint("counter", backend="counter")
    handle = serve_client.get_handle("counter")
    # One replica, one instance: state carries over from call to call.
    assert [_wait(handle) for _ in range(3)] == [105, 110, 115]


def test_async_class_backend_with_init_args(serve_client, base_url):
    serve_client.create_backend("scaler", AsyncScaler, 3)
    serve_client.create_endpoint("scaler", backend="scaler")
    assert _wait(serve_client.get_handle("scaler"), 14) == 42


def test_class_backend_over_http(serve_client, base_url):
    serve_client.create_backend("counter", Counter, 0, 1)
    serve_client.create_endpoint("counter", backend="counter", route="/count")
    values = [requests.get(f"{base_url}/count", timeout=TIMEOUT).json() for _ in range(3)]
    assert values == [1, 2, 3]


def test_import_path_class_backend_with_init_args(serve_client, base_url):
    serve_client.create_backend("greeter", "importable_backend.Greeter", "bonjour", "?")
    serve_client.create_endpoint("greeter", backend="greeter", route="/greet")
    handle = serve_client.get_handle("greeter")
    assert _wait(handle, "ada") == "bonjour, ada?"
    reply = requests.get(f"{base_url}/greet", params={"name": "bob"}, timeout=TIMEOUT)
    assert reply.status_code == 200
    assert reply.text == "bonjour, bob?"
    # The instance lives on a worker process, not in the driver.
    assert _wait(handle.options(method_name="where")) != os.getpid()


def test_import_path_function_backend(serve_client):
    serve_client.create_backend("triple", "importable_backend.triple")
    serve_client.create_endpoint("triple", backend="triple")
    assert _wait(serve_client.get_handle("triple"), 14) == 42


def test_import_path_is_resolved_on_the_worker_only(serve_client, dask_client, tmp_path):
    """The caller need not have the package: only the workers can import it here."""
    module = _fresh("worker_only_model")
    (tmp_path / f"{module}.py").write_text(textwrap.dedent("""
        class Model:
            def __init__(self, bias):
                self.bias = bias

            def __call__(self, x):
                return x + self.bias
    """))
    directory = str(tmp_path)

    def add_path(path=directory):
        import sys
        sys.path.insert(0, path)

    def remove_path(path=directory):
        import sys
        while path in sys.path:
            sys.path.remove(path)

    assert directory not in sys.path
    with pytest.raises(ImportError):
        importlib.import_module(module)
    dask_client.run(add_path)
    try:
        serve_client.create_backend("only_on_workers", f"{module}.Model", 40)
        serve_client.create_endpoint("only_on_workers", backend="only_on_workers")
        assert _wait(serve_client.get_handle("only_on_workers"), 2) == 42
    finally:
        dask_client.run(remove_path)


def test_unimportable_path_fails_and_leaves_no_backend(serve_client):
    with pytest.raises(Exception) as info:
        serve_client.create_backend("ghost", "no_such_package_xyz.Model")
    message = str(info.value)
    assert "ghost" in message
    assert "no_such_package_xyz" in message
    assert "ghost" not in serve_client.list_backends()


def test_import_path_to_non_callable_fails(serve_client):
    with pytest.raises(Exception) as info:
        serve_client.create_backend("notcallable", "importable_backend.NOT_CALLABLE")
    assert "notcallable" in str(info.value)
    assert "notcallable" not in serve_client.list_backends()


def test_replica_context_is_available_in_constructor(serve_client):
    serve_client.create_backend("ctx_init", ContextInInit)
    serve_client.create_endpoint("ctx_init", backend="ctx_init")
    backend_tag, replica_tag = _wait(serve_client.get_handle("ctx_init"))
    assert backend_tag == "ctx_init"
    assert isinstance(replica_tag, str) and replica_tag


# -- listing and config -----------------------------------------------------------------
def test_list_backends_shape(serve_client):
    assert serve_client.list_backends() == {}
    serve_client.create_backend("plain", add_one)
    serve_client.create_backend(
        "tuned", Configurable,
        config={"num_replicas": 2, "max_concurrent_queries": 7, "user_config": {"k": [1, 2]}})
    backends = serve_client.list_backends()
    assert set(backends) == {"plain", "tuned"}

    plain = backends["plain"]
    assert plain["num_replicas"] == 1
    assert plain["max_batch_size"] is None
    assert plain["batch_wait_timeout"] == 0.0
    assert plain["max_concurrent_queries"] == 100
    assert plain["user_config"] is None

    tuned = backends["tuned"]
    assert tuned["num_replicas"] == 2
    assert tuned["max_concurrent_queries"] == 7
    assert tuned["user_config"] == {"k": [1, 2]}
    # Every BackendConfig field is present in each entry.
    fields = set(serve.BackendConfig().to_dict())
    assert fields <= set(plain) and fields <= set(tuned)


def test_user_config_reaches_reconfigure(serve_client):
    serve_client.create_backend("conf", Configurable, config={"user_config": {"threshold": 0.5}})
    serve_client.create_endpoint("conf", backend="conf")
    assert _wait(serve_client.get_handle("conf")) == {"threshold": 0.5}


def test_get_backend_config_returns_backend_config(serve_client):
    serve_client.create_backend(
        "cfg", add_one,
        config=serve.BackendConfig(num_replicas=2, max_concurrent_queries=9))
    config = serve_client.get_backend_config("cfg")
    assert isinstance(config, serve.BackendConfig)
    assert config.num_replicas == 2
    assert config.max_concurrent_queries == 9
    assert config.max_batch_size is None
    assert config.batch_wait_timeout == 0.0
    assert config.user_config is None


def test_get_backend_config_of_unknown_backend_raises(serve_client):
    with pytest.raises(ValueError, match="nope"):
        serve_client.get_backend_config("nope")


# -- deletion --------------------------------------------------------------------------
def test_delete_backend_refused_while_an_endpoint_routes_to_it(serve_client):
    serve_client.create_backend("model_v1", add_one)
    serve_client.create_endpoint("predictor", backend="model_v1")
    with pytest.raises(ValueError) as info:
        serve_client.delete_backend("model_v1")
    assert "predictor" in str(info.value)
    # Nothing changed: the backend still serves its endpoint.
    assert "model_v1" in serve_client.list_backends()
    assert _wait(serve_client.get_handle("predictor"), 1) == 2


def test_delete_backend_refused_while_an_endpoint_shadows_to_it(serve_client):
    serve_client.create_backend("primary", add_one)
    serve_client.create_backend("shadow", add_two)
    serve_client.create_endpoint("shadowed_ep", backend="primary")
    serve_client.shadow_traffic("shadowed_ep", "shadow", 0.5)
    with pytest.raises(ValueError) as info:
        serve_client.delete_backend("shadow")
    assert "shadowed_ep" in str(info.value)
    assert "shadow" in serve_client.list_backends()


def test_delete_backend_after_endpoint_deleted_and_tag_reuse(serve_client):
    serve_client.create_backend("model", add_one)
    serve_client.create_endpoint("ep", backend="model")
    assert _wait(serve_client.get_handle("ep"), 1) == 2
    serve_client.delete_endpoint("ep")
    serve_client.delete_backend("model")
    assert "model" not in serve_client.list_backends()

    # The tag is free again, and the new code is what runs.
    serve_client.create_backend("model", add_two)
    serve_client.create_endpoint("ep", backend="model")
    assert _wait(serve_client.get_handle("ep"), 1) == 3
    assert serve_client.list_backends()["model"]["num_replicas"] == 1


def test_delete_unknown_backend_raises(serve_client):
    with pytest.raises(ValueError, match="never_created"):
        serve_client.delete_backend("never_created")


def test_delete_backend_releases_its_resources(serve_client):
    # Four replicas fill the four CPU slots of the test cluster; deleting the backend
    # must return them, or the second backend could never start.
    serve_client.create_backend("first", add_one, config={"num_replicas": 4})
    assert serve_client.list_backends()["first"]["status"] == "RUNNING"
    serve_client.delete_backend("first")
    serve_client.create_backend("second", add_two, config={"num_replicas": 4})
    assert serve_client.list_backends()["second"]["status"] == "RUNNING"
    serve_client.create_endpoint("second", backend="second")
    assert _wait(serve_client.get_handle("second"), 40) == 42


# -- errors ----------------------------------------------------------------------------
def test_duplicate_backend_tag_raises(serve_client):
    serve_client.create_backend("dup", add_one)
    with pytest.raises(ValueError, match="dup"):
        serve_client.create_backend("dup", add_two)
    # The first backend is untouched.
    serve_client.create_endpoint("dup", backend="dup")
    assert _wait(serve_client.get_handle("dup"), 1) == 2


def test_constructor_exception_fails_create_backend(serve_client):
    with pytest.raises(Exception) as info:
        serve_client.create_backend("exploding", BrokenInit, "weights file is corrupt")
    message = str(info.value)
    assert "exploding" in message
    assert "ValueError" in message
    assert "weights file is corrupt" in message
    assert "exploding" not in serve_client.list_backends()
    # The failed replicas gave their CPU back and the tag can be used again.
    serve_client.create_backend("exploding", add_one, config={"num_replicas": 4})
    assert serve_client.list_backends()["exploding"]["status"] == "RUNNING"


def test_constructor_exception_with_several_replicas(serve_client):
    with pytest.raises(Exception) as info:
        serve_client.create_backend("exploding_many", BrokenInit, "no GPU today",
                                    config={"num_replicas": 3})
    assert "exploding_many" in str(info.value)
    assert "no GPU today" in str(info.value)
    assert serve_client.list_backends() == {}


@pytest.mark.parametrize("config, field, error", [
    ({"num_replicas": -1}, "num_replicas", ValueError),
    ({"num_replicas": "2"}, "num_replicas", TypeError),
    ({"num_replicas": 1.5}, "num_replicas", TypeError),
    ({"max_concurrent_queries": 0}, "max_concurrent_queries", ValueError),
    ({"max_batch_size": 0}, "max_batch_size", ValueError),
    ({"batch_wait_timeout": -0.1}, "batch_wait_timeout", ValueError),
    ({"batch_wait_timeout": "soon"}, "batch_wait_timeout", TypeError),
    ({"num_replica": 2}, "num_replica", ValueError),
])
def test_invalid_config_names_the_field(serve_client, config, field, error):
    with pytest.raises(error, match=field):
        serve_client.create_backend("bad_config", add_one, config=config)
    assert "bad_config" not in serve_client.list_backends()


def test_invalid_backend_config_object_names_the_field():
    with pytest.raises(ValueError, match="max_concurrent_queries"):
        serve.BackendConfig(max_concurrent_queries=-5)
    with pytest.raises(TypeError, match="num_replicas"):
        serve.BackendConfig(num_replicas=None)


@pytest.mark.parametrize("options, field, error", [
    ({"num_cpus": -1}, "num_cpus", ValueError),
    ({"num_gpus": "one"}, "num_gpus", TypeError),
    ({"resources": ["a"]}, "resources", TypeError),
    ({"env_vars": {"A": 1}}, "env_vars", TypeError),
    ({"num_cpu": 1}, "num_cpu", ValueError),
])
def test_invalid_replica_options_name_the_field(serve_client, options, field, error):
    with pytest.raises(error, match=field):
        serve_client.create_backend("bad_options", add_one, replica_options=options)
    assert "bad_options" not in serve_client.list_backends()


def test_config_of_wrong_type_raises(serve_client):
    with pytest.raises(TypeError, match="config"):
        serve_client.create_backend("bad_type", add_one, config=[("num_replicas", 2)])
    assert "bad_type" not in serve_client.list_backends()


def test_init_args_with_function_backend_raise_type_error(serve_client):
    with pytest.raises(TypeError, match="init_args"):
        serve_client.create_backend("fn_with_args", add_one, 1, 2)
    assert "fn_with_args" not in serve_client.list_backends()


def test_non_callable_backend_raises_type_error(serve_client):
    with pytest.raises(TypeError):
        serve_client.create_backend("number", 42)
    assert "number" not in serve_client.list_backends()


def test_module_level_functions_manage_backends(serve_client):
    serve.create_backend("module_level", add_one)
    assert "module_level" in serve.list_backends()
    assert serve.get_backend_config("module_level").num_replicas == 1
    serve.delete_backend("module_level")
    assert "module_level" not in serve_client.list_backends()
