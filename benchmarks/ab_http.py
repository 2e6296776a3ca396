"""HTTP noop throughput of this tree against another version, paired, in one run.

    git worktree add ../daskserve-main main
    python benchmarks/ab_http.py --baseline ../daskserve-main [--rounds 6] [--duration 2]

``run.py`` measures one version at a time; on a shared machine the load moves more
between two of its runs than the few percent a change could cost. Here every server
runs at once: plain Tornado, the baseline version, this tree, and this tree with the
access log on (each daskserve one as ``run.py`` lays it out: a scheduler with the
preload and the proxy, one worker, an ``async def`` noop, every process started in
its tree's directory, since ``python -m`` imports from there before PYTHONPATH). Each
round sends the same
short wrk load to each in a shuffled order, so every version sees the same machine
state within seconds, and each round gives a paired ratio. Medians over the rounds
are printed.

Throughput on a machine others share swings by tens of percent from second to second;
the CPU time each server's processes spend per request swings far less, so it is
printed too (from /proc, summed over the scheduler with the proxy and the worker with
the replica): what a change adds to the serving path shows there first.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
from contextlib import ExitStack
from typing import Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from run import free_port, process, run_wrk, wait_http  # noqa: E402


# Backends are created by a script run from the tree under test, so that its client
# code speaks its controller's protocol, and the handler travels by value.
SETUP = """
import sys
from distributed import Client
import daskserve as serve

async def noop(*args):
    return "ok"

with Client(sys.argv[1], timeout=60) as client:
    client.wait_for_workers(1, timeout=60)
    sc = serve.connect(client)
    sc.create_backend("noop", noop, replica_options={"num_cpus": 0.5})
    sc.create_endpoint("noop", backend="noop", route="/noop")
"""


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time the processes have used so far."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def shuffled_points(names: list[str], rounds: int,
                    connections: list[int]) -> Iterator[tuple[int, int, str]]:
    """Every (round, connections, server) point to measure, the servers in a fresh
    random order at each concurrency, so none always runs right after another;
    reports each finished round on stderr."""
    for round_ in range(rounds):
        for c in connections:
            order = list(names)
            random.shuffle(order)
            for name in order:
                yield round_, c, name
        print(f"round {round_ + 1}/{rounds} done", file=sys.stderr)


def start_tornado(stack: ExitStack) -> tuple[str, list[int]]:
    """The ceiling: plain Tornado's hello world; returns its URL and process id."""
    port = free_port()
    tornado = stack.enter_context(process(
        sys.executable, os.path.join(HERE, "tornado_hello.py"), str(port)))
    url = f"http://127.0.0.1:{port}/"
    wait_http(url)
    return url, [tornado.pid]


def start_daskserve(stack: ExitStack, tree: str, access_log: bool) -> tuple[str, list[int]]:
    """A scheduler (controller + proxy) and a worker importing daskserve from ``tree``,
    serving an ``async def`` noop; returns its URL and the two processes' ids."""
    sched_port, http_port = free_port(), free_port()
    address = f"tcp://127.0.0.1:{sched_port}"
    env = {"DASK_DISTRIBUTED__ADMIN__EVENT_LOOP": "uvloop", "PYTHONPATH": tree}
    scheduler = stack.enter_context(process(
        sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
        "--port", str(sched_port), "--dashboard-address", ":0", "--preload",
        "scheduler_plugin", "--serve-http-port", str(http_port),
        *(["--serve-http-access-log"] if access_log else []), env=env, cwd=tree))
    worker = stack.enter_context(process(
        sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
        "--nworkers", "1", "--no-nanny", "--dashboard-address", ":0", env=env, cwd=tree))
    subprocess.run([sys.executable, "-c", SETUP, address], env={**os.environ, **env},
                   cwd=tree, check=True)
    url = f"http://127.0.0.1:{http_port}/noop"
    wait_http(url)
    return url, [scheduler.pid, worker.pid]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True,
                        help="a source tree of the version to compare against")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per point")
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 64])
    args = parser.parse_args()
    this_tree = os.path.dirname(HERE)

    with ExitStack() as stack:
        url, tornado_pids = start_tornado(stack)
        urls, pids = {"tornado": url}, {"tornado": tornado_pids}
        for name, tree, access_log in (("baseline", os.path.abspath(args.baseline), False),
                                       ("this tree", this_tree, False),
                                       ("this tree, access log on", this_tree, True)):
            urls[name], pids[name] = start_daskserve(stack, tree, access_log)
        for url in urls.values():
            run_wrk(url, 16, 1)  # warm-up

        rps: dict[tuple[str, int], list[float]] = {}
        cpu_us: dict[tuple[str, int], list[float]] = {}
        for _, c, name in shuffled_points(list(urls), args.rounds, args.connections):
            before = cpu_seconds(pids[name])
            result = run_wrk(urls[name], c, args.duration)
            used = cpu_seconds(pids[name]) - before
            assert result["errors"] == 0, (name, result)
            rps.setdefault((name, c), []).append(result["rps"])
            cpu_us.setdefault((name, c), []).append(
                used / (result["rps"] * args.duration) * 1e6)

    print(f"\n{args.rounds} rounds, wrk -t1, {args.duration:g} s per point, servers "
          f"interleaved in shuffled order; medians (min-max)\n")
    print("| server | " + " | ".join(f"c={c} req/s | ratio to Tornado (paired)"
                                    for c in args.connections) + " |")
    print("|---|" + "---|---|" * len(args.connections))
    for name in urls:
        cells = []
        for c in args.connections:
            values = rps[(name, c)]
            ratios = [v / t for v, t in zip(values, rps[("tornado", c)])]
            cells.append(f"{statistics.median(values):,.0f} ({min(values):,.0f}-"
                         f"{max(values):,.0f})")
            cells.append(f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-"
                         f"{max(ratios):.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    for c in args.connections:
        paired = [m / b for m, b in zip(rps[("this tree", c)], rps[("baseline", c)])]
        print(f"\nc={c}: this tree / baseline req/s, paired per round: median "
              f"{statistics.median(paired):.2f} (" +
              ", ".join(f"{p:.2f}" for p in paired) + ")")
    print("\nCPU time per request, µs (server processes only), median (min-max):\n")
    print("| server | " + " | ".join(f"c={c}" for c in args.connections) + " |")
    print("|---|" + "---|" * len(args.connections))
    for name in urls:
        print(f"| {name} | " + " | ".join(
            f"{statistics.median(cpu_us[(name, c)]):.0f} ({min(cpu_us[(name, c)]):.0f}-"
            f"{max(cpu_us[(name, c)]):.0f})" for c in args.connections) + " |")


if __name__ == "__main__":
    main()
