"""The HTTP proxy: Tornado's HTTP/1.1 server in front of a router.

We implement Tornado's low-level ``HTTPServerConnectionDelegate`` rather than a
``RequestHandler`` application: Tornado still parses every byte, but there is no
per-request handler object, no regex routing and no output transforms. Routing is
an exact dict lookup on the path. Profiles show the proxy's own HTTP work to be
the limit at high concurrency, so this layer is kept as thin as Tornado allows.

The proxy never unpickles anything: request bodies travel to replicas as bytes in
a msgpack message and come back the same way.
"""
from __future__ import annotations

import json
import logging
import socket
from http import HTTPStatus
from typing import Any

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.netutil import bind_sockets

from . import metrics
from .config import HTTPOptions
from .http_codec import WireResponse, encode_request, error_response
from .router import Router
from .tasks import spawn

logger = logging.getLogger(__name__)

SHARD_KEY_HEADER = "X-SERVE-SHARD-KEY"


class Proxy(httputil.HTTPServerConnectionDelegate):
    """Accepts HTTP connections and hands each request to the shared router."""

    def __init__(self, router: Router, options: HTTPOptions):
        self.router = router
        self.options = options
        self._server: HTTPServer | None = None
        self.port: int | None = None

    async def start(self) -> None:
        try:
            sockets = bind_sockets(self.options.port, self.options.host,
                                   family=socket.AF_INET if "." in self.options.host
                                   else socket.AF_UNSPEC)
        except OSError as exc:
            raise OSError(exc.errno, f"the daskserve HTTP proxy cannot listen on "
                                     f"{self.options.host}:{self.options.port}: {exc.strerror}"
                          ) from None
        # Tornado answers bodies past its own limit with a bare 400 or a closed
        # connection; we enforce the limit as bytes arrive and answer 413, so Tornado's
        # limit is set out of the way (bytes past ours are read and dropped, not kept).
        self._server = HTTPServer(self, max_body_size=2**62, idle_connection_timeout=3600)
        self._server.add_sockets(sockets)
        self.router.start()
        self.port = sockets[0].getsockname()[1]
        logger.info("daskserve HTTP proxy listening on http://%s:%d",
                    self.options.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None
        self.router.close()

    def start_request(self, server_conn: object,
                      request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        return _Exchange(self, request_conn)

    # -- request handling ---------------------------------------------------------
    async def respond(self, exchange: "_Exchange") -> None:
        start = exchange.start_line
        method = start.method
        path, _, query = start.path.partition("?")
        if path.startswith("/-/"):
            response, route = self._builtin(path, method)
            exchange.write(response, route=route)
            return
        endpoint = self.router.routes.get(path)
        if endpoint is None:
            exchange.write(error_response(404, "NotFound", f"no endpoint is served at "
                                          f"route {path!r}; see GET /-/routes"))
            return
        if method not in endpoint.methods:
            if method == "HEAD" and "GET" in endpoint.methods:
                # HTTP's HEAD is GET without the body: the handler answers a GET and
                # ``write`` leaves the body out, so the headers are exactly GET's.
                method = "GET"
            else:
                exchange.write(_method_not_allowed(method, path, endpoint.methods),
                               route=path, endpoint=endpoint.name)
                return
        headers = exchange.headers
        wire = encode_request(method, path, query, list(headers.get_all()),
                              exchange.body(), exchange.client)
        response = await self.router.http(endpoint.name, wire,
                                          headers.get(SHARD_KEY_HEADER),
                                          self.options.request_timeout_s)
        exchange.write(response, route=path, endpoint=endpoint.name)

    def _builtin(self, path: str, method: str) -> tuple[WireResponse, str]:
        """A built-in route's answer and its metrics label ("" for unknown paths)."""
        if path not in _BUILTIN_ROUTES:
            return error_response(404, "NotFound", f"no built-in route {path!r}"), ""
        if method != "GET" and method != "HEAD":
            return _method_not_allowed(method, path, _BUILTIN_METHODS), path
        if path == "/-/routes":
            table = {route: e.name for route, e in self.router.routes.items()}
            body = json.dumps(table).encode()
            return [200, [["content-type", "application/json"]], body], path
        if path == "/-/healthz":
            return [200, [["content-type", "text/plain; charset=utf-8"]], b"success"], path
        body, content_type = metrics.exposition()
        return [200, [["content-type", content_type]], body], path


_BUILTIN_ROUTES = frozenset({"/-/routes", "/-/healthz", "/-/metrics"})
_BUILTIN_METHODS = frozenset({"GET"})


def _method_not_allowed(method: str, path: str, methods: frozenset[str]) -> WireResponse:
    # HEAD is served wherever GET is, so Allow names it there (RFC 9110, 15.5.6).
    allowed = sorted(methods | {"HEAD"} if "GET" in methods else methods)
    response = error_response(405, "MethodNotAllowed", f"{method} is not allowed on "
                              f"{path!r}; allowed: {allowed}")
    response[1].append(["allow", ", ".join(allowed)])
    return response


class _Exchange(httputil.HTTPMessageDelegate):
    """One request/response on a connection."""

    __slots__ = ("proxy", "connection", "start_line", "headers", "_chunks", "_size",
                 "_rejected", "client")

    def __init__(self, proxy: Proxy, connection: httputil.HTTPConnection):
        self.proxy = proxy
        self.connection = connection
        self._chunks: list[bytes] = []
        self._size = 0
        self._rejected = False
        address = getattr(getattr(connection, "context", None), "address", None)
        self.client: tuple[str, int] | None = (
            tuple(address[:2]) if isinstance(address, tuple) else None)

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> None:
        self.start_line = start_line
        self.headers = headers
        length = headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.proxy.options.max_body_size:
            self._reject_oversized()

    def data_received(self, chunk: bytes) -> None:
        if self._rejected:
            return
        self._size += len(chunk)
        if self._size > self.proxy.options.max_body_size:
            self._reject_oversized()
            return
        self._chunks.append(chunk)

    def _reject_oversized(self) -> None:
        self._rejected = True
        self._chunks = []
        limit = self.proxy.options.max_body_size
        response = error_response(413, "PayloadTooLarge",
                                  f"request body exceeds the limit of {limit} bytes")
        response[1].append(["connection", "close"])
        self.write(response, route=self.start_line.path.partition("?")[0])

    def body(self) -> bytes:
        return self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)

    def finish(self) -> None:
        if not self._rejected:
            spawn(self._respond())

    async def _respond(self) -> None:
        try:
            await self.proxy.respond(self)
        except Exception as exc:  # a proxy bug must cost one request, not the proxy
            logger.exception("proxy failed on %s %s", self.start_line.method,
                             self.start_line.path)
            self.write(error_response(500, type(exc).__name__, str(exc)))

    def on_connection_close(self) -> None:
        self._chunks = []

    def write(self, response: WireResponse, route: str = "", endpoint: str = "") -> None:
        status, header_pairs, body = response
        headers = httputil.HTTPHeaders()
        for name, value in header_pairs:
            headers.add(name, value)
        if "Content-Length" not in headers:
            headers["Content-Length"] = str(len(body))
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        method = self.start_line.method
        metrics.record_http(route, method, status, endpoint)
        try:
            # A HEAD answer carries GET's Content-Length but no body; Tornado refuses
            # body bytes after a HEAD request and would drop the connection.
            self.connection.write_headers(
                httputil.ResponseStartLine("HTTP/1.1", status, reason), headers,
                None if method == "HEAD" else body)
            self.connection.finish()
        except StreamClosedError:
            pass  # the client went away; nothing to tell it
