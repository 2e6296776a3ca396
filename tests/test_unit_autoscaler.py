"""Autoscaling rules that need no cluster: config validation, the hysteresis of the
scaling policy (driven with explicit times), and how router reports are counted."""
from __future__ import annotations

import pytest

from daskserve.config import AutoscalingConfig, BackendConfig
from scheduler_plugin.autoscaler import LoadBook, ScalingPolicy
from scheduler_plugin.state import DesiredState

AUTO = {"min_replicas": 1, "max_replicas": 4, "target_num_ongoing_requests_per_replica": 2,
        "upscale_delay_s": 1.0, "downscale_delay_s": 5.0}


# -- config ---------------------------------------------------------------------------
@pytest.mark.parametrize("fields, error, words", [
    ({"min_replicas": 3, "max_replicas": 2}, ValueError,
     ["min_replicas (3)", "max_replicas (2)"]),
    ({"min_replicas": -1}, ValueError, ["min_replicas", ">= 0"]),
    ({"max_replicas": 0}, ValueError, ["max_replicas", ">= 1"]),
    ({"target_num_ongoing_requests_per_replica": 0}, ValueError,
     ["target_num_ongoing_requests_per_replica", "> 0"]),
    ({"upscale_delay_s": -0.5}, ValueError, ["upscale_delay_s"]),
    ({"downscale_delay_s": float("inf")}, ValueError, ["downscale_delay_s", "finite"]),
    ({"min_replicas": 1.5}, TypeError, ["min_replicas", "integer"]),
    ({"max_replicas": True}, TypeError, ["max_replicas"]),
    ({"max_replica": 3}, ValueError, ["unknown autoscaling_config field", "max_replica"]),
])
def test_bad_autoscaling_config_names_the_field(fields, error, words):
    for attempt in (lambda: BackendConfig(autoscaling_config=fields),
                    lambda: BackendConfig.coerce({"autoscaling_config": fields}),
                    lambda: BackendConfig.changes_to_wire({"autoscaling_config": fields})):
        with pytest.raises(error) as info:
            attempt()
        assert all(word in str(info.value) for word in words), str(info.value)
    with pytest.raises(TypeError, match="autoscaling_config must be a dict"):
        BackendConfig(autoscaling_config=[1, 4])


def test_num_replicas_and_autoscaling_both_by_hand_is_refused():
    for attempt in (
            lambda: BackendConfig(num_replicas=2, autoscaling_config=AUTO),
            lambda: BackendConfig(num_replicas=1, autoscaling_config=AUTO),  # even the default
            lambda: BackendConfig.coerce({"num_replicas": 2, "autoscaling_config": AUTO}),
            lambda: BackendConfig.changes_to_wire({"num_replicas": 2,
                                                   "autoscaling_config": AUTO})):
        with pytest.raises(ValueError, match="num_replicas and autoscaling_config"):
            attempt()
    # Turning autoscaling off while setting a count is fine.
    assert BackendConfig.changes_to_wire({"num_replicas": 2, "autoscaling_config": None})


def test_autoscaling_backend_starts_at_min_replicas_and_round_trips():
    config = BackendConfig(autoscaling_config={**AUTO, "min_replicas": 0})
    assert config.num_replicas == 0
    assert config.autoscaling_config == {**AUTO, "min_replicas": 0}
    defaults = BackendConfig(autoscaling_config={}).autoscaling_config
    assert defaults == {f: getattr(AutoscalingConfig(), f) for f in defaults}
    # What the controller hands back (its own count) can be edited and sent back whole,
    # but a count written into it by hand cannot.
    wire = {**BackendConfig(autoscaling_config=AUTO).to_wire(), "num_replicas": 3}
    fetched = BackendConfig.from_wire(wire)
    assert fetched.num_replicas == 3
    fetched.max_concurrent_queries = 7
    assert fetched.to_wire()["num_replicas"] == 3
    fetched.num_replicas = 2
    with pytest.raises(ValueError, match="num_replicas and autoscaling_config"):
        fetched.to_wire()


def test_desired_state_keeps_the_count_in_bounds():
    state = DesiredState()
    state.add_backend("b", b"code", BackendConfig(autoscaling_config=AUTO).to_wire(), {})
    with pytest.raises(ValueError, match="num_replicas and autoscaling_config"):
        state.update_backend_config("b", {"num_replicas": 2})
    assert state.set_num_replicas("b", 3) == 1
    with pytest.raises(ValueError, match="outside"):
        state.set_num_replicas("b", 5)
    # Narrower bounds move the count into them.
    state.update_backend_config("b", {"autoscaling_config": {**AUTO, "max_replicas": 2}})
    assert state.backend("b").num_replicas == 2
    # Without autoscaling, the count is the user's again, and the autoscaler's is refused.
    state.update_backend_config("b", {"autoscaling_config": None, "num_replicas": 4})
    assert state.backend("b").num_replicas == 4
    with pytest.raises(ValueError, match="does not autoscale"):
        state.set_num_replicas("b", 1)


# -- policy -----------------------------------------------------------------------------
def run(policy, auto, current, samples):
    """Feed (time, load) samples; apply each decision; return the counts decided."""
    decided = []
    for now, load in samples:
        decision = policy.decide("b", now, current, load, auto)
        if decision is not None:
            current = decision[0]
            decided.append(current)
    return decided


def test_a_burst_shorter_than_the_upscale_delay_changes_nothing():
    auto = AutoscalingConfig(**AUTO)
    samples = [(0.0, 8), (0.5, 8), (0.9, 0), (1.5, 8), (2.0, 0)]
    assert run(ScalingPolicy(), auto, 1, samples) == []


