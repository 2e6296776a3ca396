"""Metrics that backends define: ``serve.metrics.Counter``, ``Gauge`` and ``Histogram``.

A backend's ``__init__`` typically creates its metrics, so every replica of it (and
every replica of another backend sharing the worker process) creates the same ones
again. A name therefore means one metric per process: constructing it again with
the same kind and tag keys returns a handle on the same series, and only a
different definition is an error. Values are tagged with the ``backend`` and
``replica`` of the replica that records them (read from the replica context at
each call, so one metric object shared between replicas still tags correctly), and
exported beside the built-in metrics through the same registry.
"""
from __future__ import annotations

import re
import threading
from typing import Any, Iterable, Mapping, Sequence

from prometheus_client import Counter as _PromCounter
from prometheus_client import Gauge as _PromGauge
from prometheus_client import Histogram as _PromHistogram

from .context import current_replica

AUTO_TAGS = ("backend", "replica")
# Families other collectors already serve on the scheduler's /metrics, and ours.
RESERVED_PREFIXES = ("dask_", "process_", "python_")
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_TAG = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
DEFAULT_BOUNDARIES = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class _Family:
    """One user metric in this process: its definition, its prometheus metric and
    the children made so far (by full label tuple)."""

    def __init__(self, kind: str, name: str, description: str, tag_keys: tuple[str, ...],
                 prom: Any, boundaries: tuple | None):
        self.kind, self.name, self.description = kind, name, description
        self.tag_keys, self.prom, self.boundaries = tag_keys, prom, boundaries
        self.children: dict[tuple, Any] = {}

    def definition(self) -> str:
        extra = f", boundaries={list(self.boundaries)}" if self.boundaries else ""
        return f"{self.kind}({self.name!r}, tag_keys={self.tag_keys}{extra})"


_families: dict[str, _Family] = {}
_lock = threading.Lock()  # metrics are often created in replica constructors, in threads


def _family(kind: str, name: Any, description: Any, tag_keys: Any,
            boundaries: Sequence[float] | None = None) -> _Family:
    from . import metrics

    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"metric name must match {_NAME.pattern} (letters, digits, '_' "
                         f"and ':', not starting with a digit), got {name!r}")
    if not isinstance(description, str):
        raise TypeError(f"metric {name!r}: description must be a string, got "
                        f"{type(description).__name__}")
    if isinstance(tag_keys, str):
        raise TypeError(f"metric {name!r}: tag_keys must be a tuple of strings, got the "
                        f"string {tag_keys!r} (write ({tag_keys!r},))")
    tag_keys = tuple(tag_keys or ())
    for key in tag_keys:
        if not isinstance(key, str) or not _TAG.match(key) or key.startswith("__"):
            raise ValueError(f"metric {name!r}: tag key {key!r} is not a valid label name")
        if key in AUTO_TAGS:
            raise ValueError(f"metric {name!r}: tag key {key!r} is added automatically "
                             f"(the replica's {key}); leave it out of tag_keys")
    if len(set(tag_keys)) != len(tag_keys):
        raise ValueError(f"metric {name!r}: tag_keys {tag_keys} repeat a key")
    if boundaries is not None:
        boundaries = tuple(float(b) for b in boundaries)
        if not boundaries or list(boundaries) != sorted(set(boundaries)):
            raise ValueError(f"metric {name!r}: boundaries must be a non-empty, strictly "
                             f"increasing sequence of numbers, got {list(boundaries)}")
    base = name[:-len("_total")] if kind == "Counter" and name.endswith("_total") else name
    if base in metrics.BUILTIN_NAMES or name in metrics.BUILTIN_NAMES:
        raise ValueError(f"metric name {name!r} is a built-in daskserve metric; "
                         f"choose another name")
    if name.startswith(RESERVED_PREFIXES):
        raise ValueError(f"metric name {name!r} starts with one of {RESERVED_PREFIXES}, "
                         f"which Dask and prometheus-client use on the same /metrics page; "
                         f"choose another name")
    with _lock:
        family = _families.get(base)
        if family is not None:
            wanted = _Family(kind, name, description, tag_keys, None, boundaries)
            if (family.kind, family.tag_keys, family.boundaries) != \
                    (kind, tag_keys, boundaries):
                raise ValueError(
                    f"metric {name!r} is already defined in this process as "
                    f"{family.definition()}; it cannot also be {wanted.definition()} "
                    f"(a metric name means one metric: use another name)")
            return family
        labels = (*AUTO_TAGS, *tag_keys)
        try:
            if kind == "Counter":
                prom = _PromCounter(name, description or name, labels,
                                    registry=metrics.REGISTRY)
            elif kind == "Gauge":
                prom = _PromGauge(name, description or name, labels,
                                  registry=metrics.REGISTRY)
            else:
                prom = _PromHistogram(name, description or name, labels,
                                      buckets=boundaries or DEFAULT_BOUNDARIES,
                                      registry=metrics.REGISTRY)
        except ValueError as exc:  # a clash with the samples of another metric
            raise ValueError(f"metric name {name!r} clashes with a metric already "
                             f"registered in this process: {exc}") from None
        family = _families[base] = _Family(kind, name, description, tag_keys, prom,
                                           boundaries)
        return family


