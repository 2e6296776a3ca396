"""Exceptions that cross the API boundary with a name users can catch."""
from __future__ import annotations


class ServeError(RuntimeError):
    """Base class for failures that come from daskserve rather than user code."""


class ReplicaUnavailableError(ServeError):
    """The replica serving a request went away while the request was executing."""

    def __init__(self, backend: str, replica: str, reason: str):
        super().__init__(f"replica {replica!r} of backend {backend!r} failed: {reason}")
        self.backend = backend
        self.replica = replica


class EndpointNotFoundError(ServeError, KeyError, ValueError):
    """An API call, a handle or a route names an endpoint that does not exist.

    One type wherever it is raised. It is a ``KeyError`` (a lookup by name failed) and
    a ``ValueError`` (an argument names nothing), so code catching either keeps working.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""

