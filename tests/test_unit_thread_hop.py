"""Unit tests of daskserve.thread_hop: sync calls run in a thread pool and their
results (or exceptions) reach the coroutine awaiting them. Real ThreadPoolExecutor,
one event loop per test; no cluster.

Where a test needs "these calls have all finished in the pool", it uses a
one-thread pool and waits, on the loop thread, for a sentinel submitted after them:
the pool runs its work in order, so nothing depends on timing. Timeouts are only
safety nets against a hang.
"""
from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from daskserve.thread_hop import ThreadHop

SAFETY_TIMEOUT = 10  # seconds; never reached unless something hangs


def run(main, pool_threads: int = 4):
    """asyncio.run(main(hop, pool)); fails if the loop reported an unhandled error."""
    errors = []

    async def wrapper():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, ctx: errors.append(ctx))
        with ThreadPoolExecutor(pool_threads) as pool:
            return await asyncio.wait_for(main(ThreadHop(loop), pool), SAFETY_TIMEOUT)

    result = asyncio.run(wrapper())
    assert errors == [], f"event loop reported errors: {errors}"
    return result


def drain(pool: ThreadPoolExecutor) -> None:
    """Block until everything submitted to a one-thread ``pool`` so far has finished."""
    pool.submit(lambda: None).result(SAFETY_TIMEOUT)


class Fatal(BaseException):
    """Not an Exception: must reach the caller all the same."""


def test_result_reaches_the_awaiting_coroutine_from_a_pool_thread():
    async def main(hop, pool):
        loop_thread = threading.get_ident()
        value, worker_thread = await hop.run(pool, lambda: (42, threading.get_ident()))
        return value, worker_thread != loop_thread

    assert run(main) == (42, True)


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyError("k"), Fatal("fatal")])
def test_exception_reaches_the_awaiting_coroutine(exc):
    def fail():
        raise exc

    async def main(hop, pool):
        try:
            await hop.run(pool, fail)
        except BaseException as caught:  # Fatal is not an Exception
            return caught
        return None

    assert run(main) is exc


def test_many_calls_at_once_all_resolve_with_their_own_values():
    async def main(hop, pool):
        futures = [hop.run(pool, lambda i=i: i * i) for i in range(2000)]
        return await asyncio.gather(*futures)

    assert run(main) == [i * i for i in range(2000)]


def test_calls_finishing_in_any_order_resolve_their_own_futures():
    n = 16
    gates = [threading.Event() for _ in range(n)]

    def work(i):
        assert gates[i].wait(SAFETY_TIMEOUT)
        return f"result-{i}"

    async def main(hop, pool):
        futures = [hop.run(pool, lambda i=i: work(i)) for i in range(n)]
        order = list(range(n))
        random.Random(5).shuffle(order)
        resolved = []
        for i in order:  # finish the calls one by one, in a scrambled order
            gates[i].set()
            resolved.append(await futures[i])
            assert all(not futures[j].done() for j in order[len(resolved):])
        return resolved, order, [f.result() for f in futures]

    resolved, order, in_submission_order = run(main, pool_threads=n)
    assert resolved == [f"result-{i}" for i in order]
    assert in_submission_order == [f"result-{i}" for i in range(n)]


def test_mixed_results_and_exceptions_in_one_burst():
    def work(i):
        if i % 3 == 0:
            raise ValueError(i)
        return i

    async def main(hop, pool):
        futures = [hop.run(pool, lambda i=i: work(i)) for i in range(300)]
        return await asyncio.gather(*futures, return_exceptions=True)

    for i, outcome in enumerate(run(main)):
        if i % 3 == 0:
            assert isinstance(outcome, ValueError) and outcome.args == (i,)
        else:
            assert outcome == i


def test_a_burst_of_finished_calls_wakes_the_loop_once():
    wakeups = []

    async def main(hop, pool):
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):
            wakeups.append(callback)
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting
        try:
            bursts = []
            for burst in range(3):
                futures = [hop.run(pool, lambda i=i: (burst, i)) for i in range(50)]
                drain(pool)  # all 50 finished while the loop was busy (here)
                bursts.append((len(wakeups), await asyncio.gather(*futures)))
            return bursts
        finally:
            loop.call_soon_threadsafe = original

    bursts = run(main, pool_threads=1)
    assert [count for count, _ in bursts] == [1, 2, 3]
    for burst, (_, results) in enumerate(bursts):
        assert results == [(burst, i) for i in range(50)]


@pytest.mark.parametrize("raises", [False, True])
def test_cancelled_future_is_skipped_without_error(raises):
    gate = threading.Event()

    def slow():
        assert gate.wait(SAFETY_TIMEOUT)
        if raises:
            raise ValueError("nobody is listening")
        return "nobody is listening"

    async def main(hop, pool):
        cancelled = hop.run(pool, slow)
        after = hop.run(pool, lambda: "after")  # same one-thread pool: queued behind
        await asyncio.sleep(0)
        cancelled.cancel()
        gate.set()
        drain(pool)  # both results are now queued for one hand-out
        return cancelled.cancelled(), await after, await hop.run(pool, lambda: "later")

    # run() fails the test if handing a result to the cancelled future raised.
    assert run(main, pool_threads=1) == (True, "after", "later")


def test_stop_iteration_from_the_call_reaches_the_caller():
    def fn():
        raise StopIteration

    async def main(hop, pool):
        future = hop.run(pool, fn)
        drain(pool)
        for _ in range(3):
            await asyncio.sleep(0)  # the hand-out, scheduled before drain returned, runs
        assert future.done(), "the caller would wait forever"
        return future.exception()

    # Either the StopIteration itself or asyncio's RuntimeError wrapping it is fine.
    assert isinstance(run(main, pool_threads=1), (StopIteration, RuntimeError))


def test_results_queued_behind_a_stop_iteration_are_delivered():
    def fn():
        raise StopIteration

    async def main(hop, pool):
        failing = hop.run(pool, fn)
        behind = hop.run(pool, lambda: "behind")
        drain(pool)
        for _ in range(3):
            await asyncio.sleep(0)
        assert behind.done(), "a healthy call would wait for an unrelated later one"
        assert isinstance(failing.exception(), (StopIteration, RuntimeError))
        return behind.result()

    assert run(main, pool_threads=1) == "behind"
