"""Does a CPU-bound replica in the proxy's worker process slow the host's HTTP?

    python benchmarks/proxy_colocation.py [--rounds 3] [--duration 5] [--connections 4]

An EveryNode proxy runs on the event loop of one worker of its host. A sync (``def``)
handler doing pure-Python work runs in a thread of its worker and holds the GIL; if
that worker is the proxy's, the proxy's loop waits for the GIL at every wake-up.
This measures it on one host (loopback): a scheduler with the preload
(``--serve-http-location EveryNode``) and three one-thread workers, ``proxy`` (started
first, so it runs the host's proxy), ``other`` and ``light``. Custom worker resources
pin each replica to its worker; the controller's own placement plays no part.

A light ``async def`` endpoint is loaded with ``wrk`` through the proxy while a
CPU-bound backend is kept busy through a handle from this process (so the proxy
itself carries only the light traffic), with the CPU-bound replica:

- none: the baseline;
- in the proxy's worker process (what placement may do today);
- in another worker process of the same host.

A fourth row serves the light endpoint from a replica in the proxy's own process
(no heavy load): the in-process path a placement that avoids the proxy's worker
would give up. Rounds shuffle the order of the rows; medians over rounds are
printed, with ratios to the baseline of the same round.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]  # this checkout's daskserve, here as in the Dask processes

from run import ensure_wrk, free_port, process, run_wrk, wait_http  # noqa: E402

SPIN_S = 0.05  # one CPU-bound call: pure Python, holding the GIL throughout
WORKERS = ("proxy", "other", "light")


async def light(request):
    return "ok"


def spin(seconds: float) -> int:
    """Busy pure-Python loop, the shape of a CPU-bound model without native code."""
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        count += 1
    return count


def keep_busy(handle, stop: threading.Event, done: list[int]) -> None:
    """Call the CPU-bound backend back to back until ``stop``; counts in ``done``."""
    while not stop.is_set():
        handle.remote(SPIN_S).result(timeout=60)
        done.append(1)


def start_cluster(stack: ExitStack):
    """Scheduler and the three workers; returns the serve client and the proxy URL."""
    from distributed import Client

    import daskserve as serve

    sched_port, http_port = free_port(), free_port()
    address = f"tcp://127.0.0.1:{sched_port}"
    env = {"DASK_DISTRIBUTED__ADMIN__EVENT_LOOP": "uvloop",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    stack.enter_context(process(
        sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
        "--port", str(sched_port), "--dashboard-address", ":0", "--preload",
        "scheduler_plugin", "--serve-http-location", "EveryNode",
        "--serve-http-port", str(http_port), env=env))
    client = stack.enter_context(Client(address, timeout=60))
    for count, name in enumerate(WORKERS, 1):
        stack.enter_context(process(
            sys.executable, "-m", "distributed.cli.dask_worker", address, "--host",
            "127.0.0.1", "--nthreads", "1", "--no-nanny", "--dashboard-address", ":0",
            "--resources", f"CPU=4,{name}=2", env=env))
        client.wait_for_workers(count, timeout=60)
        if count == 1:  # the first worker takes the host's proxy before others join
            sc = serve.connect(client)
            deadline = time.monotonic() + 60
            while not sc.info()["proxies"]:
                if time.monotonic() > deadline:
                    sys.exit("no proxy started on the first worker")
                time.sleep(0.1)
    for name, func, worker in (("heavy_in_proxy", spin, "proxy"),
                               ("heavy_apart", spin, "other"),
                               ("light", light, "light"),
                               ("light_in_proxy", light, "proxy")):
        sc.create_backend(name, func, config={"max_concurrent_queries": 1 if func is spin
                                              else 100},
                          replica_options={"num_cpus": 1, "resources": {worker: 1}})
        sc.create_endpoint(name, backend=name, route=f"/{name}")
    return sc, f"http://127.0.0.1:{http_port}"


def measure(sc, base: str, heavy: str | None, route: str, connections: int,
            duration: float) -> dict:
    """wrk on ``route`` while ``heavy`` (a backend, or None) is kept busy; adds the
    CPU-bound calls finished per second, to show that the load really ran."""
    stop, done = threading.Event(), []
    with ThreadPoolExecutor(2) as pool:
        # Two callers, so that a call always waits at the replica's router.
        loaders = [pool.submit(keep_busy, sc.get_handle(heavy), stop, done)
                   for _ in range(2 if heavy else 0)]
        try:
            time.sleep(0.5 if heavy else 0)  # the replica is busy before wrk starts
            start = len(done)
            result = run_wrk(base + route, connections, duration, timeout=10)
            result["heavy_per_s"] = (len(done) - start) / duration
        finally:
            stop.set()
        for loader in loaders:
            loader.result()  # a failed load must not pass for a quiet one
    return result


ROWS = {  # name: (heavy backend kept busy, light route measured)
    "no CPU-bound load": (None, "/light"),
    "CPU-bound replica in the proxy's process": ("heavy_in_proxy", "/light"),
    "CPU-bound replica in another process": ("heavy_apart", "/light"),
    "no load, light replica in the proxy's process": (None, "/light_in_proxy"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="shuffles the row order")
    args = parser.parse_args()
    ensure_wrk()
    shuffle = random.Random(args.seed).shuffle
    samples: dict[str, list[dict]] = {name: [] for name in ROWS}
    with ExitStack() as stack:
        sc, base = start_cluster(stack)
        wait_http(base + "/light")
        run_wrk(base + "/light", args.connections, 1)  # warm-up
        for _ in range(args.rounds):
            order = list(ROWS)
            shuffle(order)
            for name in order:
                heavy, route = ROWS[name]
                samples[name].append(measure(sc, base, heavy, route, args.connections,
                                             args.duration))
        sc.shutdown()
    baseline = samples["no CPU-bound load"]

    def median(name: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[name])

    def ratio(name: str, key: str) -> float:
        return statistics.median(s[key] / b[key] for s, b in zip(samples[name], baseline))

    print(f"\n{args.rounds} rounds, wrk -t1 -c{args.connections}, {args.duration:g} s per "
          f"point; ratios to the baseline of the same round (median)\n")
    print("| light endpoint, served by the host's proxy | req/s | p50 ms | p99 ms "
          "| req/s ratio | p50 ratio | p99 ratio | errors | CPU-bound calls/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ROWS:
        errors = sum(s["errors"] + s["timeouts"] for s in samples[name])
        print(f"| {name} | {median(name, 'rps'):,.0f} | {median(name, 'p50'):.2f} "
              f"| {median(name, 'p99'):.2f} | {ratio(name, 'rps'):.2f} "
              f"| {ratio(name, 'p50'):.2f} | {ratio(name, 'p99'):.2f} | {errors} "
              f"| {median(name, 'heavy_per_s'):.1f} |")


if __name__ == "__main__":
    main()
