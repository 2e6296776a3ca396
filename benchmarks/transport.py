"""Which transport should carry a router's messages to a replica?

    python benchmarks/transport.py [--duration 3]

Three paths reach the same live replica executor with the same ``CALL`` message (N
noop handle calls pickled as one blob); only the transport differs:

- actor:   ``await actor.handle(...)`` through Dask's actor proxy (``actor_execute``,
  arguments wrapped by Dask's serialization), on an actor in front of the executor;
- Dask comm: the worker plugin's ``call`` installed as a Dask worker handler, reached
  over the client's Dask connection pool (what routers used before the channel);
- channel: ``WorkerOp.CALL`` over the worker's request channel
  (``daskserve.channel``), the path routers use.

Prints messages/s for messages of 1 and 64 calls with 1 and 16 in flight. With one in
flight a message waits for the one before it, so that column is what low load costs.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys

import cloudpickle
from distributed import Client, get_worker

import daskserve as serve
from daskserve import event_loop
from daskserve.channel import ChannelPool
from daskserve.protocol import WorkerOp
from daskserve.worker_plugin import ServeWorkerPlugin

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import rate  # noqa: E402

DASK_CALL = "bench_dask_call"
_tickets = itertools.count()


async def noop(*args):
    return None


class ExecutorActor:
    """A Dask actor in front of a replica's executor: the ``actor_execute`` path."""

    def __init__(self, replica: str):
        self._plugin = ServeWorkerPlugin.on(get_worker())
        self._replica = replica

    async def handle(self, ticket: int, calls: bytes) -> dict:
        return await self._plugin.call(replica=self._replica, ticket=ticket, calls=calls)


def install_dask_handler(dask_worker) -> None:
    dask_worker.handlers[DASK_CALL] = ServeWorkerPlugin.on(dask_worker).call


async def measure(address: str, worker: str, replica: str, duration: float) -> list[tuple]:
    rows = []
    async with Client(address, asynchronous=True, direct_to_workers=True) as client:
        actor = await client.submit(ExecutorActor, replica, actor=True, workers=[worker])
        dask_call = getattr(client.rpc(worker), DASK_CALL)
        channels = ChannelPool(client.rpc)
        channel = await channels.get(worker)
        for size in (1, 64):
            blob = cloudpickle.dumps([("__call__", (1,), {})] * size)
            paths = {
                "actor": lambda: actor.handle(next(_tickets), blob),
                "dask": lambda: dask_call(replica=replica, ticket=next(_tickets), calls=blob),
                "channel": lambda: channel.request(WorkerOp.CALL, replica=replica,
                                                   ticket=next(_tickets), calls=blob),
            }
            for in_flight in (1, 16):
                rates = {name: await rate(send, in_flight, duration)
                         for name, send in paths.items()}
                rows.append((size, in_flight, rates))
        channels.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    cluster = event_loop.local_cluster(n_workers=1, threads_per_worker=1,
                                       dashboard_address=":0")
    with cluster, Client(cluster) as client:
        sc = serve.start(client, http_options={"location": "NoServer"})
        sc.create_backend("noop", noop)
        worker = next(iter(client.scheduler_info()["workers"]))
        client.run(install_dask_handler, workers=[worker])
        replica = client.run(lambda dask_worker: next(iter(
            ServeWorkerPlugin.on(dask_worker).executors)), workers=[worker])[worker]
        runner = asyncio.run
        if event_loop.preferred() == "uvloop":
            import uvloop
            runner = uvloop.run
        rows = runner(measure(cluster.scheduler_address, worker, replica, args.duration))
        sc.shutdown()
    print(f"\nevent loop: {event_loop.preferred()} in every process\n")
    print("| calls per message | in flight | actor_execute msgs/s | Dask comm msgs/s "
          "| channel msgs/s | channel / Dask comm |")
    print("|---|---|---|---|---|---|")
    for size, in_flight, r in rows:
        print(f"| {size} | {in_flight} | {r['actor']:,.0f} | {r['dask']:,.0f} | "
              f"{r['channel']:,.0f} | {r['channel'] / r['dask']:.2f} |")


if __name__ == "__main__":
    main()
