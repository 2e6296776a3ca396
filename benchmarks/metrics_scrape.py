"""How long a metrics scrape takes with hundreds of replicas' series.

    python benchmarks/metrics_scrape.py [--replicas 200] [--workers 10] [--repeat 20]

In one process, fills daskserve's registry with the series ``--replicas`` replicas
make (every built-in per-replica metric, batch sizes included, and one custom metric
with one tag each), plus 20 endpoints' proxy series, then times each step of a scrape:

- ``generate_latest`` of the registry: what one process's exposition costs;
- ``snapshot``: what one worker does when the controller asks it (here for all
  replicas at once, so an upper bound for one worker);
- the controller's part: the snapshot split as ``--workers`` workers would send it,
  through msgpack as Dask's comms carry it, merged and written as text.

No cluster is started: the point is the cost that grows with the number of series.
The replicas' gauges read a stand-in object with the two attributes they use.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import msgpack

from daskserve import metrics
from daskserve.custom_metrics import Counter


class _Executor:
    """Stands in for a replica executor: what the scrape-time gauges read."""

    def __init__(self) -> None:
        self.in_flight = 3
        self._methods: dict = {}


def populate(replicas: int) -> list:
    keep = []
    custom = Counter("bench_custom_total", "one custom series per replica",
                     tag_keys=("model",))
    for i in range(replicas):
        backend = f"backend{i % 20}"
        tag = f"{backend}#{i:08x}"
        executor = _Executor()
        keep.append(executor)
        series = metrics._ReplicaSeries(backend, tag, executor)
        metrics._replicas[tag] = series
        for value in (0.5, 3.0, 40.0, 700.0):
            series.requests.inc()
            series.processing.observe(value)
            series.queuing.observe(value / 10)
            series.batch.observe(8)
        metrics.REPLICA_STARTS.labels(backend).inc()
        custom._family.prom.labels(backend, tag, "v1").inc()
    for e in range(20):
        endpoint = f"endpoint{e}"
        for status in (200, 500):
            metrics.record_http(f"/{endpoint}", "GET", status, endpoint)
        metrics.HTTP_LATENCY.labels(endpoint).observe(12.0)
        metrics.ROUTER_REQUESTS.labels(endpoint).inc()
    return keep


def timed(fn, repeat: int) -> tuple[float, object]:
    times = []
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, result


def split(snapshot: list, workers: int) -> list[list]:
    """The snapshot as ``workers`` processes would send it: replica series spread
    over them, the rest (proxy, controller) in the first."""
    parts: list[list] = [[] for _ in range(workers)]
    for name, kind, doc, samples in snapshot:
        buckets: list[list] = [[] for _ in range(workers)]
        for sample in samples:
            replica = sample[1].get("replica")
            buckets[hash(replica) % workers if replica else 0].append(sample)
        for part, bucket in zip(parts, buckets):
            if bucket:
                part.append([name, kind, doc, bucket])
    return parts


async def stall(step, in_thread: bool) -> float:
    """The longest an event loop waited for its turn (ms) while ``step`` ran, inline or
    in a thread as the controller runs it: what a HeadOnly proxy on the scheduler's
    loop would add to a request's latency during a scrape."""
    loop = asyncio.get_running_loop()
    worst, running = 0.0, True

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.001)
            last = now

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.01)
    if in_thread:
        await loop.run_in_executor(None, step)
    else:
        step()
    await asyncio.sleep(0.01)
    running = False
    await task
    return worst * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=200)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    keep = populate(args.replicas)
    direct_ms, text = timed(lambda: metrics.generate_latest(metrics.REGISTRY), args.repeat)
    snapshot_ms, snap = timed(metrics.snapshot, args.repeat)
    parts = [msgpack.packb(part) for part in split(snap, args.workers)]

    def controller() -> bytes:
        received = [msgpack.unpackb(p, strict_map_key=False) for p in parts]
        return metrics.text(metrics.merge(received))

    merge_ms, merged = timed(controller, args.repeat)
    series = sum(1 for line in merged.splitlines() if line and not line.startswith(b"#"))
    print(f"{args.replicas} replicas ({len(keep)} executors), {args.workers} workers, "
          f"median of {args.repeat}")
    print(f"| step | ms |\n|---|---|")
    print(f"| generate_latest(registry), one process, {len(text) / 1024:.0f} KiB | "
          f"{direct_ms:.1f} |")
    print(f"| snapshot() of the same registry (worker side, all replicas) | "
          f"{snapshot_ms:.1f} |")
    print(f"| controller: unpack {args.workers} snapshots, merge, write text "
          f"({series:,} series, {len(merged) / 1024:.0f} KiB) | {merge_ms:.1f} |")
    print(f"| whole scrape, serial upper bound (snapshot + controller) | "
          f"{snapshot_ms + merge_ms:.1f} |")
    inline = statistics.median(asyncio.run(stall(controller, False)) for _ in range(5))
    threaded = statistics.median(asyncio.run(stall(controller, True)) for _ in range(5))
    print(f"| longest event-loop stall during the controller step: inline | {inline:.1f} |")
    print(f"| longest event-loop stall during the controller step: in a thread (as run) | "
          f"{threaded:.1f} |")


if __name__ == "__main__":
    main()
