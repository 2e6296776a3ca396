"""Unit tests of daskserve.batching: how BatchQueue groups submissions into batches,
and how a failing or wrong-length batch handler fails only its own batch. Each test
runs its own event loop with ``asyncio.run``; no cluster.

Timeouts here are only safety nets against a hang; nothing asserts how fast a batch
goes out.
"""
from __future__ import annotations

import asyncio

import pytest

import daskserve
from daskserve.batching import (BatchLengthError, BatchQueue, accept_batch,
                                accepts_batch)

SAFETY_TIMEOUT = 10  # seconds; never reached unless something hangs


class Handler:
    """A batch handler that records each batch and answers ``10 * x`` per item.

    ``bad`` in a batch makes it return one result too few; ``poison`` makes it raise.
    """

    def __init__(self):
        self.batches: list[list] = []
        self.error = RuntimeError("poisoned batch")

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        await asyncio.sleep(0)  # a real handler suspends; batches may overlap
        if "poison" in items:
            raise self.error
        if "bad" in items:
            return [0] * (len(items) - 1)
        return [10 * x for x in items]


def run(main):
    """asyncio.run(main()), failing the test if the loop reports any unhandled error."""
    errors = []

    async def wrapper():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        return await asyncio.wait_for(main(), SAFETY_TIMEOUT)

    result = asyncio.run(wrapper())
    assert errors == [], f"event loop reported errors: {errors}"
    return result


async def settle(futures):
    return await asyncio.gather(*futures, return_exceptions=True)


# -- batch formation --------------------------------------------------------------

def test_full_batch_flushes_without_waiting_for_the_timer():
    handler = Handler()

    async def main():
        # The timer would fire only after a minute: a full batch must not wait for it.
        queue = BatchQueue(handler, max_size=3, wait_s=60)
        return await settle([queue.submit(i) for i in range(3)])

    assert run(main) == [0, 10, 20]
    assert handler.batches == [[0, 1, 2]]


def test_full_batch_flushes_mid_tick_and_the_rest_waits():
    handler = Handler()

    async def main():
        queue = BatchQueue(handler, max_size=3, wait_s=60)
        futures = [queue.submit(i) for i in range(4)]
        done = await settle(futures[:3])
        await asyncio.sleep(0)
        assert not futures[3].done()  # one item is not a full batch: it waits
        futures[3].cancel()
        return done

    assert run(main) == [0, 10, 20]
    assert handler.batches == [[0, 1, 2]]


def test_zero_wait_groups_everything_submitted_in_one_tick():
    handler = Handler()

    async def main():
        queue = BatchQueue(handler, max_size=100, wait_s=0)
        first = [queue.submit(i) for i in range(10)]
        results = await settle(first)
        second = [queue.submit(i) for i in range(10, 13)]
        return results + await settle(second)

    assert run(main) == [10 * i for i in range(13)]
    assert handler.batches == [list(range(10)), [10, 11, 12]]


def test_zero_wait_does_not_hold_items_across_ticks():
    handler = Handler()

    async def main():
        queue = BatchQueue(handler, max_size=100, wait_s=0)
        futures = [queue.submit(1)]
        await asyncio.sleep(0)  # the flush scheduled by the first submit runs first
        futures.append(queue.submit(2))
        return await settle(futures)

    assert run(main) == [10, 20]
    assert handler.batches == [[1], [2]]


def test_positive_wait_holds_the_batch_open_until_the_timer():
    handler = Handler()
    wait_s = 0.2

    async def main():
        loop = asyncio.get_running_loop()
        queue = BatchQueue(handler, max_size=100, wait_s=wait_s)
        start = loop.time()
        futures = [queue.submit(1)]
        for _ in range(5):
            await asyncio.sleep(0)
        checked_early = loop.time() < start + wait_s  # false only on a stalled machine
        if checked_early:
            assert handler.batches == []
            assert not futures[0].done()
        futures.append(queue.submit(2))  # a later tick, still before the timer
        results = await settle(futures)
        return results, checked_early, loop.time() - start

    results, checked_early, elapsed = run(main)
    assert elapsed >= wait_s - 1e-3  # the timer, not an earlier flush, sent the batch
    if checked_early:
        assert results == [10, 20]
        assert handler.batches == [[1, 2]]
    else:
        assert sorted(x for b in handler.batches for x in b) == [1, 2]


@pytest.mark.parametrize("wait_s", [0, 0.01])
def test_batches_never_exceed_max_size(wait_s):
    handler = Handler()

    async def main():
        queue = BatchQueue(handler, max_size=4, wait_s=wait_s)
        return await settle([queue.submit(i) for i in range(10)])

    assert run(main) == [10 * i for i in range(10)]
    assert handler.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_max_size_one_sends_every_item_alone():
    handler = Handler()

    async def main():
        queue = BatchQueue(handler, max_size=1, wait_s=60)
        return await settle([queue.submit(i) for i in range(5)])

    assert run(main) == [0, 10, 20, 30, 40]
    assert handler.batches == [[i] for i in range(5)]


