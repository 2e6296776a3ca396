"""Traffic policies: which backend serves a request, and which backends shadow it.

A policy is immutable. Routers swap whole policies when the controller pushes a
new table, so a request always sees one consistent set of weights.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import random
from typing import Mapping

WEIGHT_TOLERANCE = 1e-6


def validate_traffic(endpoint: str, weights: Mapping[str, float],
                     known_backends: set[str]) -> dict[str, float]:
    """Check weights are non-negative, sum to 1 and name existing backends."""
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError(
            f"traffic for endpoint {endpoint!r} must be a non-empty dict "
            f"{{backend: weight}}, got {weights!r}"
        )
    clean: dict[str, float] = {}
    for backend, weight in weights.items():
        if backend not in known_backends:
            raise ValueError(f"backend {backend!r} does not exist")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"traffic weight for {backend!r} must be a number, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"traffic weight for {backend!r} must be >= 0, got {weight!r}")
        clean[backend] = float(weight)
    total = sum(clean.values())
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise ValueError(
            f"traffic weights for endpoint {endpoint!r} must sum to 1, got {total!r}"
        )
    return clean


def shard_point(shard_key: str | bytes) -> float:
    """Map a shard key to a point in [0, 1), identically in every process."""
    if isinstance(shard_key, str):
        shard_key = shard_key.encode()
    digest = hashlib.blake2b(shard_key, digest_size=8).digest()
    # 53 bits: exactly what a float holds, so the largest digest stays below 1.0.
    return (int.from_bytes(digest, "big") >> 11) / 2**53


class TrafficPolicy:
    """Weighted choice among an endpoint's backends plus independent shadow draws."""

    __slots__ = ("backends", "_cumulative", "shadows")

    def __init__(self, traffic: Mapping[str, float], shadows: Mapping[str, float]):
        items = sorted((b, w) for b, w in traffic.items() if w > 0)
        self.backends = [b for b, _ in items]
        total, cumulative = 0.0, []
        for _, w in items:
            total += w
            cumulative.append(total)
        self._cumulative = [c / total for c in cumulative] if total else []
        self.shadows = tuple(sorted(shadows.items()))

    def choose(self, shard_key: str | bytes | None = None) -> str | None:
        if not self.backends:
            return None
        point = random.random() if shard_key is None else shard_point(shard_key)
        index = bisect.bisect_right(self._cumulative, point)
        return self.backends[min(index, len(self.backends) - 1)]

    def shadow_targets(self) -> list[str]:
        return [b for b, p in self.shadows if random.random() < p]
