"""Unit tests of daskserve.traffic: weight validation, shard points, weighted choice
and shadow draws. No cluster, no network.

Random draws use the global ``random`` module (as the router does), seeded per test
and restored afterwards, so every run sees the same numbers. Split counts are still
checked against exact binomial acceptance intervals (false-failure rate 1e-6 for a
truly random source), so a wrong split fails while a correct one would pass for
almost any seed.
"""
from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from conftest import binomial_interval
from daskserve import traffic
from daskserve.traffic import TrafficPolicy, shard_point, validate_traffic

KNOWN = {"a", "b", "c"}


def assert_split(counts: Counter, n: int, weights: dict[str, float]) -> None:
    assert sum(counts.values()) == n
    assert set(counts) <= set(weights), f"unexpected backends in {counts}"
    for backend, weight in weights.items():
        lo, hi = binomial_interval(n, weight)
        assert lo <= counts[backend] <= hi, (
            f"{backend}: {counts[backend]} of {n} draws, expected within [{lo}, {hi}] "
            f"for weight {weight}"
        )


@pytest.fixture(autouse=True)
def seeded_random():
    """Seed the global RNG the policy draws from; restore its state afterwards."""
    state = random.getstate()
    random.seed(20240601)
    yield
    random.setstate(state)


# -- validate_traffic -------------------------------------------------------------

def test_valid_weights_come_back_as_floats():
    clean = validate_traffic("ep", {"a": 1, "b": 0}, KNOWN)
    assert clean == {"a": 1.0, "b": 0.0}
    assert all(type(w) is float for w in clean.values())

    clean = validate_traffic("ep", {"a": 0.25, "b": 0.25, "c": 0.5}, KNOWN)
    assert clean == {"a": 0.25, "b": 0.25, "c": 0.5}


@pytest.mark.parametrize("weights", [{}, None, [("a", 1.0)], "a", 1.0])
def test_traffic_must_be_a_non_empty_mapping(weights):
    with pytest.raises(TypeError, match="non-empty dict"):
        validate_traffic("ep", weights, KNOWN)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="'nope'"):
        validate_traffic("ep", {"a": 0.5, "nope": 0.5}, KNOWN)
    with pytest.raises(ValueError, match="'a'"):
        validate_traffic("ep", {"a": 1.0}, set())


@pytest.mark.parametrize("weight", [True, False, "0.5", None, [0.5], 0.5j])
def test_non_number_or_bool_weight_is_a_type_error(weight):
    with pytest.raises(TypeError, match="'b'"):
        validate_traffic("ep", {"a": 1.0, "b": weight}, KNOWN)


@pytest.mark.parametrize("weight", [-0.5, -1e-12, -1, math.inf, -math.inf, math.nan])
def test_negative_or_non_finite_weight_is_a_value_error(weight):
    with pytest.raises(ValueError, match="'b'"):
        validate_traffic("ep", {"a": 1.0, "b": weight}, KNOWN)


@pytest.mark.parametrize("weights", [
    {"a": 0.5},
    {"a": 0.5, "b": 0.6},
    {"a": 0.0, "b": 0.0},
    {"a": 1.0, "b": 1e-5},
    {"a": 2, "b": 0},
])
def test_weights_must_sum_to_one(weights):
    with pytest.raises(ValueError, match="sum to 1"):
        validate_traffic("ep", weights, KNOWN)


@pytest.mark.parametrize("weights", [
    {"a": 0.1, "b": 0.2, "c": 0.7},
    {"a": 0.7, "b": 0.2, "c": 0.1},            # float sum 0.9999999999999999
    {"a": 0.5, "b": 0.5 + 5e-7},               # off by less than the tolerance
    {"a": 0.5, "b": 0.5 - 5e-7},
])
def test_sum_within_tolerance_is_accepted(weights):
    assert abs(sum(weights.values()) - 1) <= traffic.WEIGHT_TOLERANCE
    assert validate_traffic("ep", weights, KNOWN) == {k: float(v) for k, v in weights.items()}


# -- shard_point ------------------------------------------------------------------

def test_shard_point_is_deterministic_and_ignores_the_global_rng():
    keys = [f"user-{i}" for i in range(200)]
    first = [shard_point(k) for k in keys]
    random.seed(1)
    second = [shard_point(k) for k in keys]
    assert first == second
    # Different keys land on different points (a constant function would pass the above).
    assert len(set(first)) == len(keys)


def test_shard_point_is_in_unit_interval():
    points = [shard_point(f"key-{i}") for i in range(5000)] + [shard_point(""), shard_point(b"")]
    assert all(0.0 <= p < 1.0 for p in points)
    # Spread over the interval rather than stuck in one corner.
    below_half = sum(p < 0.5 for p in points[:5000])
    lo, hi = binomial_interval(5000, 0.5)
    assert lo <= below_half <= hi


