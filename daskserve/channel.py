"""The request channel between routers and the replicas of one process.

Routers send ``CALL``, ``COLLECT`` and ``CANCEL`` here rather than over Dask comms.
Why: at low load every request travels alone, so what one message costs is what a
request waits for, and a round trip over a pooled Dask comm costs about 150 µs of
CPU on each side (serializer dispatch, frame bookkeeping, Tornado's IOStream), ten
times the same message over an asyncio stream (``benchmarks/transport.py``). The
messages are msgpack-native already, so they need none of what Dask's comms add.
Placement and control still go through Dask.

A frame is a 4-byte big-endian length and a msgpack array: ``[id, op, kwargs]``
from the router, ``[id, ok, value]`` back. One connection carries any number of
requests at once, and replies come back in the order they finish, matched by id.
The channel listens on the host of its Dask server and speaks TLS, with the
cluster's own ``Security`` contexts, whenever the Dask address does.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import struct
import threading
from typing import Any, Callable, Mapping

import msgpack
from distributed.comm import parse_address, unparse_host_port
from distributed.comm.addressing import parse_host_port

from .tasks import spawn

logger = logging.getLogger(__name__)

HEADER = struct.Struct("!I")  # a frame's length, before its msgpack body
# Tuples for arrays, as Dask's msgpack decoding gives, so replies read the same
# whichever way they travelled.
_UNPACK = dict(raw=False, use_list=False, strict_map_key=False)
# Above this many unsent bytes a writer waits for the socket before writing more.
_HIGH_WATER = 1 << 20
_TLS_SCHEMES = ("tls", "wss")


class ChannelError(Exception):
    """The other end refused a request; carries its error's text."""


_packers = threading.local()


def frame(payload: Any) -> bytes:
    """A frame for ``payload``; safe from any thread (the lane's too).

    Each thread keeps one ``msgpack.Packer``. ``msgpack.packb`` makes a new packer,
    and with it a 256 KiB buffer, for every frame. Dask's nanny starts workers with
    ``MALLOC_TRIM_THRESHOLD_`` set, which stops glibc from raising its mmap threshold,
    so in a worker that buffer is an ``mmap`` and ``munmap`` per frame: with 16 calls
    in flight the channel carried half the messages (``benchmarks/RESULTS.md``).
    """
    try:
        pack = _packers.pack
    except AttributeError:
        pack = _packers.pack = msgpack.Packer(use_bin_type=True).pack
    body = pack(payload)
    return HEADER.pack(len(body)) + body


def unpack(body: bytes) -> Any:
    """A frame's body, decoded."""
    return msgpack.unpackb(body, **_UNPACK)


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    return unpack(await reader.readexactly(size))