def test_sustained_load_scales_up_as_far_as_every_wish_agrees():
    auto = AutoscalingConfig(**AUTO)
    # Wishes 4, 2, 3 over one second: all agree on at least 2.
    assert run(ScalingPolicy(), auto, 1, [(0.0, 8), (0.5, 3), (1.0, 6)]) == [2]
    # Load beyond max_replicas * target stops at max_replicas.
    assert run(ScalingPolicy(), auto, 1, [(0.0, 100), (1.0, 100)]) == [4]


def test_scale_down_waits_for_the_downscale_delay_and_keeps_the_largest_wish():
    auto = AutoscalingConfig(**AUTO)
    quiet = [(t, 0) for t in (0.0, 1.0, 2.0, 3.0, 4.0)]
    assert run(ScalingPolicy(), auto, 4, quiet) == []
    assert run(ScalingPolicy(), auto, 4, [(0.0, 0), (2.0, 3), (5.0, 0)]) == [2]
    # Load coming back during the delay starts the wait over.
    samples = [(0.0, 0), (4.0, 8), (6.0, 0), (10.0, 0), (11.0, 0)]
    assert run(ScalingPolicy(), auto, 4, samples) == [1]


def test_policy_explains_its_decision():
    auto = AutoscalingConfig(**AUTO)
    policy = ScalingPolicy()
    assert policy.decide("b", 0.0, 1, 100, auto) is None
    count, reason = policy.decide("b", 1.0, 1, 100, auto)
    assert count == 4
    assert "upscale_delay_s 1" in reason and "max_replicas 4" in reason


# -- load reports -------------------------------------------------------------------------
def test_load_book_sums_routers_and_forgets_silent_ones():
    book = LoadBook(ttl=3.0)
    book.record("proxy", {"a": 4, "b": 1}, now=0.0)
    book.record("handle", {"a": 2}, now=1.0)
    assert book.totals(now=2.0) == {"a": 6.0, "b": 1.0}
    book.record("proxy", {}, now=2.5)            # its load went to zero
    assert book.totals(now=3.0) == {"a": 2.0}
    assert book.totals(now=4.5) == {}              # the handle's router went silent
    # Whatever a misbehaving process sends is ignored, not counted or raised.
    book.record("odd", {"a": "many", "b": -3, "c": float("nan"), 5: 1}, now=5.0)
    book.record(None, {"a": 1}, now=5.0)
    book.record("odd2", ["a", 1], now=5.0)
    assert book.totals(now=5.0) == {}


# -- adaptive clusters: how many workers replicas need, and which host can be emptied ---
def bridge_with(workers: dict[str, float], replicas: list[tuple[str | None, dict]]):
    """A bridge over a ledger of ``{address: CPUs}`` and replicas (worker or None for
    pending, demand), booked as the controller books them."""
    from scheduler_plugin.adaptive import AdaptiveBridge
    from scheduler_plugin.placement import ResourceLedger
    from scheduler_plugin.state import ObservedState, ReplicaState

    ledger = ResourceLedger()
    for address, cpus in workers.items():
        ledger.add_worker(address, int(cpus), {}, 0)
    observed = ObservedState()
    for i, (worker, demand) in enumerate(replicas):
        replica = ReplicaState(f"b#{i}", "b", demand)
        if worker is not None:
            replica.status, replica.worker = "running", worker
            ledger.reserve(worker, demand)
        observed.of("b").replicas[replica.tag] = replica
    return AdaptiveBridge(None, ledger, DesiredState(), observed, None)


def test_pending_replicas_ask_for_workers_shaped_like_the_ones_seen():
    one = {"CPU": 1.0}
    # Two hosts; three pending one-CPU replicas fill two more two-CPU workers.
    bridge = bridge_with({"w1": 2, "w2": 2, "w3": 2},
                         [("w1", one), ("w2", one), (None, one), (None, one), (None, one)])
    assert bridge.workers_needed() == 4
    # A replica no worker shape could ever host asks for nothing.
    bridge = bridge_with({"w1": 2}, [("w1", one), (None, {"CPU": 1.0, "GPU": 1.0})])
    assert bridge.workers_needed() == 1
    # With no worker seen yet, one is asked for; its shape tells the rest.
    assert bridge_with({}, [(None, one), (None, one)]).workers_needed() == 1
    # Idle workers are Dask's to count, not the replicas'.
    assert bridge_with({"w1": 2, "w2": 2}, [("w1", one)]).workers_needed() == 1


def test_a_host_is_emptied_only_when_its_replicas_fit_on_the_others():
    one = {"CPU": 1.0}
    bridge = bridge_with({"w1": 2, "w2": 2}, [("w1", one), ("w2", one)])
    assert bridge.compaction_candidate() in ("w1", "w2")
    full = bridge_with({"w1": 2, "w2": 2}, [("w1", one), ("w1", one), ("w2", one)])
    assert full.compaction_candidate() is None  # w1 is full; w2 cannot take two
    assert bridge_with({"w1": 1, "w2": 1}, [("w1", one), ("w2", one)]) \
        .compaction_candidate() is None
    assert bridge_with({"w1": 2, "w2": 2}, [("w1", one)]).compaction_candidate() is None


def test_an_autoscaled_count_survives_a_checkpoint():
    state = DesiredState()
    state.add_backend("b", b"code", BackendConfig(autoscaling_config=AUTO).to_wire(), {})
    state.set_num_replicas("b", 3)
    restored = DesiredState.from_dict(state.to_dict())
    assert restored.backend("b").num_replicas == 3
    assert restored.backend("b").autoscaling == AutoscalingConfig(**AUTO)
    with pytest.raises(ValueError, match="unknown autoscaling_config field"):
        state.update_backend_config("b", {"autoscaling_config": {"most": 3}})
