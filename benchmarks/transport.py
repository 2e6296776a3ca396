"""Which transport carries coalesced messages to a replica: ``actor_execute`` or the
worker handler daskserve installs (the fast path it uses)?

    python benchmarks/transport.py [--duration 3]

Both paths call the same method of the same live replica (a Dask actor) with the
same message: N noop handle calls pickled as one blob. Only the transport differs:

- actor:   ``await actor.handle(...)`` through Dask's actor proxy
  (``actor_execute``, arguments wrapped by Dask's serialization);
- handler: ``daskserve_call`` on the worker via the client's connection pool, the
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
from distributed import Actor, Client, LocalCluster

import daskserve as serve
from daskserve.protocol import CALL
from daskserve.replica import Replica

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import rate  # noqa: E402


async def noop(*args):
    return None


async def measure(address: str, worker: str, key: str, duration: float) -> list[tuple]:
    rows = []
    async with Client(address, asynchronous=True, direct_to_workers=True) as client:
        actor = Actor(Replica, worker, key)  # binds to the current (this) client
        rpc = getattr(client.rpc(worker), CALL)
        for size in (1, 64):
            blob = cloudpickle.dumps([("__call__", (1,), {})] * size)
            calls = cloudpickle.loads(blob)

            async def via_actor() -> None:
                await actor.handle([], calls)

            async def via_handler() -> None:
                await rpc(key=key, calls=blob)

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
        key = next(k for k in client.run(lambda dask_worker: list(dask_worker.state.actors))
                   .popitem()[1])
        worker = next(iter(client.scheduler_info()["workers"]))
        rows = asyncio.run(measure(cluster.scheduler_address, worker, key, args.duration))
        sc.shutdown()
    print("\n| calls per message | in flight | actor_execute msgs/s | worker handler msgs/s "
          "| handler / actor | handler calls/s |")
    print("|---|---|---|---|---|---|")
    for size, in_flight, a, h in rows:
        print(f"| {size} | {in_flight} | {a:,.0f} | {h:,.0f} | {h / a:.2f} | {h * size:,.0f} |")


if __name__ == "__main__":
    main()
