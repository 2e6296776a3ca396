"""The HTTP proxy, exercised with real HTTP requests on 127.0.0.1."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from starlette.responses import PlainTextResponse, Response

import daskserve as serve

TIMEOUT = 30  # safety limit for every HTTP request


# -- backends ---------------------------------------------------------------------------
def hello(request):
    return "hello"


def echo_query(request):
    return {"x": request.query_params.get("x")}


class Boom(Exception):
    pass


def explode(request):
    raise Boom("the model fell over: code 7")


def divide(request):
    return 1 / int(request.query_params.get("d", "0"))


async def request_fields(request):
    body = await request.body()
    return {
        "method": request.method,
        "url": str(request.url),
        "path": request.url.path,
        "query_params": dict(request.query_params),
        "custom_header": request.headers.get("x-custom"),
        "content_type": request.headers.get("content-type"),
        "path_params": dict(request.path_params),
        "body": body.decode(),
    }


def sync_request_fields(request):
    return {"method": request.method, "query": dict(request.query_params),
            "header": request.headers.get("x-trace-id")}


async def parse_json(request):
    payload = await request.json()
    return {"received": payload, "keys": sorted(payload)}


async def body_digest(request):
    body = await request.body()
    return {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def created(request):
    return PlainTextResponse("made it", status_code=201, headers={"X-Custom": "yes"})


def binary(request):
    return Response(bytes(range(256)), media_type="application/octet-stream")


def text_unicode(request):
    return "héllo ✓"


def returns_list(request):
    return [1, "two", {"three": 3}]


def returns_none(request):
    return None


def returns_unencodable(request):
    return object()


class Gate:
    """Requests wait until one with ?release=1 opens the gate."""

    def __init__(self):
        self.opened = None

    async def __call__(self, request):
        if self.opened is None:
            self.opened = asyncio.Event()
        if "release" in request.query_params:
            self.opened.set()
            return "released"
        await asyncio.wait_for(self.opened.wait(), 60)
        return "passed"


# -- helpers ----------------------------------------------------------------------------
def _deploy(client, name, backend, route=None, methods=("GET",), **kwargs):
    client.create_backend(name, backend, **kwargs)
    client.create_endpoint(name, backend=name, route=route or f"/{name}", methods=list(methods))


def _get(url, **kwargs):
    return requests.get(url, timeout=TIMEOUT, **kwargs)


def _post(url, **kwargs):
    return requests.post(url, timeout=TIMEOUT, **kwargs)


# -- routing ----------------------------------------------------------------------------
def test_exact_route_match(serve_client, base_url):
    _deploy(serve_client, "hello", hello, route="/api/hello")
    assert _get(f"{base_url}/api/hello").text == "hello"
    assert _get(f"{base_url}/api/hello?x=1").text == "hello"  # the query is not the path
    for near_miss in ("/api/hello/", "/api/hello/more", "/api", "/api/hell", "/API/hello"):
        assert _get(base_url + near_miss).status_code == 404, near_miss


def test_unknown_route_is_404_json(serve_client, base_url):
    reply = _get(f"{base_url}/no/such/route")
    assert reply.status_code == 404
    assert reply.headers["content-type"].startswith("application/json")
    payload = reply.json()
    assert isinstance(payload, dict)
    assert "/no/such/route" in json.dumps(payload)


def test_wrong_method_is_405_with_allow_header(serve_client, base_url):
    _deploy(serve_client, "hello", hello, methods=("GET", "PUT"))
    reply = _post(f"{base_url}/hello", data=b"x")
    assert reply.status_code == 405
    allowed = {m.strip() for m in reply.headers["allow"].split(",")}
    assert allowed == {"GET", "HEAD", "PUT"}  # HEAD is served wherever GET is
    assert reply.json()  # a JSON error body
    assert requests.put(f"{base_url}/hello", timeout=TIMEOUT).status_code == 200


def test_builtin_routes(serve_client, base_url):
    _deploy(serve_client, "hello", hello, route="/hello")
    _deploy(serve_client, "echo", echo_query, route="/v1/echo")
    serve_client.create_endpoint("handle_only", backend="hello")
    routes = _get(f"{base_url}/-/routes")
    assert routes.status_code == 200
    assert routes.headers["content-type"].startswith("application/json")
    assert routes.json() == {"/hello": "hello", "/v1/echo": "echo"}

    health = _get(f"{base_url}/-/healthz")
    assert health.status_code == 200

    assert _get(f"{base_url}/-/no-such-builtin").status_code == 404


def test_routes_are_empty_on_a_fresh_instance(serve_client, base_url):
    assert _get(f"{base_url}/-/routes").json() == {}


# -- errors in handlers -----------------------------------------------------------------
def test_handler_exception_is_500_json_and_proxy_keeps_serving(serve_client, base_url):
    _deploy(serve_client, "explode", explode)
    _deploy(serve_client, "hello", hello)
    reply = _get(f"{base_url}/explode")
    assert reply.status_code == 500
    assert reply.headers["content-type"].startswith("application/json")
    text = json.dumps(reply.json())
    assert "Boom" in text
    assert "the model fell over: code 7" in text

    # The proxy, and the failing replica, keep serving.
    assert _get(f"{base_url}/hello").text == "hello"
    assert _get(f"{base_url}/-/healthz").status_code == 200
    again = _get(f"{base_url}/explode")
    assert again.status_code == 500 and "Boom" in again.text


def test_builtin_exception_in_handler(serve_client, base_url):
    _deploy(serve_client, "divide", divide)
    reply = _get(f"{base_url}/divide", params={"d": "0"})
    assert reply.status_code == 500
    assert "ZeroDivisionError" in reply.text
    ok = _get(f"{base_url}/divide", params={"d": "4"})
    assert ok.status_code == 200 and ok.json() == 0.25


def test_malformed_json_body_is_400_naming_the_problem(serve_client, base_url):
    _deploy(serve_client, "parse", parse_json, methods=("POST",))
    reply = _post(f"{base_url}/parse", data=b"{not json",
                  headers={"content-type": "application/json"})
    assert reply.status_code == 400
    assert "not valid JSON" in reply.json()["message"]
    ok = _post(f"{base_url}/parse", json={"b": 2, "a": [1]})
    assert ok.status_code == 200
    assert ok.json() == {"received": {"b": 2, "a": [1]}, "keys": ["a", "b"]}


def test_unencodable_return_value_is_500(serve_client, base_url):
    _deploy(serve_client, "unencodable", returns_unencodable)
    reply = _get(f"{base_url}/unencodable")
    assert reply.status_code == 500
    assert "TypeError" in reply.text


# -- the request object -------------------------------------------------------------------
def test_request_fields_in_async_handler(serve_client, base_url):
    _deploy(serve_client, "fields", request_fields, methods=("GET", "POST"))
    reply = _post(f"{base_url}/fields", params={"a": "1", "b": "two"}, data=b"payload-bytes",
                  headers={"X-Custom": "custom-value", "Content-Type": "text/plain"})
    assert reply.status_code == 200
    fields = reply.json()
    assert fields["method"] == "POST"
    assert fields["path"] == "/fields"
    assert fields["url"].endswith("/fields?a=1&b=two")
    assert fields["query_params"] == {"a": "1", "b": "two"}
    assert fields["custom_header"] == "custom-value"
    assert fields["content_type"] == "text/plain"
    assert fields["path_params"] == {}
    assert fields["body"] == "payload-bytes"

    get = _get(f"{base_url}/fields").json()
    assert get["method"] == "GET" and get["body"] == "" and get["query_params"] == {}


def test_request_fields_in_sync_handler(serve_client, base_url):
    _deploy(serve_client, "sync_fields", sync_request_fields)
    reply = _get(f"{base_url}/sync_fields", params={"q": "cats"},
                 headers={"X-Trace-Id": "abc-123"})
    assert reply.json() == {"method": "GET", "query": {"q": "cats"}, "header": "abc-123"}


def test_post_json_body(serve_client, base_url):
    _deploy(serve_client, "parse", parse_json, methods=("POST",))
    payload = {"name": "ünïcode", "values": [1.5, None, True], "nested": {"k": "v"}}
    reply = _post(f"{base_url}/parse", json=payload)
    assert reply.status_code == 200
    assert reply.json()["received"] == payload


def test_large_binary_body_arrives_intact(serve_client, base_url):
    _deploy(serve_client, "digest", body_digest, methods=("POST", "PUT"))
    body = os.urandom(3 * 1024 * 1024 + 17)
    reply = _post(f"{base_url}/digest", data=body)
    assert reply.status_code == 200
    assert reply.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def test_chunked_body_arrives_intact(serve_client, base_url):
    _deploy(serve_client, "digest", body_digest, methods=("POST",))
    chunks = [b"a" * 1000, b"b" * 10, b"c" * 5000]
    reply = _post(f"{base_url}/digest", data=iter(chunks))  # Transfer-Encoding: chunked
    body = b"".join(chunks)
    assert reply.status_code == 200
    assert reply.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


# -- responses ----------------------------------------------------------------------------
def test_starlette_response_is_sent_as_is(serve_client, base_url):
    _deploy(serve_client, "created", created)
    reply = _get(f"{base_url}/created")
    assert reply.status_code == 201
    assert reply.headers["x-custom"] == "yes"
    assert reply.headers["content-type"].startswith("text/plain")
    assert reply.text == "made it"


def test_binary_response(serve_client, base_url):
    _deploy(serve_client, "binary", binary)
    reply = _get(f"{base_url}/binary")
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/octet-stream"
    assert reply.content == bytes(range(256))


def test_str_is_sent_as_text(serve_client, base_url):
    _deploy(serve_client, "text", text_unicode)
    reply = _get(f"{base_url}/text")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    assert reply.content.decode("utf-8") == "héllo ✓"


def test_dict_list_and_none_are_sent_as_json(serve_client, base_url):
    _deploy(serve_client, "echo", echo_query)
    _deploy(serve_client, "listing", returns_list)
    _deploy(serve_client, "nothing", returns_none)
    reply = _get(f"{base_url}/echo", params={"x": "5"})
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json() == {"x": "5"}
    reply = _get(f"{base_url}/listing")
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json() == [1, "two", {"three": 3}]
    reply = _get(f"{base_url}/nothing")
    assert reply.status_code == 200
    assert reply.json() is None


# -- limits -----------------------------------------------------------------------------
def test_body_over_max_body_size_is_413(own_serve, http_port):
    client, url = own_serve(max_body_size=1000), f"http://127.0.0.1:{http_port}"
    _deploy(client, "digest", body_digest, methods=("POST",))
    at_limit = _post(f"{url}/digest", data=b"x" * 1000)
    assert at_limit.status_code == 200
    assert at_limit.json()["length"] == 1000

    over = _post(f"{url}/digest", data=b"x" * 1001)
    assert over.status_code == 413
    assert "1000" in over.text

    # The proxy is still fine afterwards.
    assert _post(f"{url}/digest", data=b"small").json()["length"] == 5


def test_chunked_body_over_max_body_size_is_413(own_serve, http_port):
    client, url = own_serve(max_body_size=1000), f"http://127.0.0.1:{http_port}"
    _deploy(client, "digest", body_digest, methods=("POST",))
    reply = _post(f"{url}/digest", data=iter([b"y" * 600, b"y" * 600]))
    assert reply.status_code == 413
    assert _post(f"{url}/digest", data=b"ok").json()["length"] == 2


def test_request_timeout_gives_504(own_serve, http_port):
    client, url = own_serve(request_timeout_s=0.5), f"http://127.0.0.1:{http_port}"
    _deploy(client, "gate", Gate)
    _deploy(client, "hello", hello)
    reply = _get(f"{url}/gate")  # waits on a gate that nobody has opened
    assert reply.status_code == 504
    assert reply.json()
    assert _get(f"{url}/hello").text == "hello"
    # Open the gate so the stranded request finishes before shutdown drains the replica.
    assert _get(f"{url}/gate", params={"release": "1"}).text == "released"
    assert _get(f"{url}/gate").text == "passed"


def test_invalid_http_options_name_the_field(dask_client, http_port):
    with pytest.raises(ValueError, match="max_body_size"):
        serve.start(dask_client, http_options={"port": http_port, "max_body_size": 0})
    with pytest.raises(ValueError, match="request_timeout_s"):
        serve.start(dask_client, http_options={"port": http_port, "request_timeout_s": -1})


# -- concurrency ------------------------------------------------------------------------
def test_many_concurrent_requests_all_succeed(serve_client, base_url):
    _deploy(serve_client, "echo", echo_query, config={"num_replicas": 2})
    local = threading.local()

    def fetch(i):
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        reply = session.get(f"{base_url}/echo", params={"x": str(i)}, timeout=TIMEOUT)
        return reply.status_code, reply.json()

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(fetch, range(200)))
    assert [status for status, _ in results] == [200] * 200
    assert [body["x"] for _, body in results] == [str(i) for i in range(200)]


def test_concurrent_requests_to_several_endpoints(serve_client, base_url):
    _deploy(serve_client, "echo", echo_query)
    _deploy(serve_client, "hello", hello)
    _deploy(serve_client, "explode", explode)

    def fetch(i):
        route = ("echo", "hello", "explode")[i % 3]
        reply = _get(f"{base_url}/{route}", params={"x": str(i)})
        return route, reply.status_code, reply.text

    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(fetch, range(90)))
    for i, (route, status, text) in enumerate(results):
        if route == "echo":
            assert status == 200 and json.loads(text) == {"x": str(i)}
        elif route == "hello":
            assert status == 200 and text == "hello"
        else:
            assert status == 500 and "Boom" in text
