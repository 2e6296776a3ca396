"""Unit tests of scheduler_plugin.placement: the resource ledger the controller books
replicas against (capacities, spreading, CPU / custom / GPU bookings). No cluster.
"""
from __future__ import annotations

import math

import pytest

from scheduler_plugin.placement import ResourceLedger, WorkerCapacity


def ledger_with(*workers: tuple) -> ResourceLedger:
    """A ledger with workers given as (address, nthreads, declared, gpus_found)."""
    ledger = ResourceLedger()
    for address, nthreads, declared, gpus in workers:
        ledger.add_worker(address, nthreads, declared, gpus)
    return ledger


def place(ledger: ResourceLedger, demand: dict) -> tuple[str, list[int]]:
    """choose + reserve, as the controller does; fails the test if nothing fits."""
    address = ledger.choose(demand)
    assert address is not None, f"{demand} should fit in {ledger.snapshot()}"
    return address, ledger.reserve(address, demand)


# -- capacities -------------------------------------------------------------------

def test_cpu_defaults_to_nthreads_and_gpu_to_gpus_found():
    ledger = ledger_with(("w1", 4, {}, 0), ("w2", 2, {}, 3))
    snap = ledger.snapshot()
    assert snap["w1"]["total"] == {"CPU": 4.0, "GPU": 0.0}
    assert snap["w2"]["total"] == {"CPU": 2.0, "GPU": 3.0}
    # The GPUs found are usable one by one.
    assert sorted(place(ledger, {"GPU": 1})[1][0] for _ in range(3)) == [0, 1, 2]
    assert ledger.choose({"GPU": 1}) is None


def test_declared_resources_win_over_defaults():
    ledger = ledger_with(("w1", 8, {"CPU": 3, "GPU": 1, "memory_gb": 16}, 4),
                         ("w2", 8, {"GPU": 0}, 2))
    snap = ledger.snapshot()
    assert snap["w1"]["total"] == {"CPU": 3, "GPU": 1, "memory_gb": 16}
    assert snap["w2"]["total"] == {"CPU": 8.0, "GPU": 0}
    # w1 has one GPU (not the four found); w2 declared none.
    assert place(ledger, {"GPU": 1}) == ("w1", [0])
    assert ledger.choose({"GPU": 1}) is None
    assert ledger.choose({"CPU": 4}) == "w2"
    assert ledger.choose({"CPU": 3, "memory_gb": 16}) == "w1"


def test_add_worker_does_not_alias_the_declared_dict():
    declared = {"CPU": 2}
    ledger = ledger_with(("w1", 4, declared, 0))
    assert declared == {"CPU": 2}
    declared["CPU"] = 100
    assert ledger.choose({"CPU": 3}) is None


def test_reregistration_keeps_bookings():
    ledger = ledger_with(("w1", 4, {}, 1))
    _, slots = place(ledger, {"CPU": 3, "GPU": 1})
    assert slots == [0]
    ledger.add_worker("w1", 4, {}, 1)  # e.g. the worker reconnected
    assert ledger.snapshot()["w1"]["used"] == {"CPU": 3, "GPU": 1}
    assert ledger.choose({"CPU": 2}) is None
    assert ledger.choose({"GPU": 1}) is None
    # Releasing the booking made before re-registration frees it.
    ledger.release("w1", {"CPU": 3, "GPU": 1}, slots)
    assert ledger.choose({"CPU": 4, "GPU": 1}) == "w1"


def test_removed_worker_is_forgotten():
    ledger = ledger_with(("w1", 4, {}, 0), ("w2", 4, {}, 0))
    address, slots = place(ledger, {"CPU": 1})
    ledger.remove_worker(address)
    assert address not in ledger.snapshot()
    other = ({"w1", "w2"} - {address}).pop()
    assert {ledger.choose({"CPU": 1}) for _ in range(3)} == {other}
    ledger.release(address, {"CPU": 1}, slots)  # late release: no error, no resurrection
    ledger.remove_worker(address)  # removing twice is harmless
    assert set(ledger.snapshot()) == {other}


