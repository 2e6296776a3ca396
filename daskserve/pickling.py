"""Pickling handle calls and their results, so that a failure costs one call only.

Calls leave a router as one pickle per message, the cheap and usual case; only when
that fails are they pickled one by one, to fail just the calls that cannot be sent
and to name the argument at fault. Results come back as pickles laid end to end in
one blob, one per result (``values[previous end:end]`` is one ``pickle.loads``), because a value that pickles on the replica may still not
unpickle in the caller (its class is missing there, or it is an exception whose
``__init__`` takes other arguments than it gave ``Exception``), and the caller must
then fail that call alone: one pickle of the whole list would lose them all.
"""
from __future__ import annotations

import io
import pickle
from typing import Any

import cloudpickle

from .errors import SerializationError


_dump = pickle.Pickler.dump


def why_unpicklable(method: str, args: tuple, kwargs: dict) -> str | None:
    """What in one call cannot be pickled, or None if it all can."""
    try:
        cloudpickle.dumps((method, args, kwargs))
        return None
    except Exception as exc:
        whole = exc
    named = [(f"argument {i}", value) for i, value in enumerate(args)]
    named += [(f"keyword argument {key!r}", value) for key, value in kwargs.items()]
    for name, value in named:
        try:
            cloudpickle.dumps(value)
        except Exception as exc:
            return f"{name} ({type(value).__name__}) cannot be pickled: {exc}"
    return f"the call cannot be pickled: {whole}"


def dump_results(results: list[tuple[int, bool, Any]]) -> tuple[list[list], bytes]:
    """``[[index, ok, end(, summary)], ...]`` and the blob their values end in.

    A value that cannot be pickled here is replaced by a ``SerializationError``
    saying so; the others arrive intact.
    """
    buffer = io.BytesIO()
    pickler = cloudpickle.Pickler(buffer, protocol=cloudpickle.DEFAULT_PROTOCOL)
    entries = []
    for index, ok, value in results:
        start = buffer.tell()
        try:
            _dump(pickler, value)  # the C method: one Python frame less per result
        except Exception as exc:
            buffer.seek(start)
            buffer.truncate()
            # A fresh pickler: the failed one may remember parts of the value.
            pickler = cloudpickle.Pickler(buffer, protocol=cloudpickle.DEFAULT_PROTOCOL)
            what = "result" if ok else f"exception {summarize(value)}"
            value = SerializationError(
                f"the {what} of type {type(value).__name__} cannot be pickled: {exc}")
            ok = False
            _dump(pickler, value)
        pickler.clear_memo()  # each pickle must load on its own
        entry = [index, ok, buffer.tell()]
        if not ok:
            entry.append(summarize(value))
        entries.append(entry)
    return entries, buffer.getvalue()


def summarize(exc: BaseException) -> str:
    """``module.Type: message`` of an exception, for when the exception itself
    cannot travel."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else \
        f"{kind.__module__}.{kind.__qualname__}"
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not hide the type
        message = "<unprintable>"
    return f"{name}: {message}" if message else name