class _Metric:
    """Shared behaviour: tag handling and cached children."""

    _kind = ""

    def __init__(self, name: str, description: str = "",
                 tag_keys: Sequence[str] | None = None, **kwargs: Any):
        self._family = _family(self._kind, name, description, tag_keys, **kwargs)
        self._default_tags: dict[str, str] = {}

    @property
    def name(self) -> str:
        return self._family.name

    @property
    def tag_keys(self) -> tuple[str, ...]:
        return self._family.tag_keys

    def set_default_tags(self, default_tags: Mapping[str, str]) -> None:
        """Tag values used when a call does not give them (this object only)."""
        self._check_keys(default_tags)
        self._default_tags = dict(default_tags)

    def _check_keys(self, tags: Mapping[str, Any]) -> None:
        if not isinstance(tags, Mapping):
            raise TypeError(f"metric {self.name!r}: tags must be a dict, got "
                            f"{type(tags).__name__}")
        for key, value in tags.items():
            if key not in self._family.tag_keys:
                hint = (" (added automatically)" if key in AUTO_TAGS else "")
                raise ValueError(f"metric {self.name!r}: tag key {key!r} was not declared"
                                 f"{hint}; declared tag_keys: {self._family.tag_keys}")
            if not isinstance(value, str):
                raise TypeError(f"metric {self.name!r}: tag {key!r} must be a string, "
                                f"got {type(value).__name__} {value!r}")

    def _child(self, tags: Mapping[str, str] | None) -> Any:
        replica = current_replica()
        auto = (replica.backend_tag, replica.replica_tag) if replica else ("", "")
        family = self._family
        if tags:
            self._check_keys(tags)
            merged = {**self._default_tags, **tags}
        else:
            merged = self._default_tags
        try:
            key = (*auto, *(merged[k] for k in family.tag_keys))
        except KeyError:
            missing = [k for k in family.tag_keys if k not in merged]
            raise ValueError(f"metric {self.name!r}: no value for tag(s) {missing}; give "
                             f"them in tags= or with set_default_tags") from None
        child = family.children.get(key)
        if child is None:
            child = family.children[key] = family.prom.labels(*key)
        return child


class Counter(_Metric):
    """A value that only goes up: ``inc(value=1, tags=None)``."""

    _kind = "Counter"

    def inc(self, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        if value < 0:
            raise ValueError(f"counter {self.name!r} can only go up; got inc({value!r})")
        self._child(tags).inc(value)


class Gauge(_Metric):
    """A value that is set: ``set(value, tags=None)``."""

    _kind = "Gauge"

    def set(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        self._child(tags).set(value)


class Histogram(_Metric):
    """A distribution: ``observe(value, tags=None)`` into ``boundaries`` buckets."""

    _kind = "Histogram"

    def __init__(self, name: str, description: str = "",
                 boundaries: Sequence[float] | None = None,
                 tag_keys: Sequence[str] | None = None):
        super().__init__(name, description, tag_keys,
                         boundaries=tuple(boundaries) if boundaries is not None
                         else DEFAULT_BOUNDARIES)

    def observe(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        self._child(tags).observe(value)


def forget_replica_series(replica: str) -> None:
    """Remove a removed replica's series from every user metric."""
    with _lock:
        families: Iterable[_Family] = list(_families.values())
    for family in families:
        for key in [k for k in family.children if k[1] == replica]:
            family.children.pop(key, None)
            try:
                family.prom.remove(*key)
            except KeyError:
                pass