# -- choose -----------------------------------------------------------------------

def test_choose_spreads_replicas_over_workers():
    ledger = ledger_with(("w1", 4, {}, 0), ("w2", 4, {}, 0), ("w3", 4, {}, 0))
    chosen = [place(ledger, {"CPU": 1})[0] for _ in range(9)]
    for i in range(0, 9, 3):  # every round of three placements visits each worker
        assert sorted(chosen[i:i + 3]) == ["w1", "w2", "w3"]


def test_fewest_replicas_wins_over_most_free_cpu():
    ledger = ledger_with(("big", 16, {}, 0), ("small", 1, {}, 0))
    first, _ = place(ledger, {"CPU": 1})
    assert first == "big"  # tie on replicas: more free CPU
    second, _ = place(ledger, {"CPU": 1})
    assert second == "small"  # fewer replicas, although big has far more CPU free
    # small is now full; the next ones go to big although it holds more replicas.
    assert [place(ledger, {"CPU": 1})[0] for _ in range(3)] == ["big", "big", "big"]


def test_choose_skips_workers_that_do_not_fit():
    ledger = ledger_with(("w1", 2, {}, 0), ("w2", 8, {"special": 1}, 1))
    assert ledger.choose({"special": 1}) == "w2"
    assert ledger.choose({"GPU": 0.5}) == "w2"
    assert ledger.choose({"CPU": 8}) == "w2"
    ledger.reserve("w2", {"special": 1})
    assert ledger.choose({"special": 1}) is None
    # w2 now holds a replica and w1 none, yet only w2 can take a GPU demand.
    assert ledger.choose({"GPU": 0.5}) == "w2"
    assert ledger.choose({"CPU": 1}) == "w1"


@pytest.mark.parametrize("pack", [False, True])
def test_a_proxy_worker_gets_replicas_only_when_its_host_has_no_other_room(pack):
    a1, a2, b1 = "tcp://10.0.0.1:4001", "tcp://10.0.0.1:4002", "tcp://10.0.0.2:4001"
    ledger = ledger_with((a1, 2, {}, 0), (a2, 4, {}, 0), (b1, 2, {}, 0))
    ledger.pack = pack
    ledger.proxy_hosts.update({"10.0.0.1": a1, "10.0.0.2": b1})
    # b1 is alone on its host: it takes replicas although it runs that host's proxy.
    chosen = [place(ledger, {"CPU": 1})[0] for _ in range(6)]
    assert sorted(chosen) == sorted([a2] * 4 + [b1] * 2)
    assert place(ledger, {"CPU": 1})[0] == a1  # a2 is full: a1 is all that is left
    ledger.release(a2, {"CPU": 1}, [])
    assert ledger.choose({"CPU": 1}) == a2  # although a1 holds fewer replicas
    ledger.proxy_hosts["10.0.0.1"] = a2  # the proxy moved: a1 is an ordinary worker
    assert ledger.choose({"CPU": 1}) == a1


@pytest.mark.parametrize("demand", [
    {"CPU": 4.5},
    {"GPU": 1},
    {"GPU": 0.1},
    {"memory_gb": 1},
    {"CPU": 1, "memory_gb": 1},
])
def test_choose_returns_none_when_nothing_fits(demand):
    ledger = ledger_with(("w1", 4, {}, 0), ("w2", 2, {}, 0))
    assert ledger.choose(demand) is None
    assert ResourceLedger().choose({"CPU": 1}) is None


def test_choose_returns_none_once_capacity_is_booked():
    ledger = ledger_with(("w1", 2, {}, 0), ("w2", 2, {}, 0))
    for _ in range(4):
        place(ledger, {"CPU": 1})
    assert ledger.choose({"CPU": 1}) is None
    assert ledger.choose({"CPU": 0.01}) is None


