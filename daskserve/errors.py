"""Exceptions that cross the API boundary with a name users can catch.

Each may be raised inside a replica (a handle call from one backend to another) and
travel back to a caller as a pickle, so each pickles with the arguments its
``__init__`` takes: one whose ``__init__`` took other arguments than it passed to
``Exception`` would fail to unpickle in the caller.
"""
from __future__ import annotations

import cloudpickle


class ServeError(RuntimeError):
    """Base class for failures that come from daskserve rather than user code."""


class ReplicaUnavailableError(ServeError):
    """The replica serving a request went away while the request was executing."""

    def __init__(self, backend: str, replica: str, reason: str):
        super().__init__(f"replica {replica!r} of backend {backend!r} failed: {reason}")
        self.backend = backend
        self.replica = replica
        self.reason = reason

    def __reduce__(self):
        # Rebuilt from its parts (notes included): a Dask task that raises it sends it
        # pickled to the client, and the default reduction would call __init__ badly.
        return type(self), (self.backend, self.replica, self.reason), self.__dict__


class BackPressureError(ServeError):
    """A backend cannot take the request now; retrying later may succeed.

    Raised at once when the router already holds ``max_queued_requests`` requests
    waiting for the backend (HTTP: 503 with ``Retry-After``).
    """

    def __init__(self, backend: str, message: str):
        super().__init__(message)
        self.backend = backend

    def __reduce__(self):
        return type(self), (self.backend, str(self))


class QueueTimeoutError(BackPressureError):
    """A request waited ``queue_timeout_s`` in a router without a replica to take it:
    the backend has no running replica, or all of them stayed busy."""


class SerializationError(ServeError, TypeError):
    """A handle call's arguments, result or exception could not be pickled or
    unpickled on its way; only that call fails.

    It is a ``TypeError``, as pickle's own "cannot pickle" errors are, so code that
    caught those keeps working.
    """


class ReplicaConfigError(ServeError):
    """A replica could not apply a new config: its ``reconfigure`` raised.

    The controller raises it and never unpickles user data, so it carries the user's
    exception pickled; the Python client raises that exception instead (see
    ``user_error``), so callers catch the type their own code raises.
    """

    MAX_MESSAGE = 2000  # Dask replaces errors with long messages by a generic type

    def __init__(self, backend: str, replica: str, message: str, error: bytes | None = None):
        if len(message) > self.MAX_MESSAGE:
            message = message[:self.MAX_MESSAGE] + "..."
        super().__init__(f"replica {replica!r} of backend {backend!r} could not apply "
                         f"the new config: {message}")
        self.backend = backend
        self.replica = replica
        self.message = message
        self.error = error

    def __reduce__(self):
        return type(self), (self.backend, self.replica, self.message, self.error)

    def user_error(self) -> BaseException:
        """The exception the replica raised, or this error if it cannot be rebuilt here."""
        if self.error is None:
            return self
        try:
            return cloudpickle.loads(self.error)
        except Exception:
            return self


class EndpointNotFoundError(ServeError, KeyError, ValueError):
    """An API call, a handle or a route names an endpoint that does not exist.

    One type wherever it is raised. It is a ``KeyError`` (a lookup by name failed) and
    a ``ValueError`` (an argument names nothing), so code catching either keeps working.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
