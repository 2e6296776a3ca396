"""The HTTP proxy: Tornado's HTTP/1.1 server in front of a router.

We implement Tornado's low-level ``HTTPServerConnectionDelegate`` rather than a
``RequestHandler`` application: Tornado still parses every byte, but there is no
per-request handler object, no regex routing and no output transforms. Routing is
an exact dict lookup on the path. Profiles show the proxy's own HTTP work to be
the limit at high concurrency, so this layer is kept as thin as Tornado allows.

The proxy never unpickles anything: request bodies travel to replicas as bytes in
a msgpack message and come back the same way.

The proxy may share the Dask scheduler's process and event loop, so nothing a
client does may hold resources without bound: connections are counted and refused
past ``max_connections`` before anything is parsed, and Tornado's own deadlines
and size limits cut off heads, bodies and idle connections that take too long or
grow too large (see ``HTTPOptions``).
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import socket
import time
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_to_bytes

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamClosedError, UnsatisfiableReadError
from tornado.netutil import bind_sockets

try:
    import resource
except ImportError:  # Windows has no file-descriptor limit to respect
    resource = None  # type: ignore[assignment]

from . import event_loop, metrics
from .config import HTTPOptions
from .http_codec import WireResponse, encode_request, error_response
from .router import Query, Router
from .tasks import spawn

logger = logging.getLogger(__name__)

SHARD_KEY_HEADER = "X-SERVE-SHARD-KEY"
DRAIN_TIMEOUT_S = 30.0


class Proxy(httputil.HTTPServerConnectionDelegate):
    """Accepts HTTP connections and hands each request to the shared router."""

    def __init__(self, router: Router, options: HTTPOptions):
        self.router = router
        self.options = options
        self._server: _Server | None = None
        self._keep_alive_params: Any = None
        self.port: int | None = None
        self.in_flight = 0  # requests read whole and not yet answered
        self._idle: asyncio.Event | None = None
        self.observer = metrics.ProxyObserver(options)  # observability: counts, access log

    async def start(self) -> None:
        event_loop.warn_if_slow("HTTP proxy")
        try:
            sockets = bind_sockets(self.options.port, self.options.host,
                                   family=socket.AF_INET if "." in self.options.host
                                   else socket.AF_UNSPEC)
        except OSError as exc:
            raise OSError(exc.errno, f"the daskserve HTTP proxy cannot listen on "
                                     f"{self.options.host}:{self.options.port}: {exc.strerror}"
                          ) from None
        options = self.options
        limit = _connection_cap(options.max_connections)
        # Tornado answers bodies past its own limit with a bare 400 or a closed
        # connection; we enforce the limit as bytes arrive and answer 413, so Tornado's
        # limit is set out of the way (bytes past ours are read and dropped, not kept).
        # Its ``idle_connection_timeout`` is the deadline for a request head, counted
        # from when the connection starts waiting for one: header_timeout_s for the
        # first request; ``start_request`` switches later ones to keep_alive_timeout_s.
        self._server = _Server(
            self, max_connections=limit,
            busy_response=_canned(503, "TooManyConnections",
                                  f"the proxy already holds its limit of {limit} open "
                                  f"connections; retry shortly", ("Retry-After", "1")),
            too_large_response=_canned(431, "RequestHeaderFieldsTooLarge",
                                       f"the request line and headers exceed the limit "
                                       f"of {options.max_header_size} bytes"),
            max_body_size=2**62, max_header_size=options.max_header_size,
            idle_connection_timeout=options.header_timeout_s,
            body_timeout=options.body_timeout_s)
        self._keep_alive_params = copy.copy(self._server.conn_params)
        self._keep_alive_params.header_timeout = options.keep_alive_timeout_s
        self._server.add_sockets(sockets)
        self.router.start()
        self.port = sockets[0].getsockname()[1]
        logger.info("daskserve HTTP proxy listening on http://%s:%d",
                    self.options.host, self.port)

    async def stop(self, drain_timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Stop listening, let the requests in progress finish (for up to
        ``drain_timeout`` seconds), then close every connection.

        Closing first would reset requests the proxy already accepted while their
        backends were still answering them. While it drains, keep-alive is off: each
        answer closes its connection, so clients take their next request elsewhere.
        The router stays up until the end, since the requests in progress need it.
        """
        server, self._server = self._server, None
        if server is not None:
            server.stop()
            for params in (server.conn_params, self._keep_alive_params):
                params.no_keep_alive = True  # read by Tornado as each request arrives
            loop = asyncio.get_running_loop()
            deadline = loop.time() + drain_timeout
            while self.in_flight and loop.time() < deadline:
                self._idle = asyncio.Event()
                try:
                    await asyncio.wait_for(self._idle.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    pass
            if self.in_flight:
                logger.warning("daskserve HTTP proxy closes with %d request(s) still in "
                               "progress after %ss", self.in_flight, drain_timeout)
            # Answers are written to the streams; let them reach their clients before
            # the sockets close. An empty write completes once all before it have.
            flushes = [conn.stream.write(b"") for conn in server._connections
                       if not conn.stream.closed()]
            if flushes:
                await asyncio.wait(flushes, timeout=max(0.0, deadline - loop.time()))
            await server.close_all_connections()
        self.router.close()

    def _request_done(self) -> None:
        self.in_flight -= 1
        if not self.in_flight and self._idle is not None:
            self._idle.set()

    def start_request(self, server_conn: Any,
                      request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        # Tornado builds each request's HTTP1Connection from the server connection's
        # params, so from the second request on the head deadline is the keep-alive one.
        server_conn.params = self._keep_alive_params
        return _Exchange(self, request_conn)

    # -- request handling ---------------------------------------------------------
    def respond(self, exchange: "_Exchange") -> None:
        """Answer a request read in full, or hand it to the router.

        No task per request: the router's answer reaches the client from a callback
        on the query's future (``_Exchange.forward``), which saves the proxy a task's
        creation and two loop steps per request.
        """
        start = exchange.start_line
        method = start.method
        path, _, query = start.path.partition("?")
        raw_path = None
        if "%" in path or not path.isascii():
            raw_path, path = path, _decode_path(path)
        if path.startswith("/-/"):
            response, route = self._builtin(path, method)
            if route == "/-/metrics" and response[0] == 200:  # observability
                spawn(self._metrics(exchange))
            else:
                exchange.answer(response, route=route)
            return
        endpoint = self.router.routes.get(path)
        if endpoint is None:
            exchange.answer(error_response(404, "NotFound", f"no endpoint is served at "
                                           f"route {path!r}; see GET /-/routes"))
            return
        if method not in endpoint.methods:
            if method == "HEAD" and "GET" in endpoint.methods:
                # HTTP's HEAD is GET without the body: the handler answers a GET and
                # ``write`` leaves the body out, so the headers are exactly GET's.
                method = "GET"
            else:
                exchange.answer(_method_not_allowed(method, path, endpoint.methods),
                                route=path, endpoint=endpoint.name)
                return
        headers = exchange.headers
        wire = encode_request(method, path, query, list(headers.get_all()),
                              exchange.body(), exchange.client, raw_path)
        router = self.router
        query = router.submit_http(endpoint.name, wire, headers.get(SHARD_KEY_HEADER),
                                   exchange.trace)
        exchange.forward(query, router.expire_after(query, self.options.request_timeout_s),
                         path, endpoint.name)

    async def _metrics(self, exchange: "_Exchange") -> None:
        try:
            response = await metrics.instance_exposition(self.router)
        except Exception as exc:
            exchange.fail(exc)
        else:
            exchange.answer(response, route="/-/metrics")

    def known_route(self, target: str) -> str:
        """The route label for a request target: a served route, or "" for any
        other path (labels a client could invent would grow metrics without bound)."""
        path = _decode_path(target.partition("?")[0])
        return path if path in self.router.routes or path in _BUILTIN_ROUTES else ""

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


def _decode_path(raw: str) -> str:
    """The path as ASGI servers give it to Starlette: percent-decoded, as UTF-8.

    Tornado hands over the request target decoded as latin-1, i.e. one character
    per byte received, so encoding it back yields the bytes the client sent.
    """
    return unquote_to_bytes(raw.encode("latin-1")).decode("utf-8", "replace")


_BUILTIN_ROUTES = frozenset({"/-/routes", "/-/healthz", "/-/metrics"})
# What a request whose client left is counted as (nginx's "client closed request");
# nobody reads it.
_CLIENT_CLOSED = error_response(499, "ClientClosedRequest",
                                "the client closed the connection before the answer")
_BUILTIN_METHODS = frozenset({"GET"})


def _method_not_allowed(method: str, path: str, methods: frozenset[str]) -> WireResponse:
    # HEAD is served wherever GET is, so Allow names it there (RFC 9110, 15.5.6).
    allowed = sorted(methods | {"HEAD"} if "GET" in methods else methods)
    response = error_response(405, "MethodNotAllowed", f"{method} is not allowed on "
                              f"{path!r}; allowed: {allowed}")
    response[1].append(["allow", ", ".join(allowed)])
    return response


# How long, and for how many bytes, a client answered 431 may go on sending before
# its socket is closed. Closing a socket with unread input makes the kernel send a
# reset, which can destroy the answer before the client has read it.
_LINGER_S = 2.0
_LINGER_BYTES = 1 << 20


def _canned(status: int, error: str, message: str,
            *extra: tuple[str, str]) -> bytes:
    """A complete response, built once, for answers given below Tornado's HTTP layer."""
    _, headers, body = error_response(status, error, message)
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
             *(f"{name}: {value}" for name, value in headers),
             *(f"{name}: {value}" for name, value in extra),
             f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _connection_cap(wanted: int) -> int:
    """``max_connections``, capped so that clients can never take the file
    descriptors the scheduler needs for its own workers and clients."""
    if resource is None:
        return wanted
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or wanted <= soft // 2:
        return wanted
    cap = max(1, soft // 2)
    logger.warning("http_options.max_connections=%d exceeds half of this process's "
                   "file-descriptor limit (%d); the proxy accepts at most %d connections",
                   wanted, soft, cap)
    return cap


class _Server(HTTPServer):
    """Tornado's HTTPServer, counting open sockets and refusing those past the limit.

    A socket counts from accept until its file descriptor is closed (not until
    Tornado's connection ends), so sockets lingering after a 431 count too. A
    refused socket gets a canned 503 and is closed at once: nothing is read,
    parsed or routed for it.
    """

    def initialize(self, request_callback: Any, *, max_connections: int,  # type: ignore[override]
                   busy_response: bytes, too_large_response: bytes, **kwargs: Any) -> None:
        super().initialize(request_callback, **kwargs)
        self.max_connections = max_connections
        self.open_sockets = 0
        self.too_large_response = too_large_response
        self._busy_response = busy_response
        self._refused = 0
        self._next_warning = 0.0

    def handle_stream(self, stream: IOStream, address: tuple) -> None:
        if self.open_sockets >= self.max_connections:
            self._refuse(stream)
            return
        self.open_sockets += 1
        super().handle_stream(_Stream(self, stream), address)

    def _refuse(self, stream: IOStream) -> None:
        try:
            stream.socket.send(self._busy_response)  # a fresh socket's buffer takes it
        except OSError:
            pass
        stream.close()
        self._refused += 1
        now = time.monotonic()
        if now >= self._next_warning:  # at most one line a minute, however hard the flood
            logger.warning("daskserve HTTP proxy at its limit of %d connections; refused "
                           "%d connection(s)", self.max_connections, self._refused)
            self._refused = 0
            self._next_warning = now + 60

    def socket_closed(self) -> None:
        self.open_sockets -= 1


class _Stream(IOStream):
    """Tornado's IOStream for one accepted socket, answering 431 to oversized heads.

    Tornado enforces ``max_header_size`` by closing the stream, which closes the
    socket with nothing sent. ``close_fd`` is the one place where the socket still
    exists and the reason for closing (``error``) is known.
    """

    def __init__(self, server: _Server, accepted: IOStream):
        super().__init__(accepted.socket, max_buffer_size=accepted.max_buffer_size,
                         read_chunk_size=accepted.read_chunk_size)
        self._server = server
        self._reading_head = False

    def read_until_regex(self, regex: bytes, max_bytes: int | None = None) -> Any:
        # Tornado's server reads request heads, and nothing else, with a regex.
        self._reading_head = True
        return super().read_until_regex(regex, max_bytes)

    def read_until(self, delimiter: bytes, max_bytes: int | None = None) -> Any:
        self._reading_head = False  # a chunk-size line: over its limit is no 431
        return super().read_until(delimiter, max_bytes)

    def close_fd(self) -> None:
        sock, self.socket = self.socket, None
        if self._reading_head and isinstance(self.error, UnsatisfiableReadError):
            _Linger(sock, self._server)
        else:
            sock.close()
            self._server.socket_closed()


class _Linger:
    """Sends a canned 431, then reads and drops what the client still sends
    until it closes, ``_LINGER_BYTES`` have come or ``_LINGER_S`` have passed."""

    __slots__ = ("sock", "server", "loop", "timeout", "left")

    def __init__(self, sock: socket.socket, server: _Server):
        self.sock: socket.socket | None = sock
        self.server = server
        self.left = _LINGER_BYTES
        self.loop = IOLoop.current()
        response = server.too_large_response
        try:
            complete = sock.send(response) == len(response)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            complete = False
        if not complete:
            self.timeout = None
            self.close()
            return
        self.loop.add_handler(sock, self._drain, IOLoop.READ)
        self.timeout = self.loop.call_later(_LINGER_S, self.close)

    def _drain(self, fd: Any, events: int) -> None:
        try:
            for _ in range(16):  # bounded per wake-up, so the loop is never held long
                data = self.sock.recv(65536) if self.sock is not None else b""
                self.left -= len(data)
                if not data or self.left <= 0:
                    self.close()
                    return
        except BlockingIOError:
            return
        except OSError:
            self.close()

    def close(self) -> None:
        if self.sock is None:
            return
        if self.timeout is not None:
            self.loop.remove_timeout(self.timeout)
            self.loop.remove_handler(self.sock)
        self.sock.close()
        self.sock = None
        self.server.socket_closed()


class _Exchange(httputil.HTTPMessageDelegate):
    """One request/response on a connection."""

    __slots__ = ("proxy", "connection", "start_line", "headers", "_chunks", "_size",
                 "_rejected", "_settled", "client", "query", "started", "trace",
                 "_timer", "_route", "_endpoint")

    def __init__(self, proxy: Proxy, connection: httputil.HTTPConnection):
        self.proxy = proxy
        self.connection = connection
        self.query: Query | None = None  # the router's, while we wait for its answer
        self.trace: Any = None  # observability: the access log's, when it is on
        self._chunks: list[bytes] = []
        self._size = 0
        self._rejected = False
        self._settled = False
        address = getattr(getattr(connection, "context", None), "address", None)
        self.client: tuple[str, int] | None = (
            tuple(address[:2]) if isinstance(address, tuple) else None)

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> None:
        self.started = time.perf_counter()  # observability: latency counts from here
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
        self.write(response, route=self.proxy.known_route(self.start_line.path))

    def body(self) -> bytes:
        return self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)

    def finish(self) -> None:
        if self._rejected:
            return
        proxy = self.proxy
        proxy.in_flight += 1  # counted from here until ``answer``, so Proxy.stop waits
        # Tornado tells the message delegate of a close only while the request is
        # being read; once it is read, only this callback hears of it.
        self.connection.set_close_callback(self.on_connection_close)
        self.trace = proxy.observer.trace()  # observability
        try:
            proxy.respond(self)
        except Exception as exc:
            self.fail(exc)

    def forward(self, query: Query, timer: asyncio.TimerHandle | None, route: str,
                endpoint: str) -> None:
        """Answer with what the router's ``query`` gets (its replica's answer, a 504
        from ``timer``, a 499 when the client leaves)."""
        self.query, self._timer = query, timer
        self._route, self._endpoint = route, endpoint
        query.future.add_done_callback(self._forwarded)

    def _forwarded(self, future: asyncio.Future) -> None:
        self.query = None
        if self._timer is not None:
            self._timer.cancel()
        try:
            self.answer(future.result(), self._route, self._endpoint)
        except Exception as exc:
            self.fail(exc)

    def fail(self, exc: Exception) -> None:
        """A proxy bug costs its one request, never the proxy."""
        logger.error("proxy failed on %s %s", self.start_line.method, self.start_line.path,
                     exc_info=exc)
        self.answer(error_response(500, type(exc).__name__, str(exc)))

    def answer(self, response: WireResponse, route: str = "", endpoint: str = "") -> None:
        """Write the request's one answer; it is then no longer in flight."""
        if self._settled:
            return
        self._settled = True
        try:
            self.write(response, route, endpoint)
        finally:
            self.proxy._request_done()

    def on_connection_close(self) -> None:
        """The client left: drop what it sent, and its request wherever it waits
        (a queue, a replica), so that requests nobody will read never pile up."""
        self._chunks = []
        query = self.query
        if query is not None and not query.future.done():
            query.future.set_result(_CLIENT_CLOSED)
            self.proxy.router.abandon(query)

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
        self.proxy.observer.done(self, route, status, endpoint)  # observability
        try:
            # A HEAD answer carries GET's Content-Length but no body; Tornado refuses
            # body bytes after a HEAD request and would drop the connection.
            self.connection.write_headers(
                httputil.ResponseStartLine("HTTP/1.1", status, reason), headers,
                None if method == "HEAD" else body)
            self.connection.finish()
        except StreamClosedError:
            pass  # the client went away; nothing to tell it