# -- reserve / release ------------------------------------------------------------

def test_reserve_and_release_cpu_and_custom_resources():
    ledger = ledger_with(("w1", 4, {"memory_gb": 10}, 0))
    demand = {"CPU": 1.5, "memory_gb": 6}
    assert ledger.reserve("w1", demand) == []
    assert ledger.snapshot()["w1"]["used"] == demand
    assert ledger.choose(demand) is None  # only 4 GB left
    assert ledger.choose({"CPU": 2.5, "memory_gb": 4}) == "w1"
    ledger.release("w1", demand, [])
    assert ledger.snapshot()["w1"]["used"] == {"CPU": 0.0, "memory_gb": 0.0}
    assert ledger.choose({"CPU": 4, "memory_gb": 10}) == "w1"


def test_release_never_goes_above_capacity():
    ledger = ledger_with(("w1", 4, {"memory_gb": 10}, 2))
    demand = {"CPU": 2, "memory_gb": 5, "GPU": 0.5}
    slots = ledger.reserve("w1", demand)
    for _ in range(3):  # a duplicated release must not create capacity
        ledger.release("w1", demand, slots)
    worker = ledger.workers["w1"]
    assert worker.free("CPU") == 4
    assert worker.free("memory_gb") == 10
    assert worker.free("GPU") == 2
    assert worker.gpu_free == [1.0, 1.0]
    assert worker.replicas == 0
    assert ledger.choose({"CPU": 4.5}) is None
    assert ledger.choose({"GPU": 3}) is None


def test_fractional_gpus_pack_onto_the_fullest_gpu_that_fits():
    ledger = ledger_with(("w1", 16, {}, 2))
    assert place(ledger, {"GPU": 0.5})[1] == [0]
    assert place(ledger, {"GPU": 0.25})[1] == [0]   # joins the half-used GPU
    assert place(ledger, {"GPU": 0.5})[1] == [1]    # 0.25 left on GPU 0: too little
    assert place(ledger, {"GPU": 0.25})[1] == [0]   # GPU 0 (0.25 free) is fuller than GPU 1
    assert place(ledger, {"GPU": 0.5})[1] == [1]
    assert ledger.choose({"GPU": 0.01}) is None


def test_fractional_packing_prefers_the_fuller_gpu_not_the_first():
    ledger = ledger_with(("w1", 16, {}, 3))
    first = ledger.reserve("w1", {"GPU": 1})
    second = ledger.reserve("w1", {"GPU": 1})
    third = ledger.reserve("w1", {"GPU": 0.3})
    assert len(set(first + second + third)) == 3
    ledger.release("w1", {"GPU": 1}, first)  # now: one GPU idle, one with 0.7 free
    assert ledger.reserve("w1", {"GPU": 0.4}) == third
    assert ledger.reserve("w1", {"GPU": 0.4}) == first  # 0.3 left on the other: too little


def test_many_small_fractions_fill_one_gpu_exactly_and_free_it_again():
    ledger = ledger_with(("w1", 16, {}, 1))
    bookings = [place(ledger, {"GPU": 0.1}) for _ in range(10)]
    assert all(slots == [0] for _, slots in bookings)
    assert ledger.choose({"GPU": 0.1}) is None
    for address, slots in bookings:
        ledger.release(address, {"GPU": 0.1}, slots)
    # Float round-off must not leave the GPU looking "not quite free".
    assert place(ledger, {"GPU": 1}) == ("w1", [0])


def test_mixed_fractions_fill_and_free_one_gpu_despite_round_off():
    # In floats 1 - 0.1 - 0.2 - 0.3 < 0.4, and adding the shares back gives just below 1.
    ledger = ledger_with(("w1", 16, {}, 1))
    shares = [0.1, 0.2, 0.3, 0.4]
    bookings = [(share, place(ledger, {"GPU": share})[1]) for share in shares]
    assert all(slots == [0] for _, slots in bookings)
    assert ledger.choose({"GPU": 0.05}) is None
    for share, slots in bookings:
        ledger.release("w1", {"GPU": share}, slots)
    assert place(ledger, {"GPU": 1}) == ("w1", [0])


