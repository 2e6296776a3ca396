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


class EndpointNotFoundError(ServeError, LookupError):
    """A handle or route names an endpoint the controller does not know."""

