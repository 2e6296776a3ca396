"""Latency at low load: both layouts beside plain Tornado, interleaved in one run.

    python benchmarks/low_load.py [--rounds 5] [--duration 2] [--baseline TREE]

Two ways to run daskserve are measured, each as one server:

- **benchmark layout**: ``dask scheduler --preload scheduler_plugin`` (controller and
  HTTP proxy), one ``dask worker`` process, uvloop in both, an ``async def`` noop;
- **newcomer layout**: what a first script does, ``serve.start(Client(LocalCluster()))``
  with a plain ``def`` handler and no event-loop setting; the proxy runs in the
  script's own process, the replica in one of LocalCluster's worker processes.

A third row runs the newcomer layout with an ``async def`` handler, to show what the
``def`` handler's hop into a thread costs.

With ``--baseline`` both layouts also run from another source tree, so a change is
compared with the code before it in the same run. Each server's processes start in
their tree's directory with it on PYTHONPATH, and its backends are created by a client
of that tree, so no other copy of daskserve (an installed one, or the directory this
runs from) can stand in for it. Every round sends each server the
same short wrk load at each concurrency, servers in shuffled order, so they all see
the same machine within seconds. While one server is measured the others are paused
(SIGSTOP): idle servers still wake for their timers, and on two cores that moved the
low-load figures of whichever server shared a core with them by tens of percent
(which one depended on the order they started in). Medians over rounds are printed: p50 latency at each
concurrency and its ratio to Tornado's p50 in the same round, throughput and its
ratio, and the CPU time the server's processes (with their children) spent per
request, which moves less than latency when others share the machine.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
from contextlib import ExitStack, contextmanager
from typing import Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from ab_http import (cpu_seconds, shuffled_points, start_daskserve,  # noqa: E402
                     start_tornado)
from run import free_port, process, run_wrk, wait_http  # noqa: E402

NEWCOMER = """
import sys, time
from distributed import Client, LocalCluster
import daskserve as serve

def hello(request):
    return "ok"

async def hello_async(request):
    return "ok"

if __name__ == "__main__":
    client = Client(LocalCluster())
    sc = serve.start(client, http_options={"port": int(sys.argv[1])})
    sc.create_backend("hello", hello if sys.argv[2] == "def" else hello_async)
    sc.create_endpoint("hello", backend="hello", route="/hello")
    while True:
        time.sleep(3600)
"""


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (LocalCluster's nannies and workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rpartition(")")[2].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


@contextmanager
def only(pids: dict[str, list[int]], name: str) -> Iterator[None]:
    """Pause every server's processes but ``name``'s for the duration."""
    others = [pid for other, group in pids.items() if other != name for pid in group]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def start_benchmark_layout(stack: ExitStack, tree: str) -> tuple[str, list[int]]:
    return start_daskserve(stack, tree, access_log=False)


def start_newcomer_layout(stack: ExitStack, tree: str,
                          handler: str = "def") -> tuple[str, list[int]]:
    port = free_port()
    script = stack.enter_context(process(
        sys.executable, "-c", NEWCOMER, str(port), handler,
        env={"PYTHONPATH": tree}, cwd=tree))
    url = f"http://127.0.0.1:{port}/hello"
    wait_http(url, timeout=120)
    return url, descendants(script.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per point")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--baseline", help="also run both layouts from this source tree")
    args = parser.parse_args()
    trees = {"": os.path.dirname(HERE)}
    if args.baseline:
        trees[" (baseline)"] = os.path.abspath(args.baseline)

    with ExitStack() as stack:
        url, tornado_pids = start_tornado(stack)
        urls, pids = {"plain Tornado": url}, {"plain Tornado": tornado_pids}
        for suffix, tree in trees.items():
            for layout, start in (("benchmark layout", start_benchmark_layout),
                                  ("newcomer layout", start_newcomer_layout)):
                urls[layout + suffix], pids[layout + suffix] = start(stack, tree)
        # What the ``def`` handler's thread hop costs, on the newcomer layout.
        name = "newcomer layout, async def handler"
        urls[name], pids[name] = start_newcomer_layout(stack, trees[""], "async")
        for url in urls.values():
            run_wrk(url, 16, 1)  # warm-up

        results: dict[tuple[str, int], list[dict]] = {}
        for _, c, name in shuffled_points(list(urls), args.rounds, args.connections):
            with only(pids, name):
                # Its own timers fired late while it was paused: let them settle
                # under the same load before measuring.
                run_wrk(urls[name], c, 1)
                before = cpu_seconds(pids[name])
                result = run_wrk(urls[name], c, args.duration)
                used = cpu_seconds(pids[name]) - before
            if result["errors"]:
                raise SystemExit(f"{name} answered {result['errors']} errors")
            result["cpu_us"] = used / (result["rps"] * args.duration) * 1e6
            results.setdefault((name, c), []).append(result)
        load = os.getloadavg()[0]

    def median(name: str, c: int, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, c)])

    def paired(name: str, c: int, key: str) -> float:
        return statistics.median(r[key] / t[key] for r, t in
                                 zip(results[(name, c)], results[("plain Tornado", c)]))

    print(f"\n{args.rounds} rounds, wrk -t1, {args.duration:g} s per point, servers "
          f"interleaved in shuffled order; medians; load average at the end {load:.1f}\n")
    cs = args.connections
    print("| server | " + " | ".join(f"p50 ms c={c} (x Tornado)" for c in cs) + " | "
          + " | ".join(f"req/s c={c} (x Tornado)" for c in cs) + " | "
          + " | ".join(f"CPU µs/req c={c}" for c in cs) + " |")
    print("|---|" + "---|" * (3 * len(cs)))
    for name in urls:
        cells = [f"{median(name, c, 'p50'):.2f} ({paired(name, c, 'p50'):.2f})" for c in cs]
        cells += [f"{median(name, c, 'rps'):,.0f} ({paired(name, c, 'rps'):.2f})" for c in cs]
        cells += [f"{median(name, c, 'cpu_us'):.0f}" for c in cs]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