@pytest.mark.parametrize("key", ["user-42", "", "ключ-🔑", "a\x00b"])
def test_shard_point_str_and_utf8_bytes_agree(key):
    assert shard_point(key) == shard_point(key.encode())


class _MaxDigest:
    """Stands in for hashlib in daskserve.traffic: every digest is all 0xff bytes."""

    @staticmethod
    def blake2b(data: bytes, digest_size: int):
        class Digest:
            def digest(self):
                return b"\xff" * digest_size
        return Digest()


def test_shard_point_stays_below_one_for_the_largest_digest(monkeypatch):
    monkeypatch.setattr(traffic, "hashlib", _MaxDigest)
    assert shard_point("any key") < 1.0


def test_choose_handles_the_largest_digest(monkeypatch):
    # Whatever shard_point returns at the top edge, choose must still pick a backend.
    policy = TrafficPolicy({"a": 0.5, "b": 0.5}, {})
    monkeypatch.setattr(traffic, "hashlib", _MaxDigest)
    assert policy.choose("any key") == "b"


# -- TrafficPolicy.choose ---------------------------------------------------------

def test_no_backends_means_no_choice():
    for policy in (TrafficPolicy({}, {}), TrafficPolicy({"a": 0.0, "b": 0.0}, {})):
        assert policy.backends == []
        assert policy.choose() is None
        assert policy.choose("user-1") is None
        assert policy.choose(b"user-1") is None


def test_zero_weight_backends_are_never_chosen():
    policy = TrafficPolicy({"a": 0.0, "b": 0.5, "c": 0.5}, {})
    random_picks = Counter(policy.choose() for _ in range(4000))
    keyed_picks = Counter(policy.choose(f"user-{i}") for i in range(4000))
    for picks in (random_picks, keyed_picks):
        assert "a" not in picks
        assert set(picks) == {"b", "c"}

    only = TrafficPolicy({"a": 0.0, "b": 1.0, "c": 0.0}, {})
    assert {only.choose() for _ in range(1000)} == {"b"}
    assert {only.choose(f"user-{i}") for i in range(1000)} == {"b"}


def test_same_shard_key_same_backend():
    policy = TrafficPolicy({"a": 0.3, "b": 0.3, "c": 0.4}, {})
    keys = [f"session-{i}" for i in range(300)]
    first = [policy.choose(k) for k in keys]
    random.seed(7)  # keyed choice must not depend on the global RNG
    assert [policy.choose(k) for k in keys] == first
    assert [policy.choose(k.encode()) for k in keys] == first
    # The same weights given in another order form the same policy.
    reordered = TrafficPolicy({"c": 0.4, "b": 0.3, "a": 0.3}, {})
    assert [reordered.choose(k) for k in keys] == first
    # And the keys do spread over all backends (a constant answer would pass the above).
    assert set(first) == {"a", "b", "c"}


@pytest.mark.parametrize("weights", [
    {"a": 0.2, "b": 0.3, "c": 0.5},
    {"a": 0.9, "b": 0.1},
    {"a": 0.01, "b": 0.99},
])
def test_random_choice_respects_weights(weights):
    policy = TrafficPolicy(weights, {})
    n = 20000
    assert_split(Counter(policy.choose() for _ in range(n)), n, weights)


def test_keyed_choice_respects_weights():
    weights = {"a": 0.25, "b": 0.75}
    policy = TrafficPolicy(weights, {})
    n = 20000
    assert_split(Counter(policy.choose(f"user-{i}") for i in range(n)), n, weights)


def test_unnormalised_weights_are_normalised():
    # Routers receive validated weights, but the policy itself normalises.
    policy = TrafficPolicy({"a": 1.0, "b": 3.0}, {})
    n = 20000
    assert_split(Counter(policy.choose() for _ in range(n)), n, {"a": 0.25, "b": 0.75})


# -- shadow_targets ---------------------------------------------------------------

def test_shadow_probability_zero_never_one_always():
    policy = TrafficPolicy({"a": 1.0}, {"never": 0.0, "always": 1.0})
    draws = [policy.shadow_targets() for _ in range(5000)]
    assert all(d == ["always"] for d in draws)


def test_no_shadows_no_targets():
    assert TrafficPolicy({"a": 1.0}, {}).shadow_targets() == []


def test_shadow_draws_are_independent_per_target():
    policy = TrafficPolicy({"a": 1.0}, {"s1": 0.3, "s2": 0.6})
    n = 20000
    draws = [policy.shadow_targets() for _ in range(n)]
    counts = Counter(target for d in draws for target in d)
    for target, p in (("s1", 0.3), ("s2", 0.6)):
        lo, hi = binomial_interval(n, p)
        assert lo <= counts[target] <= hi, (target, counts[target], lo, hi)
    both = sum(d == ["s1", "s2"] for d in draws)
    lo, hi = binomial_interval(n, 0.3 * 0.6)
    assert lo <= both <= hi
