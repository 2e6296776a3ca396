"""Endpoints: creation, listing, deletion, routes, methods and their errors."""
from __future__ import annotations

import pytest
import requests

import daskserve as serve

TIMEOUT = 30  # safety limit for every remote result


def hello(request):
    return "hello"


def square(x):
    return x * x


def _wait(handle, *args, **kwargs):
    return handle.remote(*args, **kwargs).result(timeout=TIMEOUT)


def _routes(base_url):
    reply = requests.get(f"{base_url}/-/routes", timeout=TIMEOUT)
    assert reply.status_code == 200
    return reply.json()


# -- shapes -----------------------------------------------------------------------------
def test_list_endpoints_is_empty_at_start(serve_client):
    assert serve_client.list_endpoints() == {}


def test_create_endpoint_and_list_shape(serve_client, base_url):
    serve_client.create_backend("hello", hello)
    serve_client.create_endpoint("hello", backend="hello", route="/hello",
                                 methods=["GET", "POST"])
    endpoints = serve_client.list_endpoints()
    assert set(endpoints) == {"hello"}
    entry = endpoints["hello"]
    assert set(entry) == {"route", "methods", "traffic", "shadows"}
    assert entry["route"] == "/hello"
    assert isinstance(entry["methods"], list)
    assert sorted(entry["methods"]) == ["GET", "POST"]
    assert entry["traffic"] == {"hello": 1.0}
    assert entry["shadows"] == {}
    # Both methods are served.
    assert requests.get(f"{base_url}/hello", timeout=TIMEOUT).text == "hello"
    assert requests.post(f"{base_url}/hello", timeout=TIMEOUT).text == "hello"


def test_default_methods_are_get_only(serve_client, base_url):
    serve_client.create_backend("hello", hello)
    serve_client.create_endpoint("hello", backend="hello", route="/hello")
    assert serve_client.list_endpoints()["hello"]["methods"] == ["GET"]
    assert requests.get(f"{base_url}/hello", timeout=TIMEOUT).status_code == 200
    assert requests.post(f"{base_url}/hello", timeout=TIMEOUT).status_code == 405


def test_endpoint_without_backend_has_empty_traffic(serve_client):
    serve_client.create_endpoint("empty", route="/empty")
    entry = serve_client.list_endpoints()["empty"]
    assert entry["route"] == "/empty"
    assert entry["traffic"] == {}
    assert entry["shadows"] == {}


def test_list_endpoints_with_several_endpoints_and_shadow(serve_client):
    serve_client.create_backend("a", square)
    serve_client.create_backend("b", square)
    serve_client.create_endpoint("one", backend="a", route="/one")
    serve_client.create_endpoint("two", backend="a")
    serve_client.shadow_traffic("one", "b", 0.25)
    endpoints = serve_client.list_endpoints()
    assert endpoints == {
        "one": {"route": "/one", "methods": ["GET"], "traffic": {"a": 1.0},
                "shadows": {"b": 0.25}},
        "two": {"route": None, "methods": ["GET"], "traffic": {"a": 1.0}, "shadows": {}},
    }


# -- handle-only endpoints ------------------------------------------------------------------
def test_route_none_is_reachable_by_handle_only(serve_client, base_url):
    serve_client.create_backend("square", square)
    serve_client.create_endpoint("square", backend="square")  # route=None
    serve_client.create_backend("hello", hello)
    serve_client.create_endpoint("hello", backend="hello", route="/hello")

    assert serve_client.list_endpoints()["square"]["route"] is None
    assert _wait(serve_client.get_handle("square"), 7) == 49
    routes = _routes(base_url)
    assert routes == {"/hello": "hello"}
    assert "square" not in routes.values()
    # Nothing answers under the endpoint's name either.
    assert requests.get(f"{base_url}/square", timeout=TIMEOUT).status_code == 404


# -- creation errors ----------------------------------------------------------------------
def test_duplicate_endpoint_name_raises(serve_client):
    serve_client.create_backend("hello", hello)
    serve_client.create_endpoint("ep", backend="hello", route="/first")
    with pytest.raises(ValueError, match="ep"):
        serve_client.create_endpoint("ep", backend="hello", route="/second")
    assert serve_client.list_endpoints()["ep"]["route"] == "/first"


