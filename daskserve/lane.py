"""The thread lane: requests for ``def`` handlers, run by the thread that reads them.

Why: on the request channel a call to a ``def`` handler crosses threads twice (the
event loop hands it to a handler thread, which hands the answer back), and at low
load each crossing wakes a sleeping thread. Those two wake-ups cost about as much as
everything else a request does (``benchmarks/RESULTS.md``). Here one thread per connection reads a request, runs the
handler and writes the answer: one wake-up, as the event loop has for ``async def``.

A router sends a request this way only when it travels alone and its method was
seen to run on the replica's handler threads, over at most a few connections per
replica (``router.LANE_CONNECTIONS``); it keeps one request per connection at a
time, so a connection needs no multiplexing and its thread no event loop.
Everything else (messages of several requests, ``async def`` and batched methods,
``COLLECT``, ``CANCEL``) goes over the channel. Frames are the channel's.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Any, Callable

import msgpack
from distributed.comm import parse_address, unparse_host_port
from distributed.comm.addressing import parse_host_port

from .channel import HEADER, channel_ssl, frame, unpack

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20  # most bytes one read takes from a connection


class _Connection:
    """One router's connection, and what its thread is running now."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.write_lock = threading.Lock()
        self.running: tuple[str, int, bool] | None = None  # replica, message id, HTTP?
        self.answered = False  # someone else answered the running request (abort)

    def read_exactly(self, size: int) -> bytes:
        # Memory grows only with what arrives: a stray client's bytes read as a
        # length must not allocate that much up front.
        chunks, got = [], 0
        while got < size:
            chunk = self.sock.recv(min(size - got, _CHUNK))
            if not chunk:
                raise ConnectionResetError("the router closed the connection")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def send(self, payload: Any) -> None:
        with self.write_lock:
            self.sock.sendall(frame(payload))


class LaneServer:
    """Runs ``handler(**kwargs)`` for each request, in its connection's thread.

    ``handler`` answers a ``CALL``'s keyword arguments with the reply value; what it
    raises goes back as a refusal, as on the channel.
    """

    def __init__(self, op: str, handler: Callable[..., Any]):
        self._op = op
        self._handler = handler
        self._listener: socket.socket | None = None
        self._context: ssl.SSLContext | None = None
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self.address: str | None = None

    def start(self, dask_address: str, context: ssl.SSLContext | None) -> str | None:
        """Listen on the host of ``dask_address``; returns the lane's address (None
        for ``inproc://`` servers, whose routers call their replicas directly)."""
        scheme, location = parse_address(dask_address)
        if scheme == "inproc":
            return None
        host = parse_host_port(location)[0]
        self._context = channel_ssl(dask_address, context)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(128)
        self._listener = listener
        port = listener.getsockname()[1]
        scheme = "tls" if self._context is not None else "tcp"
        self.address = f"{scheme}://{unparse_host_port(host, port)}"
        threading.Thread(target=self._accept, args=(listener,), daemon=True,
                         name="daskserve-lane-accept").start()
        return self.address

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            _shut(listener)
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            _shut(connection.sock)

    def abort(self, replica: str, answer: Callable[[bool], Any]) -> None:
        """Answer the requests of ``replica`` running now with ``answer(is_http)`` and
        close their connections: their threads stay in the handler, and the router
        must not queue anything behind them."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with connection.write_lock:
                running = connection.running
                if running is None or running[0] != replica or connection.answered:
                    continue
                connection.answered = True
                try:
                    connection.sock.sendall(frame([running[1], True, answer(running[2])]))
                except OSError:
                    pass
            _shut(connection.sock)

    # -- threads ------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # closed by ``stop``
            threading.Thread(target=self._serve, args=(sock,), daemon=True,
                             name="daskserve-lane").start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._context is not None:
                sock = self._context.wrap_socket(sock, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            logger.debug("a lane connection failed to open: %r", exc)
            _shut(sock)
            return
        connection = _Connection(sock)
        with self._lock:
            self._connections.add(connection)
        try:
            while True:
                (size,) = HEADER.unpack(connection.read_exactly(HEADER.size))
                msg_id, op, kwargs = unpack(connection.read_exactly(size))
                if op != self._op:
                    connection.send([msg_id, False, f"unknown lane operation {op!r}"])
                    continue
                with connection.write_lock:
                    connection.running = (kwargs.get("replica"), msg_id,
                                          bool(kwargs.get("http")))
                try:
                    reply = [msg_id, True, self._handler(**kwargs)]
                except Exception as exc:
                    reply = [msg_id, False, f"{type(exc).__name__}: {exc}"]
                with connection.write_lock:
                    connection.running = None
                    if connection.answered:
                        return  # aborted while it ran: its connection is closed
                    connection.sock.sendall(frame(reply))
        except (OSError, ssl.SSLError, ValueError, msgpack.UnpackException):
            pass  # the router went away, or the lane was stopped
        finally:
            with self._lock:
                self._connections.discard(connection)
            _shut(connection.sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