def test_whole_gpu_demands_take_whole_free_gpus():
    ledger = ledger_with(("w1", 16, {}, 4))
    _, half = place(ledger, {"GPU": 0.5})
    _, pair = place(ledger, {"GPU": 2})
    assert len(pair) == 2 and not set(pair) & set(half)
    _, single = place(ledger, {"GPU": 1})
    assert len(single) == 1 and not set(single) & set(half + pair)
    # 0.5 GPU is free in aggregate, but no whole GPU is.
    assert ledger.choose({"GPU": 1}) is None
    assert place(ledger, {"GPU": 0.5})[1] == half
    # Freeing the pair makes two whole GPUs available again, the same ones.
    ledger.release("w1", {"GPU": 2}, pair)
    assert sorted(place(ledger, {"GPU": 2})[1]) == sorted(pair)


def test_whole_gpu_needs_a_whole_free_gpu_not_an_aggregate():
    ledger = ledger_with(("w1", 16, {}, 3))
    slots = [place(ledger, {"GPU": 0.6})[1] for _ in range(3)]
    assert sorted(s[0] for s in slots) == [0, 1, 2]  # 0.4 left on each GPU
    assert ledger.workers["w1"].free("GPU") == pytest.approx(1.2)
    assert ledger.choose({"GPU": 1}) is None
    assert ledger.choose({"GPU": 0.4}) == "w1"


def test_released_fraction_returns_the_gpu_for_whole_demands():
    ledger = ledger_with(("w1", 16, {}, 1))
    _, slots = place(ledger, {"GPU": 0.3})
    assert ledger.choose({"GPU": 1}) is None
    ledger.release("w1", {"GPU": 0.3}, slots)
    assert place(ledger, {"GPU": 1}) == ("w1", [0])


@pytest.mark.parametrize("amount", [1.2, 2.3, 2.5])
def test_non_integer_multi_gpu_demand_gets_at_least_what_it_asked(amount):
    ledger = ledger_with(("w1", 16, {}, 4))
    address = ledger.choose({"GPU": amount})
    if address is None:
        return  # rejecting such a demand outright would also be correct
    slots = ledger.reserve(address, {"GPU": amount})
    assert len(slots) >= math.ceil(amount)


# -- snapshot and WorkerCapacity ---------------------------------------------------

def test_snapshot_shape():
    ledger = ledger_with(("w1", 2, {}, 1), ("w2", 4, {"memory_gb": 8}, 0))
    snap = ledger.snapshot()
    assert set(snap) == {"w1", "w2"}
    for entry in snap.values():
        assert set(entry) == {"total", "used"}
    assert snap["w1"] == {"total": {"CPU": 2.0, "GPU": 1.0}, "used": {}}
    assert snap["w2"] == {"total": {"CPU": 4.0, "GPU": 0.0, "memory_gb": 8}, "used": {}}
    ledger.reserve("w2", {"CPU": 1, "memory_gb": 2})
    assert ledger.snapshot()["w2"]["used"] == {"CPU": 1, "memory_gb": 2}
    assert ResourceLedger().snapshot() == {}


def test_worker_capacity_free_and_fits():
    worker = WorkerCapacity("w", {"CPU": 2.0, "GPU": 2.0, "disk": 1.0})
    assert worker.gpu_free == [1.0, 1.0]
    assert worker.free("CPU") == 2.0
    assert worker.free("unknown") == 0.0
    assert worker.fits({"CPU": 2, "GPU": 2, "disk": 1})
    assert worker.fits({})
    assert not worker.fits({"CPU": 2.5})
    assert not worker.fits({"unknown": 0.1})
    assert not worker.fits({"GPU": 3})
