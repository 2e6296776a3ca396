"""The request channel on its own: real sockets on 127.0.0.1, real handlers."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import dask

import pytest

from daskserve.channel import HEADER, Channel, ChannelError, ChannelServer, frame, unpack


async def _serve(handlers):
    server = ChannelServer(handlers)
    address = await server.start("tcp://127.0.0.1:1", None)  # the port is its own
    return server, address


def test_replies_come_back_as_they_finish_on_one_connection():
    release = None

    async def slow(value):
        await release.wait()
        return value

    async def main():
        nonlocal release
        release = asyncio.Event()
        server, address = await _serve({"slow": slow, "echo": lambda value: value})
        channel = await Channel.open(address, None)
        waiting = asyncio.ensure_future(channel.request("slow", value=b"late"))
        assert await channel.request("echo", value=[1, "two", b"3"]) == (1, "two", b"3")
        assert not waiting.done()  # the fast reply overtook it on the same connection
        release.set()
        assert await waiting == b"late"
        channel.close()
        await server.stop()

    asyncio.run(main())


def test_refusals_name_what_went_wrong():
    def broken():
        raise KeyError("no replica 'x'")

    async def main():
        server, address = await _serve({"broken": broken})
        channel = await Channel.open(address, None)
        with pytest.raises(ChannelError, match="KeyError.*no replica 'x'"):
            await channel.request("broken")
        with pytest.raises(ChannelError, match="unknown channel operation 'nope'"):
            await channel.request("nope")
        with pytest.raises(ChannelError, match="TypeError"):
            await channel.request("broken", unexpected=1)
        assert not channel.closed  # a refused request leaves the connection usable
        channel.close()
        await server.stop()

    asyncio.run(main())


def test_a_closed_server_fails_what_waits_and_marks_the_channel_closed():
    async def never():
        await asyncio.Event().wait()

    async def main():
        server, address = await _serve({"never": never})
        channel = await Channel.open(address, None)
        waiting = asyncio.ensure_future(channel.request("never"))
        await asyncio.sleep(0.05)
        await server.stop()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(waiting, 10)
        assert channel.closed
        with pytest.raises(ConnectionResetError):
            await channel.request("never")

    asyncio.run(main())


def test_in_process_servers_get_no_channel():
    async def main():
        server = ChannelServer({})
        assert await server.start("inproc://192.0.2.1/1/2", None) is None

    asyncio.run(main())


def test_an_open_that_fails_after_its_waiters_left_leaves_no_unread_error():
    """A replica leaving the table cancels the queries waiting on its channel; the
    open they shared must not then fail with nobody reading its error."""
    import gc
    import socket

    from distributed.core import ConnectionPool

    from daskserve.channel import ChannelPool

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    unread = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: unread.append(context.get("message")))
        dask_pool = await ConnectionPool(limit=4, timeout=2)
        channels = ChannelPool(dask_pool, connect_timeout=5)
        waiter = asyncio.ensure_future(channels.get(dead))
        await asyncio.sleep(0)
        waiter.cancel()
        while channels._opening:  # the shared open goes on, then fails
            await asyncio.sleep(0.05)
        gc.collect()
        await dask_pool.close()

    asyncio.run(main())
    assert not [m for m in unread if "never retrieved" in (m or "")], unread


def test_a_transport_the_loop_closed_counts_as_closed_before_the_reader_knows():
    """A connection reset closes the transport at once, while the channel's reader
    learns of it a moment later. A request in between must see a closed channel
    (and its router send the work elsewhere), not fail on a dead transport."""

    async def main():
        server, address = await _serve({"echo": lambda value: value})
        channel = await Channel.open(address, None)
        assert await channel.request("echo", value=1) == 1
        channel._out.stream.transport.abort()  # as the loop does on a reset
        assert channel.closed
        with pytest.raises(ConnectionResetError):
            await channel.request("echo", value=2)
        await server.stop()

    asyncio.run(main())


def test_frames_stay_whole_from_many_threads_and_after_a_failed_pack():
    """Each thread reuses one packer: a payload msgpack refuses must leave nothing
    behind in it for that thread's next frame."""

    def decoded(payload):
        data = frame(payload)
        (size,) = HEADER.unpack(data[:HEADER.size])
        assert size == len(data) - HEADER.size
        return unpack(data[HEADER.size:])

    def in_one_thread(n):
        with pytest.raises(TypeError):
            frame([n, object()])
        return [decoded([n, i, b"x" * i]) for i in range(200)]

    with ThreadPoolExecutor(8) as pool:
        for n, frames in enumerate(pool.map(in_one_thread, range(8))):
            assert frames == [(n, i, b"x" * i) for i in range(200)]


# Frames 2,000 messages and prints how many new pages of memory that touched.
_FRAMING = """
import resource
from daskserve.channel import frame
payload = [7, "call", {"replica": "b#1", "ticket": 1, "calls": b"x" * 200}]
for _ in range(100):
    frame(payload)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2000):
    frame(payload)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_framing_in_a_nanny_started_worker_maps_no_memory_per_frame():
    """Dask's nanny sets glibc's malloc options for its workers, which pins glibc's
    mmap threshold at 128 KiB. A frame that needs a bigger buffer (a fresh
    ``msgpack.packb`` takes 256 KiB) then maps fresh memory, and faults its first page
    in, every time. One page fault per frame is what the per-frame packer cost."""
    environ = dask.config.get("distributed.nanny.pre-spawn-environ")
    done = subprocess.run([sys.executable, "-c", _FRAMING], capture_output=True, text=True,
                          env={**os.environ, **{k: str(v) for k, v in environ.items()}},
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 200  # 2,000 with a packer per frame
