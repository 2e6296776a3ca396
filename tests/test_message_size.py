"""How a router packs a burst into messages for one replica.

A real Router sends over a real request channel. A real Dask server stands in for
the worker: it answers only where its channel listens, and the channel's CALL
handler records how many requests each message carried before answering them.
"""
from __future__ import annotations

import asyncio

from distributed.core import ConnectionPool, Server

from daskserve.channel import ChannelServer
from daskserve.http_codec import encode_request
from daskserve.protocol import WorkerOp
from daskserve.router import MESSAGE_REQUESTS, Router

BURST = 3 * MESSAGE_REQUESTS + 1


def _table(max_batch_size: int | None, address: str) -> dict:
    return {
        "epoch": "test", "version": 0 if max_batch_size is None else max_batch_size,
        "endpoints": {"e": {"route": "/e", "methods": ["GET"], "traffic": {"b": 1.0},
                            "shadows": {}}},
        "backends": {"b": {"max_concurrent_queries": 1000, "max_queued_requests": -1,
                           "queue_timeout_s": None, "max_batch_size": max_batch_size,
                           "replicas": [{"tag": "b#1", "address": address}]}},
    }


def test_a_burst_travels_in_bounded_messages_and_a_full_batch_in_one():
    sizes: list[int] = []

    def call(replica, ticket, http=(), calls=None):
        sizes.append(len(http))
        return {"http": [[index, [200, [], wire["path"].encode()]]
                         for index, wire in enumerate(http)]}

    async def main():
        channel = ChannelServer({WorkerOp.CALL: call})
        channel_address = await channel.start("tcp://127.0.0.1:1", None)
        worker = Server({WorkerOp.CHANNEL:
                         lambda comm=None: {"channel": channel_address, "lane": None}})
        await worker.listen("tcp://127.0.0.1:0")
        pool = await ConnectionPool()
        router = Router(pool, "tcp://127.0.0.1:1")
        try:
            for max_batch_size, expected in (
                    (None, [MESSAGE_REQUESTS] * 3 + [1]),
                    (BURST, [BURST])):  # a batched backend's full batch stays whole
                router.apply(_table(max_batch_size, worker.address))
                sizes.clear()
                answers = await asyncio.gather(*(
                    router.http("e", encode_request("GET", f"/e/{i}", "", [], b"", None),
                                None)
                    for i in range(BURST)))
                # Every request was answered with its own response, none twice.
                assert [body for _, _, body in answers] == [
                    f"/e/{i}".encode() for i in range(BURST)]
                assert sizes == expected
        finally:
            router.close()
            await pool.close()
            worker.stop()
            await channel.stop()

    asyncio.run(main())
