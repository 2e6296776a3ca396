"""How an HTTP request and its response travel between proxy and replica.

Both directions are plain msgpack-native values (dicts, lists, bytes, ints), never
pickles: the proxy must not turn bytes from the network into Python objects, and
the replica builds the Starlette ``Request`` only where the user's code runs.
"""
from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .protocol import WireRequest, WireResponse


def encode_request(method: str, path: str, query: str, headers: list[tuple[str, str]],
                   body: bytes, client: tuple[str, int] | None,
                   raw_path: str | None = None) -> WireRequest:
    """The wire form of a request. ``path`` is decoded; ``query`` and ``raw_path``
    are what the client sent, one character per byte (latin-1) as Tornado gives
    them, so the replica recovers the exact bytes. ``raw_path`` is None when the
    path needed no decoding."""
    return {"method": method, "path": path, "raw_path": raw_path, "query": query,
            "headers": headers, "body": body, "client": list(client) if client else None}


class InvalidJSONBody(json.JSONDecodeError):
    """``await request.json()`` found the request's own body not to be JSON.

    That is the client's mistake (400), unlike a JSON error in the handler's own
    code (500), so it gets a type of its own. It is still a ``JSONDecodeError``, so
    handlers written against plain Starlette that catch that (or ``ValueError``)
    keep working.
    """


class _ReceivedRequest(Request):
    """A Starlette request whose body already arrived in full at the proxy."""

    def __init__(self, scope: dict, body: bytes):
        super().__init__(scope)
        self._body = body

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = json.loads(self._body)
            except json.JSONDecodeError as exc:
                raise InvalidJSONBody(exc.msg, exc.doc, exc.pos) from exc
            except UnicodeDecodeError as exc:  # json.loads decodes bytes itself
                raise InvalidJSONBody(f"not text in UTF-8, UTF-16 or UTF-32 ({exc.reason})",
                                      self._body.decode("latin-1"), exc.start) from exc
            except RecursionError as exc:  # e.g. a body of 100,000 "["
                raise InvalidJSONBody("nested too deeply to decode", "", 0) from exc
        return self._json


def build_request(wire: WireRequest) -> Request:
    """Turn the wire form back into the Starlette ``Request`` user code expects."""
    path = wire["path"]
    raw_path = wire.get("raw_path")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": wire["method"],
        "scheme": "http",
        "path": path,
        "raw_path": path.encode() if raw_path is None else raw_path.encode("latin-1"),
        "root_path": "",
        "query_string": wire["query"].encode("latin-1"),
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1"))
                    for k, v in wire["headers"]],
        "client": tuple(wire["client"]) if wire["client"] else None,
        "server": None,
        "path_params": {},
    }
    return _ReceivedRequest(scope, wire["body"])


def _json_default(value: Any) -> Any:
    # Arrays and tensors from numerical libraries expose ``tolist``; sets become lists.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def encode_result(value: Any) -> WireResponse:
    """A handler's return value as a response: Response as is, str as text, else JSON."""
    if isinstance(value, Response):
        if not hasattr(value, "body"):
            raise TypeError(
                f"{type(value).__name__} has no body; streaming responses are not supported"
            )
        headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in value.raw_headers]
        return [value.status_code, headers, bytes(value.body)]
    if isinstance(value, str):
        return [200, [["content-type", "text/plain; charset=utf-8"]], value.encode()]
    body = json.dumps(value, default=_json_default).encode()
    return [200, [["content-type", "application/json"]], body]


def error_response(status: int, error: str, message: str, **extra: Any) -> WireResponse:
    """A JSON error body that names what went wrong, used for every non-2xx reply."""
    body = json.dumps({"error": error, "message": message, **extra}).encode()
    return [status, [["content-type", "application/json"]], body]


def exception_response(exc: BaseException, backend: str, replica: str) -> WireResponse:
    if isinstance(exc, InvalidJSONBody):
        return error_response(400, "InvalidJSONBody", f"the request body is not valid "
                              f"JSON: {exc}", backend=backend, replica=replica)
    return error_response(500, type(exc).__name__, str(exc), backend=backend,
                          replica=replica)