def test_duplicate_route_raises_naming_the_other_endpoint(serve_client, base_url):
    serve_client.create_backend("hello", hello)
    serve_client.create_endpoint("owner_of_route", backend="hello", route="/shared")
    with pytest.raises(ValueError) as info:
        serve_client.create_endpoint("intruder", backend="hello", route="/shared")
    assert "owner_of_route" in str(info.value)
    assert "intruder" not in serve_client.list_endpoints()
    assert _routes(base_url) == {"/shared": "owner_of_route"}


def test_unknown_backend_raises(serve_client):
    with pytest.raises(ValueError, match="missing_backend"):
        serve_client.create_endpoint("ep", backend="missing_backend", route="/ep")
    assert serve_client.list_endpoints() == {}


@pytest.mark.parametrize("methods", [["FETCH"], ["GET", "FETCH"], "FETCH", [42]])
def test_bad_methods_raise(serve_client, methods):
    serve_client.create_backend("hello", hello)
    with pytest.raises(ValueError, match="FETCH|42"):
        serve_client.create_endpoint("ep", backend="hello", route="/ep", methods=methods)
    assert serve_client.list_endpoints() == {}


def test_empty_methods_raise(serve_client):
    serve_client.create_backend("hello", hello)
    with pytest.raises((ValueError, TypeError), match="methods"):
        serve_client.create_endpoint("ep", backend="hello", route="/ep", methods=[])
    assert serve_client.list_endpoints() == {}


@pytest.mark.parametrize("route", ["noslash", "hello/world", "", "/-/x", "/-/routes"])
def test_invalid_or_reserved_route_raises(serve_client, route):
    serve_client.create_backend("hello", hello)
    with pytest.raises(ValueError):
        serve_client.create_endpoint("ep", backend="hello", route=route)
    assert serve_client.list_endpoints() == {}


def test_reserved_builtin_route_still_answers(serve_client, base_url):
    serve_client.create_backend("hello", hello)
    with pytest.raises(ValueError, match="reserved"):
        serve_client.create_endpoint("ep", backend="hello", route="/-/healthz")
    assert requests.get(f"{base_url}/-/healthz", timeout=TIMEOUT).status_code == 200


# -- deletion ---------------------------------------------------------------------------
def test_delete_unknown_endpoint_raises(serve_client):
    with pytest.raises(ValueError, match="never_created"):
        serve_client.delete_endpoint("never_created")


def test_delete_endpoint_keeps_backend(serve_client, base_url):
    serve_client.create_backend("hello", hello)
    serve_client.create_endpoint("hello", backend="hello", route="/hello")
    assert requests.get(f"{base_url}/hello", timeout=TIMEOUT).status_code == 200

    serve_client.delete_endpoint("hello")
    assert serve_client.list_endpoints() == {}
    assert "hello" in serve_client.list_backends()
    assert _routes(base_url) == {}
    assert requests.get(f"{base_url}/hello", timeout=TIMEOUT).status_code == 404
    with pytest.raises(KeyError):
        serve_client.get_handle("hello")

    # The backend still runs: a new endpoint (same name, new route) serves it at once.
    serve_client.create_endpoint("hello", backend="hello", route="/hello-again")
    reply = requests.get(f"{base_url}/hello-again", timeout=TIMEOUT)
    assert reply.status_code == 200 and reply.text == "hello"


def test_deleted_route_can_be_reused_by_another_endpoint(serve_client, base_url):
    serve_client.create_backend("hello", hello)
    serve_client.create_endpoint("first", backend="hello", route="/r")
    serve_client.delete_endpoint("first")
    serve_client.create_endpoint("second", backend="hello", route="/r")
    assert _routes(base_url) == {"/r": "second"}
    assert requests.get(f"{base_url}/r", timeout=TIMEOUT).text == "hello"


def test_two_endpoints_share_one_backend(serve_client, base_url):
    serve_client.create_backend("square", square)
    serve_client.create_endpoint("sq1", backend="square")
    serve_client.create_endpoint("sq2", backend="square")
    assert _wait(serve_client.get_handle("sq1"), 3) == 9
    assert _wait(serve_client.get_handle("sq2"), 4) == 16
    serve_client.delete_endpoint("sq1")
    assert _wait(serve_client.get_handle("sq2"), 5) == 25


def test_module_level_endpoint_functions(serve_client, base_url):
    serve.create_backend("hello", hello)
    serve.create_endpoint("hello", backend="hello", route="/hello")
    assert serve.list_endpoints()["hello"]["route"] == "/hello"
    assert requests.get(f"{base_url}/hello", timeout=TIMEOUT).text == "hello"
    serve.delete_endpoint("hello")
    assert serve_client.list_endpoints() == {}