class _Writer:
    """A stream writer that waits for a slow reader before buffering more."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.stream = writer
        self._transport = writer.transport
        self._lock = asyncio.Lock()

    async def send(self, payload: Any) -> None:
        self.stream.write(frame(payload))
        if self._transport.get_write_buffer_size() > _HIGH_WATER:
            async with self._lock:  # one waiter at a time, whatever the Python version
                await self.stream.drain()


def channel_ssl(dask_address: str, context: ssl.SSLContext | None) -> ssl.SSLContext | None:
    """The TLS context a channel beside ``dask_address`` uses: Dask's, when it
    encrypts, so the channel is exactly as protected as the cluster."""
    scheme = parse_address(dask_address)[0]
    if scheme not in _TLS_SCHEMES:
        return None
    if context is None:
        raise ValueError(f"{dask_address} uses TLS, but no TLS context was configured")
    return context


class ChannelServer:
    """Answers channel requests with the given handlers (sync or async)."""

    def __init__(self, handlers: Mapping[str, Callable[..., Any]]):
        self._handlers = dict(handlers)
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.address: str | None = None

    async def start(self, dask_address: str,
                    context: ssl.SSLContext | None) -> str | None:
        """Listen on the host of ``dask_address``; returns the channel's address.

        An in-process Dask server (``inproc://``) gets no channel: only routers of
        its own process can reach it, and they call its replicas directly.
        """
        scheme, location = parse_address(dask_address)
        if scheme == "inproc":
            return None
        host = parse_host_port(location)[0]
        tls = channel_ssl(dask_address, context)
        self._server = await asyncio.start_server(self._serve, host, 0, ssl=tls)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"{'tls' if tls else 'tcp'}://{unparse_host_port(host, port)}"
        return self.address

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):
                writer.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        out = _Writer(writer)
        self._connections.add(writer)
        try:
            while True:
                msg_id, op, kwargs = await _read_frame(reader)
                handler = self._handlers.get(op)
                if handler is None:
                    await out.send([msg_id, False, f"unknown channel operation {op!r}"])
                    continue
                try:
                    result = handler(**kwargs)
                except Exception as exc:
                    await out.send([msg_id, False, f"{type(exc).__name__}: {exc}"])
                    continue
                if asyncio.iscoroutine(result):
                    spawn(self._answer(out, msg_id, result))
                else:
                    await out.send([msg_id, True, result])
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass  # the router went away
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _answer(self, out: _Writer, msg_id: int, work: Any) -> None:
        try:
            reply = [msg_id, True, await work]
        except Exception as exc:
            reply = [msg_id, False, f"{type(exc).__name__}: {exc}"]
        if not out.stream.is_closing():
            try:
                await out.send(reply)
            except ConnectionError:
                pass  # its router is gone; so is its interest in the reply


class Channel:
    """One connection to a ``ChannelServer``, shared by every request to it."""

    def __init__(self, address: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.address = address
        self.lane: str | None = None  # where the same process's thread lane listens
        self._out = _Writer(writer)
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self._shut_down = False
        self.on_close: Callable[["Channel"], None] | None = None
        self._reading = spawn(self._read(reader))

    @classmethod
    async def open(cls, address: str, context: ssl.SSLContext | None) -> "Channel":
        host, port = parse_host_port(parse_address(address)[1])
        tls = channel_ssl(address, context)
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls, server_hostname=host if tls else None)
        return cls(address, reader, writer)

    @property
    def closed(self) -> bool:
        """True once either end closed it. The transport knows first: a reset the loop
        has seen may not have reached this channel's reader yet, and a write then
        would fail with nothing sent."""
        return self._shut_down or self._out.stream.is_closing()

    async def request(self, op: str, **kwargs: Any) -> Any:
        """Send one request and wait for its reply.

        Raises ``ConnectionResetError`` when the connection closes first (the
        request may have run), and ``ChannelError`` when the other end refused it.
        """
        if self.closed:
            raise ConnectionResetError(f"the channel to {self.address} is closed")
        msg_id = next(self._ids)
        reply = self._pending[msg_id] = asyncio.get_running_loop().create_future()
        try:
            await self._out.send([msg_id, op, kwargs])
            return await reply
        finally:
            self._pending.pop(msg_id, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        error: BaseException = ConnectionResetError(
            f"the channel to {self.address} was closed by the other end")
        try:
            while True:
                msg_id, ok, value = await _read_frame(reader)
                reply = self._pending.pop(msg_id, None)
                if reply is not None and not reply.done():
                    reply.set_result(value) if ok else reply.set_exception(ChannelError(value))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
            if not isinstance(exc, asyncio.IncompleteReadError):
                error = exc
        except asyncio.CancelledError:
            error = ConnectionResetError(f"the channel to {self.address} was closed")
        finally:
            self._shut(error)

    def _shut(self, error: BaseException) -> None:
        self._shut_down = True
        self._out.stream.close()
        if self.on_close is not None:
            self.on_close(self)
        pending, self._pending = self._pending, {}
        for reply in pending.values():
            if not reply.done():
                reply.set_exception(error)

    def close(self) -> None:
        self._reading.cancel()


class ChannelPool:
    """A router's channels, one per Dask server that hosts replicas, and its
    connections to their thread lanes (``daskserve.lane``).

    A channel opens on first use: the Dask server is asked where its channel and
    lane listen (``WorkerOp.CHANNEL``, over the router's Dask connection pool, whose
    TLS settings both share) and is then used until either end closes it.
    """

    def __init__(self, dask_pool: Any, connect_timeout: float = 30.0):
        self._dask = dask_pool
        self._context = dask_pool.connection_args.get("ssl_context")
        self._timeout = connect_timeout
        self._channels: dict[str, Channel] = {}
        self._opening: dict[str, asyncio.Future] = {}
        self._lanes: set[Channel] = set()

    def ready(self, address: str) -> Channel | None:
        """The open channel to ``address``, if there is one; never waits."""
        channel = self._channels.get(address)
        return channel if channel is not None and not channel.closed else None

    async def get(self, address: str) -> Channel:
        """The channel to the Dask server at ``address``, opening it if need be.

        Raises ``OSError`` when that server or its channel cannot be reached.
        """
        channel = self.ready(address)
        if channel is not None:
            return channel
        opening = self._opening.get(address)
        if opening is None:
            opening = self._opening[address] = asyncio.ensure_future(self._open(address))
            opening.add_done_callback(lambda done: self._opened(address, done))
        # Shared by every query waiting for this server: one giving up (its replica
        # left the table) must not fail the others.
        return await asyncio.shield(opening)

    def _opened(self, address: str, done: asyncio.Future) -> None:
        """Forget the attempt; its error is read here, since every query waiting
        on it may have given up (their replica left the table) and none would."""
        self._opening.pop(address, None)
        if not done.cancelled():
            done.exception()

    async def _open(self, address: str) -> Channel:
        from .protocol import WorkerOp

        try:
            where = await asyncio.wait_for(
                getattr(self._dask(address), WorkerOp.CHANNEL)(), self._timeout)
            if where["channel"] is None:
                raise ConnectionRefusedError(f"{address} serves no request channel")
            channel = await asyncio.wait_for(Channel.open(where["channel"], self._context),
                                             self._timeout)
            channel.lane = where["lane"]
        except asyncio.TimeoutError as exc:
            raise ConnectionRefusedError(f"no channel to {address} within "
                                         f"{self._timeout:g} s") from exc
        old = self._channels.get(address)
        if old is not None:
            old.close()
        self._channels[address] = channel
        channel.on_close = lambda closed: self._forget(address, closed)
        return channel

    def _forget(self, address: str, channel: Channel) -> None:
        """A closed channel leaves the pool (its worker may never come back)."""
        if self._channels.get(address) is channel:
            del self._channels[address]

    async def open_lane(self, address: str) -> Channel:
        """A new connection to the thread lane at ``address``; the pool closes it
        with the rest."""
        lane = await asyncio.wait_for(Channel.open(address, self._context), self._timeout)
        self._lanes.add(lane)
        lane.on_close = self._lanes.discard
        return lane

    def close(self) -> None:
        for channel in [*self._channels.values(), *self._lanes]:
            channel.close()
        self._channels.clear()
        self._lanes.clear()
