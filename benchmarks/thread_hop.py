"""How sync handlers reach the event loop: ``run_in_executor`` vs ``ThreadHop``.

    python benchmarks/thread_hop.py

Both submit a trivial function to the same 100-thread pool, one call at a time or
in bursts of 64 (what a coalesced message fans out into); best of 3 one-second runs.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from daskserve.thread_hop import ThreadHop


def trivial() -> int:
    return 1


async def main() -> None:
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(100)
    hop = ThreadHop(loop)
    ways = {"run_in_executor": lambda: loop.run_in_executor(pool, trivial),
            "ThreadHop": lambda: hop.run(pool, trivial)}
    print("| burst | run_in_executor calls/s | ThreadHop calls/s | ratio |")
    print("|---|---|---|---|")
    for burst in (1, 64):
        best = {}
        for name, submit in ways.items():
            for _ in range(3):
                done, start = 0, time.perf_counter()
                while time.perf_counter() - start < 1:
                    await asyncio.gather(*(submit() for _ in range(burst)))
                    done += burst
                best[name] = max(best.get(name, 0), done / (time.perf_counter() - start))
        a, b = best["run_in_executor"], best["ThreadHop"]
        print(f"| {burst} | {a:,.0f} | {b:,.0f} | {b / a:.2f} |")
    pool.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