def test_results_reach_the_right_futures_when_batches_finish_out_of_order():
    release = {}
    order = []

    async def handler(items):
        order.append(items[0])
        await release[items[0]].wait()
        return [f"r{x}" for x in items]

    async def main():
        for first in (0, 2, 4):
            release[first] = asyncio.Event()
        queue = BatchQueue(handler, max_size=2, wait_s=0)
        futures = [queue.submit(i) for i in range(6)]
        await asyncio.sleep(0)
        for first in (4, 0, 2):  # let the last batch finish first
            release[first].set()
            await asyncio.sleep(0)
        return await settle(futures)

    assert run(main) == [f"r{i}" for i in range(6)]
    assert sorted(order) == [0, 2, 4]


# -- failures ---------------------------------------------------------------------

def test_wrong_length_fails_only_its_batch():
    handler = Handler()

    async def main():
        queue = BatchQueue(handler, max_size=3, wait_s=0)
        futures = [queue.submit(x) for x in (1, 2, 3, "bad", 5, 6, 7)]
        return await settle(futures)

    results = run(main)
    assert results[:3] == [10, 20, 30]
    assert results[6] == 70
    for exc in results[3:6]:
        assert isinstance(exc, BatchLengthError)
        assert isinstance(exc, ValueError)
        assert "returned 2 results" in str(exc)
        assert "batch of 3" in str(exc)
    assert handler.batches == [[1, 2, 3], ["bad", 5, 6], [7]]


@pytest.mark.parametrize("returned, named", [
    (None, "NoneType"),
    ("abc", "str"),
    ({"a": 1, "b": 2}, "dict"),
    ([1, 2, 3], "3 results"),
    ((), "0 results"),
])
def test_non_list_or_wrong_length_result_is_a_batch_length_error(returned, named):
    async def handler(items):
        return returned

    async def main():
        queue = BatchQueue(handler, max_size=2, wait_s=0)
        return await settle([queue.submit(i) for i in range(2)])

    results = run(main)
    assert len(results) == 2
    for exc in results:
        assert isinstance(exc, BatchLengthError)
        assert named in str(exc) and "batch of 2" in str(exc)


def test_tuple_of_the_right_length_is_accepted():
    async def handler(items):
        return tuple(x + 1 for x in items)

    async def main():
        queue = BatchQueue(handler, max_size=3, wait_s=0)
        return await settle([queue.submit(i) for i in range(3)])

    assert run(main) == [1, 2, 3]


def test_handler_exception_fails_only_its_batch():
    handler = Handler()

    async def main():
        queue = BatchQueue(handler, max_size=2, wait_s=0)
        futures = [queue.submit(x) for x in (1, 2, "poison", 4, 5)]
        results = await settle(futures)
        later = await settle([queue.submit(6)])  # the queue keeps working
        return results + later

    results = run(main)
    assert results[:2] == [10, 20]
    assert results[2] is handler.error and results[3] is handler.error
    assert results[4:] == [50, 60]


def test_sync_exception_before_the_first_await_is_contained():
    async def handler(items):
        raise KeyError("no model")

    async def main():
        queue = BatchQueue(handler, max_size=5, wait_s=0)
        futures = [queue.submit(i) for i in range(3)]
        return await settle(futures)

    results = run(main)
    assert all(isinstance(r, KeyError) for r in results)


def test_caller_cancelling_one_future_leaves_the_rest_of_its_batch():
    handler = Handler()

    async def main():
        queue = BatchQueue(handler, max_size=10, wait_s=0)
        futures = [queue.submit(i) for i in range(3)]
        futures[1].cancel()
        await asyncio.sleep(0)  # that batch goes out; the next submits form another
        bad = [queue.submit(x) for x in ("bad", 1)]
        bad[0].cancel()
        return await settle(futures + bad)

    results = run(main)  # run() also checks that no "invalid state" error was logged
    assert handler.batches == [[0, 1, 2], ["bad", 1]]
    assert results[0] == 0 and results[2] == 20
    assert isinstance(results[1], asyncio.CancelledError)
    assert isinstance(results[3], asyncio.CancelledError)
    assert isinstance(results[4], BatchLengthError)


# -- accept_batch / accepts_batch -------------------------------------------------

def test_accept_batch_marks_the_function_and_returns_it():
    def handler(items):
        return items

    assert not accepts_batch(handler)
    assert accept_batch(handler) is handler
    assert accepts_batch(handler)
    assert handler([1, 2]) == [1, 2]  # still callable as before
    assert daskserve.accept_batch is accept_batch


def test_accepts_batch_on_methods_and_other_callables():
    class Model:
        @accept_batch
        def __call__(self, items):
            return items

        def single(self, item):
            return item

        @accept_batch
        async def other(self, items):
            return items

    model = Model()
    assert accepts_batch(model.__call__)
    assert accepts_batch(Model.__call__)
    assert accepts_batch(model.other)
    assert not accepts_batch(model.single)
    assert not accepts_batch(lambda items: items)
    assert not accepts_batch(print)
    assert not accepts_batch(model)
