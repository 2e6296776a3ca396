"""The HTTP proxy against unusual and hostile clients, over raw sockets on 127.0.0.1.

Raw sockets are used where a library would hide what is under test: what is sent on
a keep-alive connection, bytes that are not UTF-8, connections that never finish a
request. Every read has a socket timeout and every loop a bound, as safety limits
only; no test asserts how fast anything happens.
"""
from __future__ import annotations

import json
import socket
import time
from contextlib import closing
from typing import NamedTuple

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import PlainTextResponse

import daskserve as serve
from conftest import wait_until

TIMEOUT = 30  # safety limit for every socket read and HTTP request


# -- raw HTTP/1.1 ---------------------------------------------------------------------------
class Reply(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def _send(sock: socket.socket, method: str, target: str | bytes,
          headers: dict[str, str] | None = None, body: bytes = b"") -> None:
    if isinstance(target, str):
        target = target.encode("ascii")
    head = [method.encode("ascii") + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    for name, value in (headers or {}).items():
        head.append(f"{name}: {value}".encode("latin-1"))
    if body:
        head.append(b"Content-Length: %d" % len(body))
    sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)


class _Reader:
    """Reads responses off one connection, keeping bytes that belong to the next one."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def reply(self, head: bool = False) -> Reply:
        for _ in range(1000):
            if b"\r\n\r\n" in self.buffer:
                break
            self._fill()
        else:
            pytest.fail("no end of response headers after 1000 reads")
        start, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = start.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head else int(headers.get("content-length", "0"))
        for _ in range(10000):
            if len(self.buffer) >= length:
                break
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Reply(status, headers, body)


# -- backends -------------------------------------------------------------------------------
def method_echo(request):
    return PlainTextResponse(f"handled as {request.method}",
                             headers={"x-handled-as": request.method})


def _deploy(client, name, backend, route=None, methods=("GET",)):
    client.create_backend(name, backend)
    client.create_endpoint(name, backend=name, route=route or f"/{name}", methods=list(methods))


# -- 1. HEAD ---------------------------------------------------------------------------------
def test_head_answers_like_get_without_a_body_and_keeps_the_connection(serve_client,
                                                                       http_port):
    _deploy(serve_client, "echo_method", method_echo, methods=("GET", "POST"))
    with closing(_connect(http_port)) as sock:
        reader = _Reader(sock)
        _send(sock, "GET", "/echo_method")
        get = reader.reply()
        assert get.status == 200 and get.body == b"handled as GET"

        _send(sock, "HEAD", "/echo_method")
        head = reader.reply(head=True)
        assert head.status == 200
        assert head.headers == get.headers  # Content-Length is the GET body's
        assert head.headers["x-handled-as"] == "GET"  # the handler ran as a GET

        # Same connection: the next answer starts right where the HEAD answer ended.
        _send(sock, "GET", "/echo_method")
        again = reader.reply()
        assert again.status == 200 and again.body == b"handled as GET"
        assert reader.buffer == b""


def test_head_on_builtin_routes_unknown_routes_and_disallowed_methods(serve_client,
                                                                      http_port):
    _deploy(serve_client, "post_only", method_echo, methods=("POST",))
    with closing(_connect(http_port)) as sock:
        reader = _Reader(sock)
        for target in ("/-/healthz", "/-/routes", "/no/such/route", "/-/no-such-builtin"):
            _send(sock, "GET", target)
            get = reader.reply()
            _send(sock, "HEAD", target)
            head = reader.reply(head=True)
            assert (head.status, head.headers) == (get.status, get.headers), target

        _send(sock, "HEAD", "/-/metrics")
        metrics = reader.reply(head=True)
        assert metrics.status == 200 and int(metrics.headers["content-length"]) > 0

        _send(sock, "HEAD", "/post_only")
        refused = reader.reply(head=True)
        assert refused.status == 405
        assert refused.headers["allow"] == "POST"
        assert int(refused.headers["content-length"]) > 0

        _send(sock, "POST", "/post_only", body=b"x")
        posted = reader.reply()
        assert posted.status == 200 and posted.body == b"handled as POST"
        _send(sock, "GET", "/-/healthz")
        last = reader.reply()
        assert last.status == 200 and last.body == b"success"
        assert reader.buffer == b""


def test_head_on_an_endpoint_that_allows_head_reaches_the_handler_as_head(serve_client,
                                                                          http_port):
    _deploy(serve_client, "head_aware", method_echo, methods=("HEAD",))
    with closing(_connect(http_port)) as sock:
        reader = _Reader(sock)
        _send(sock, "HEAD", "/head_aware")
        head = reader.reply(head=True)
        assert head.status == 200
        assert head.headers["x-handled-as"] == "HEAD"
        assert int(head.headers["content-length"]) == len(b"handled as HEAD")
        _send(sock, "GET", "/head_aware")  # a HEAD-only endpoint does not answer GET
        refused = reader.reply()
        assert refused.status == 405 and refused.headers["allow"] == "HEAD"
    assert requests.head(f"http://127.0.0.1:{http_port}/head_aware",
                         timeout=TIMEOUT).status_code == 200


# -- 2. slow, idle, numerous and oversized connections ---------------------------------------
def _closed_by_server(sock: socket.socket) -> bool:
    """Wait (up to the socket's timeout) for the server to end the connection."""
    try:
        return sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def _healthy(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/-/healthz", timeout=TIMEOUT,
                            headers={"Connection": "close"}).status_code == 200
    except requests.ConnectionError:
        return False


def test_slowloris_headers_are_cut_off_after_header_timeout(own_serve, http_port):
    own_serve(header_timeout_s=0.5, keep_alive_timeout_s=60)
    with closing(_connect(http_port)) as sock:
        sock.sendall(b"GET /-/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        sock.settimeout(0.05)
        closed = False
        deadline = time.monotonic() + TIMEOUT
        for _ in range(100_000):  # one header byte at a time, never the blank line
            if time.monotonic() > deadline:
                break
            try:
                sock.sendall(b"a")
                if sock.recv(1) == b"":
                    closed = True
                    break
            except (socket.timeout, BlockingIOError):
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
        assert closed, f"a connection dribbling headers stayed open for {TIMEOUT}s"
    assert _healthy(http_port)


def test_idle_keep_alive_connection_is_closed_after_keep_alive_timeout(own_serve,
                                                                       http_port):
    own_serve(header_timeout_s=60, keep_alive_timeout_s=0.5)
    with closing(_connect(http_port)) as sock:
        reader = _Reader(sock)
        _send(sock, "GET", "/-/healthz")
        assert reader.reply().status == 200
        assert _closed_by_server(sock), "an idle keep-alive connection was never closed"
    assert _healthy(http_port)


def test_slow_body_is_cut_off_after_body_timeout(own_serve, http_port):
    client = own_serve(body_timeout_s=0.5)
    _deploy(client, "echo_method", method_echo, methods=("POST",))
    with closing(_connect(http_port)) as sock:
        sock.sendall(b"POST /echo_method HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Length: 100\r\n\r\n" + b"x" * 10)
        assert _closed_by_server(sock), "a connection that stopped mid-body stayed open"
    reply = requests.post(f"http://127.0.0.1:{http_port}/echo_method", data=b"x" * 100,
                          timeout=TIMEOUT)
    assert reply.text == "handled as POST"


def test_connections_past_max_connections_are_refused_until_some_close(own_serve,
                                                                       http_port):
    limit = 8
    own_serve(max_connections=limit, header_timeout_s=60, keep_alive_timeout_s=60)
    held = []
    try:
        for _ in range(limit):  # each answers one request, so each is surely counted
            sock = _connect(http_port)
            held.append(sock)
            _send(sock, "GET", "/-/healthz")
            assert _Reader(sock).reply().status == 200

        with closing(_connect(http_port)) as extra:
            reader = _Reader(extra)
            refused = reader.reply()  # sent at once, before any request
            assert refused.status == 503
            assert "retry-after" in refused.headers
            assert str(limit) in refused.body.decode()
            assert _closed_by_server(extra)
        assert not _healthy(http_port)
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: _healthy(http_port), timeout=TIMEOUT,
               what="service after the held connections closed")


def test_oversized_request_headers_get_431(own_serve, http_port):
    own_serve()
    url = f"http://127.0.0.1:{http_port}/-/healthz"
    reply = requests.get(url, headers={"X-Big": "a" * 100_000}, timeout=TIMEOUT)
    assert reply.status_code == 431
    assert reply.headers["connection"] == "close"
    assert reply.json()["error"]
    assert requests.get(url, headers={"X-Big": "a" * 30_000}, timeout=TIMEOUT).ok


def test_configured_max_header_size(own_serve, http_port):
    own_serve(max_header_size=4096)
    url = f"http://127.0.0.1:{http_port}/-/healthz"
    assert requests.get(url, headers={"X-Big": "a" * 3000}, timeout=TIMEOUT).ok
    assert requests.get(url, headers={"X-Big": "a" * 5000},
                        timeout=TIMEOUT).status_code == 431
    assert "4096" in requests.get(url, headers={"X-Big": "a" * 5000}, timeout=TIMEOUT).text
    assert requests.get(url, timeout=TIMEOUT).ok


@pytest.mark.parametrize("field, value, error", [
    ("max_connections", 0, ValueError),
    ("max_connections", 1.5, TypeError),
    ("max_header_size", 0, ValueError),
    ("header_timeout_s", 0, ValueError),
    ("keep_alive_timeout_s", -1, ValueError),
    ("body_timeout_s", "60", TypeError),
    ("body_timeout_s", float("inf"), ValueError),
])
def test_invalid_connection_limits_name_the_field(dask_client, http_port, field, value,
                                                  error):
    with pytest.raises(error, match=rf"http_options\.{field}"):
        serve.start(dask_client, http_options={"port": http_port, field: value})


# -- 3. bounded metric labels ------------------------------------------------------------------
STANDARD_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT",
                    "TRACE"}


def _http_request_series(port: int) -> dict[tuple, float]:
    text = requests.get(f"http://127.0.0.1:{port}/-/metrics", timeout=TIMEOUT).text
    series = {}
    for family in text_string_to_metric_families(text):
        if family.name == "serve_num_http_requests":
            for sample in family.samples:
                if sample.name == "serve_num_http_requests_total":
                    series[tuple(sorted(sample.labels.items()))] = sample.value
    return series


def test_http_metric_labels_stay_bounded_whatever_clients_send(own_serve, http_port):
    client = own_serve(max_body_size=10)
    _deploy(client, "echo_method", method_echo, methods=("GET", "POST"))
    url = f"http://127.0.0.1:{http_port}"
    before = _http_request_series(http_port)
    n = 100
    with requests.Session() as session:
        for i in range(n):
            assert session.get(f"{url}/no/such/route/{i}", timeout=TIMEOUT).status_code == 404
            assert session.request(f"BOGUS{i}", f"{url}/echo_method",
                                   timeout=TIMEOUT).status_code == 405
            assert session.request(f"BREW{i}", f"{url}/-/made-up-{i}",
                                   timeout=TIMEOUT).status_code == 404
            assert session.post(f"{url}/too/big/{i}", data=b"x" * 11,
                                timeout=TIMEOUT).status_code == 413
    after = _http_request_series(http_port)

    new_series = set(after) - set(before)
    assert len(new_series) <= 8, sorted(new_series)
    known_routes = {"", "other", "/echo_method", "/-/metrics", "/-/routes", "/-/healthz"}
    for labels in new_series:
        labels = dict(labels)
        assert labels["method"] in STANDARD_METHODS | {"other"}, labels
        assert labels["route"] in known_routes, labels

    def delta(**wanted: str) -> float:
        return sum(value - before.get(key, 0) for key, value in after.items()
                   if all(dict(key)[name] == v for name, v in wanted.items()))

    unknown = "other" if delta(route="other") else ""
    assert delta(route=unknown, method="GET", status="404") == n
    assert delta(route=unknown, method="other", status="404") == n
    assert delta(route=unknown, method="POST", status="413") == n
    assert delta(route="/echo_method", method="other", status="405") == n


# -- 4. paths and query strings as Starlette under uvicorn sees them ---------------------------
def _url_view(request) -> dict:
    try:
        url_path, url_query = request.url.path, request.url.query
    except UnicodeDecodeError:  # Starlette decodes the query into url as UTF-8, strictly
        url_path = url_query = "UnicodeDecodeError"
    return {"path": request.scope["path"], "url_path": url_path,
            "raw_path": request.scope["raw_path"].decode("latin-1"),
            "query_string": request.scope["query_string"].decode("latin-1"),
            "query_params": request.query_params.multi_items(), "url_query": url_query}


def url_parts(request):
    return _url_view(request)


def _as_under_uvicorn(path: str, raw_path: bytes, query_string: bytes) -> dict:
    """What a handler sees under uvicorn: the path percent-decoded as UTF-8, raw_path
    and query_string the bytes as received."""
    scope = {"type": "http", "method": "GET", "scheme": "http", "root_path": "",
             "path": path, "raw_path": raw_path, "query_string": query_string,
             "headers": [(b"host", b"127.0.0.1")], "server": None}
    return json.loads(json.dumps(_url_view(Request(scope))))


def test_percent_encoded_and_non_ascii_routes_match(serve_client, http_port):
    _deploy(serve_client, "accented", url_parts, route="/héllo")
    _deploy(serve_client, "spaced", url_parts, route="/a b")
    with closing(_connect(http_port)) as sock:
        reader = _Reader(sock)
        for target, path in [(b"/h%C3%A9llo", "/héllo"), (b"/h%c3%a9llo", "/héllo"),
                             (b"/a%20b", "/a b"), (b"/%61%20b", "/a b"),
                             (b"/h\xc3\xa9llo", "/héllo")]:  # raw UTF-8, as some clients send
            _send(sock, "GET", target)
            reply = reader.reply()
            assert reply.status == 200, (target, reply)
            assert json.loads(reply.body) == _as_under_uvicorn(path, target, b""), target
        _send(sock, "GET", "/h%C3%A9llo/")  # decoding does not loosen exact matching
        assert reader.reply().status == 404
    assert requests.get(f"http://127.0.0.1:{http_port}/héllo", timeout=TIMEOUT).ok
    assert requests.get(f"http://127.0.0.1:{http_port}/a b", timeout=TIMEOUT).ok


def test_query_string_reaches_the_handler_as_received(serve_client, http_port):
    _deploy(serve_client, "url_parts", url_parts)
    with closing(_connect(http_port)) as sock:
        reader = _Reader(sock)
        for query in (b"x=%ff&w=caf%C3%A9&v=a+b&e=", b"y=\xff&z=\xc3\xa9&x=%ff"):
            _send(sock, "GET", b"/url_parts?" + query)
            reply = reader.reply()
            assert reply.status == 200
            assert json.loads(reply.body) == _as_under_uvicorn("/url_parts", b"/url_parts",
                                                               query), query


# -- 5. malformed JSON bodies are the client's fault ---------------------------------------------
async def parse_json(request):
    return {"received": await request.json()}


async def decodes_its_own_data(request):
    await request.body()
    return json.loads("{this is the handler's own broken data")


async def catches_bad_json(request):
    try:
        return {"received": await request.json()}
    except json.JSONDecodeError as exc:  # user code written against plain Starlette
        return {"caught": exc.msg, "pos": exc.pos}


def test_malformed_json_body_is_400_naming_the_problem(serve_client, base_url):
    _deploy(serve_client, "parse", parse_json, methods=("POST",))
    for body in (b"{not json", b"", b"\xff\xfe\xfa", b"[" * 100_000):
        reply = requests.post(f"{base_url}/parse", data=body, timeout=TIMEOUT,
                              headers={"content-type": "application/json"})
        assert reply.status_code == 400, (body[:10], reply.text)
        assert reply.headers["content-type"].startswith("application/json")
        error = reply.json()
        assert "JSON" in error["error"] and "JSON" in error["message"], error
    ok = requests.post(f"{base_url}/parse", json={"a": [1]}, timeout=TIMEOUT)
    assert ok.status_code == 200 and ok.json() == {"received": {"a": [1]}}


def test_json_errors_of_the_handlers_own_making_stay_500(serve_client, base_url):
    _deploy(serve_client, "own_data", decodes_its_own_data, methods=("POST",))
    _deploy(serve_client, "catches", catches_bad_json, methods=("POST",))
    reply = requests.post(f"{base_url}/own_data", data=b'{"valid": true}', timeout=TIMEOUT)
    assert reply.status_code == 500
    assert reply.json()["error"] == "JSONDecodeError"

    caught = requests.post(f"{base_url}/catches", data=b"{not json", timeout=TIMEOUT)
    assert caught.status_code == 200
    assert caught.json() == {"caught": "Expecting property name enclosed in double quotes",
                             "pos": 1}
