"""Which transport carries coalesced messages to a replica: ``actor_execute`` or the
worker handler daskserve installs (the fast path it uses)?

    python benchmarks/transport.py [--duration 3]

Both paths reach the same live replica executor with the same message: N noop
handle calls pickled as one blob. Only the transport differs:

- actor:   ``await actor.handle(...)`` through Dask's actor proxy
  (``actor_execute``, arguments wrapped by Dask's serialization), on an actor that
  hands the message to the executor;
- handler: ``WorkerOp.CALL`` on the worker via the client's connection pool, the
  path routers use.

Prints messages/s and calls/s for messages of 1 and 64 calls, 1 and 16 in flight.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

import cloudpickle
import dask
from distributed import Client, LocalCluster, get_worker

import daskserve as serve
from daskserve.protocol import WorkerOp
from daskserve.worker_plugin import ServeWorkerPlugin

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import rate  # noqa: E402


async def noop(*args):
    return None


class ExecutorActor:
    """A Dask actor in front of a replica's executor: the ``actor_execute`` path."""

    def __init__(self, replica: str):
        self._executor = ServeWorkerPlugin.on(get_worker()).executors[replica]

    async def handle(self, http: list, calls: list) -> tuple:
        return await self._executor.handle(http, calls)


async def measure(address: str, worker: str, replica: str, duration: float) -> list[tuple]:
    rows = []
    async with Client(address, asynchronous=True, direct_to_workers=True) as client:
        actor = await client.submit(ExecutorActor, replica, actor=True, workers=[worker])
        rpc = getattr(client.rpc(worker), WorkerOp.CALL)
        for size in (1, 64):
            blob = cloudpickle.dumps([("__call__", (1,), {})] * size)
            calls = cloudpickle.loads(blob)

            async def via_actor() -> None:
                await actor.handle([], calls)

            async def via_handler() -> None:
                await rpc(replica=replica, calls=blob)

            for in_flight in (1, 16):
                a = await rate(via_actor, in_flight, duration)
                h = await rate(via_handler, in_flight, duration)
                rows.append((size, in_flight, a, h))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    with dask.config.set({"distributed.admin.event-loop": "uvloop"}):
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0")
    with cluster, Client(cluster) as client:
        sc = serve.start(client, http_options={"location": "NoServer"})
        sc.create_backend("noop", noop)
        worker = next(iter(client.scheduler_info()["workers"]))
        replica = client.run(lambda dask_worker: next(iter(
            ServeWorkerPlugin.on(dask_worker).executors)), workers=[worker])[worker]
        rows = asyncio.run(measure(cluster.scheduler_address, worker, replica,
                                   args.duration))
        sc.shutdown()
    print("\n| calls per message | in flight | actor_execute msgs/s | worker handler msgs/s "
          "| handler / actor | handler calls/s |")
    print("|---|---|---|---|---|---|")
    for size, in_flight, a, h in rows:
        print(f"| {size} | {in_flight} | {a:,.0f} | {h:,.0f} | {h / a:.2f} | {h * size:,.0f} |")


if __name__ == "__main__":
    main()
