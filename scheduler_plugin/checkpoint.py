"""The checkpoint store: the desired state in one file, so that a restarted scheduler
serves the same endpoints again without anyone re-creating them.

The file is replaced whole on every save (a temporary file in the same directory,
fsynced, then ``os.replace``), so whatever moment the scheduler dies at, the path holds
either the previous complete state or the new one, never a mix.

Format: a msgpack map ``{"format": "daskserve-checkpoint", "format_version": 1,
"state": DesiredState.to_dict()}``. Only plain values are stored; backend code and
``user_config`` stay the bytes the Python client pickled, so the controller never
unpickles user data here either. ``format_version`` is read before anything else:
a later daskserve keeps a reader for each older format, and an older daskserve refuses
a newer file by name instead of misreading it.

Saves follow the user's intent: every API call that changed the state returns only
once the new state is in the file; an explicit ``shutdown`` stores the emptied state,
so a restart after it starts empty; a scheduler that closes or dies leaves the file as
it was, so a restart serves again.

What an operator gets when the file is not usable:

- No file at the path: a first start. The controller starts empty and writes one.
- The file cannot be read, is not msgpack, is truncated, comes from a newer daskserve,
  or holds a state the API could not have produced: the controller **refuses to
  start**, with a ``CheckpointError`` naming the path and the problem (a preloaded
  scheduler exits with it; ``serve.start`` raises it). Starting empty instead would
  answer 404 on every route behind a healthy ``/-/healthz``, and the first change would
  overwrite the only copy of the state. To start empty on purpose, move the file aside.
- The directory does not exist or cannot be written: refused at start too, not at the
  first change. The directory is never created: a missing one is most often a shared
  filesystem that is not mounted, and state written under the bare mount point would
  be missing on the next restart.

The file holds pickled code that workers run, so anyone who can replace it can run
code on the cluster: it is created readable and writable by its owner only, and its
directory should be writable only by whoever runs the scheduler.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from typing import Any, Callable

import msgpack

from .state import DesiredState

logger = logging.getLogger(__name__)

FORMAT = "daskserve-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, understood or written; names the path."""


def resolve(path: str | os.PathLike) -> str:
    """The absolute path, resolved where the controller runs (the scheduler's host)."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


# -- reading ----------------------------------------------------------------------------
def load(path: str | os.PathLike) -> DesiredState | None:
    """The state stored at ``path``; ``None`` when there is no file yet."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    return unpack(data, path)


def unpack(data: bytes, path: str = "<bytes>") -> DesiredState:
    try:
        document = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack reports bad input with several exception types
        raise CheckpointError(f"checkpoint {path} is corrupt: it is not valid msgpack "
                              f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a daskserve checkpoint (no "
                              f"'format': {FORMAT!r} field)")
    version = document.get("format_version")
    reader = _READERS.get(version) if isinstance(version, int) else None
    if reader is None:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}, "
            + ("written by a newer daskserve; " if newer else "")
            + f"this daskserve reads format versions {sorted(_READERS)}")
    try:
        return reader(document)
    except KeyError as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: missing field "
                              f"{exc.args[0]!r}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path} holds a state daskserve cannot "
                              f"restore: {exc}") from exc


def _read_v1(document: dict[str, Any]) -> DesiredState:
    return DesiredState.from_dict(document["state"])


# One reader per format version ever written; a new format adds one, never replaces.
_READERS: dict[int, Callable[[dict[str, Any]], DesiredState]] = {1: _read_v1}


# -- writing ----------------------------------------------------------------------------
def pack(state: DesiredState) -> bytes:
    """The file's bytes. Packing before opening any file keeps a state that cannot be
    packed from ever touching the checkpoint."""
    document = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "state": state.to_dict()}
    try:
        return msgpack.packb(document, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"the desired state cannot be stored: {exc}") from exc


def save(path: str | os.PathLike, state: DesiredState) -> None:
    write(path, pack(state))


def write(path: str | os.PathLike, data: bytes) -> None:
    """Replace the file at ``path`` with ``data``, all or nothing."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise CheckpointError(
            f"cannot write checkpoint {path}: directory {directory} does not exist "
            f"(it is not created for you, so that an unmounted filesystem shows); "
            f"create it first")
    name = os.path.basename(path)
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(exc, OSError):
            raise CheckpointError(f"cannot write checkpoint {path}: {exc}") from exc
        raise
    _sync_directory(directory)


def _sync_directory(directory: str) -> None:
    """Make the rename itself durable; best effort, as some filesystems refuse it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- the controller's side ----------------------------------------------------------------
class CheckpointStore:
    """Keeps one controller's checkpoint up to date; with no path it stores nothing."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else resolve(path)
        self._saved_version = 0
        self._lock = asyncio.Lock()

    async def restore(self) -> DesiredState:
        """The stored state, or an empty one; raises ``CheckpointError`` so that a bad
        file or an unwritable place stops the start instead of serving nothing."""
        if self.path is None:
            return DesiredState()
        state = await asyncio.to_thread(load, self.path)
        if state is None:
            logger.info("no daskserve checkpoint at %s yet: starting empty", self.path)
            state = DesiredState()
        else:
            logger.info("restoring %d backend(s) and %d endpoint(s) from checkpoint %s",
                        len(state.backends), len(state.endpoints), self.path)
        await asyncio.to_thread(save, self.path, state)  # cannot be written: fail now
        self._saved_version = state.version
        return state

    async def save(self, state: DesiredState) -> None:
        """Store ``state`` if it changed since it was last stored.

        Saves run one at a time and each stores the state as it is then, so the file
        never goes back to an older state; the write runs in a thread so that a large
        backend or a slow filesystem does not stall the scheduler's event loop.
        """
        if self.path is None or state.version == self._saved_version:
            return
        async with self._lock:
            version = state.version
            if version == self._saved_version:
                return
            try:
                await asyncio.to_thread(write, self.path, pack(state))
            except CheckpointError as exc:
                logger.error("%s", exc)
                raise CheckpointError(
                    f"{exc}; the change is live, but a restarted scheduler would not "
                    f"have it (the next change saves again)") from exc
            self._saved_version = version
