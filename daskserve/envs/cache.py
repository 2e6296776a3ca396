"""The per-host cache of unpacked environments.

Several worker processes may share a host; an env is unpacked once per host, under
a lock file, and only an env whose ``.ready`` marker exists is ever used, so no
process sees a half-unpacked one. Layout, under ``cache_root()``:

- ``<id>/``          the env (``<id>``: the first 16 hex digits of the archive's sha256)
- ``<id>.ready``     written last, atomically: the full hash and what probing found
- ``<id>.lock``      ``flock`` held while installing or removing
- ``<id>.users/``    one file per replica process using the env (worker pid + replica)
- ``installs.log``   a line per install, for operators

The archive is streamed from Dask straight into ``tarfile``, never written whole to
disk, and its hash is checked as it arrives. It is unpacked into a temporary
directory that is renamed into place; prefix fix-up (``conda-unpack``) runs after
the rename because it rewrites paths to wherever the env finally lives, and probing
then runs the interpreter at that path. A crash at any point leaves no ``.ready``,
and the next install starts over.

Removal (when no backend uses the env any longer) waits a little for the env's
replica processes to exit, and keeps the env if a live one still uses it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from . import probe
from .spec import EnvError, EnvSpec

logger = logging.getLogger(__name__)

REMOVE_WAIT_S = 10.0


def cache_root() -> str:
    """``DASKSERVE_ENV_CACHE``, else ``daskserve-envs`` in Dask's temporary directory
    (``temporary-directory`` config; HPC sites point it at node-local scratch)."""
    root = os.environ.get("DASKSERVE_ENV_CACHE")
    if not root:
        import dask

        base = dask.config.get("temporary-directory", None) or tempfile.gettempdir()
        root = os.path.join(base, "daskserve-envs")
    return root


@contextlib.contextmanager
def host_lock(path: str) -> Iterator[None]:
    """An exclusive lock shared by every process of this host (blocks until held).

    Lock files are never deleted: a process waiting on a deleted file's lock would
    hold a lock nobody else sees.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows workers
        raise EnvError("packed environments need POSIX worker hosts (flock)") from None
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def open_archive(raw: io.RawIOBase) -> tarfile.TarFile:
    """A streaming tar reader over ``raw`` that notices a truncated archive.

    tarfile's own stream mode takes a compressed stream that simply stops for the
    end of the archive; the gzip, bz2 and lzma file objects raise ``EOFError``.
    """
    import bz2
    import gzip

    stream = io.BufferedReader(raw, 1 << 20)
    magic = stream.peek(6)[:6]
    if magic[:2] == b"\x1f\x8b":
        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    elif magic[:3] == b"BZh":
        stream = bz2.BZ2File(stream)
    elif magic == b"\xfd7zXZ\x00":
        stream = lzma.LZMAFile(stream)
    return tarfile.open(fileobj=stream, mode="r|")


@dataclass
class InstalledEnv:
    spec: EnvSpec
    prefix: str
    info: dict[str, Any]       # what probing the unpacked interpreter found
    user: str                  # this replica's marker in <id>.users/

    def release(self) -> None:
        """This replica no longer uses the env (its process is gone)."""
        with contextlib.suppress(OSError):
            os.unlink(self.user)


def install(spec: EnvSpec, read_chunk: Callable[[int], bytes], replica: str,
            where: str) -> InstalledEnv:
    """The env unpacked on this host, unpacking it first if needed (blocking).

    ``read_chunk(i)`` returns chunk ``i`` of the archive. The caller's replica is
    registered as a user before the lock is released, so a concurrent removal
    cannot take the env away between installing and starting.
    """
    root = cache_root()
    os.makedirs(root, exist_ok=True)
    base = os.path.join(root, spec.short)
    with host_lock(base + ".lock"):
        info = _ready(spec, base)
        if info is None:
            timings: dict[str, float] = {}
            info = _unpack(spec, read_chunk, root, base, timings)
            with open(os.path.join(root, "installs.log"), "a") as log:
                log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {spec.sha256} "
                          f"{spec.name} {spec.size} bytes, installed by {where} "
                          f"(pid {os.getpid()}) in {sum(timings.values()):.1f}s: "
                          f"fetched and unpacked in {timings['unpack']:.1f}s, "
                          f"fixed up and probed in {timings['probe']:.1f}s\n")
        users = base + ".users"
        os.makedirs(users, exist_ok=True)
        user = os.path.join(users, f"{os.getpid()}-{_safe(replica)}")
        open(user, "w").close()
    return InstalledEnv(spec, base, info, user)


def remove(sha256: str, wait_s: float = REMOVE_WAIT_S) -> bool:
    """Delete this host's copy of an env once no live process uses it; True if gone."""
    root = cache_root()
    base = os.path.join(root, sha256[:16])
    if not os.path.exists(base + ".lock"):
        return False
    with host_lock(base + ".lock"):
        deadline = time.monotonic() + wait_s
        while _live_users(base + ".users") and time.monotonic() < deadline:
            time.sleep(0.05)  # drained replica processes are on their way out
        if _live_users(base + ".users"):
            logger.info("keeping env %s: replica processes still use it", sha256[:16])
            return False
        existed = os.path.exists(base + ".ready") or os.path.exists(base)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(base + ".ready")  # first: nobody starts on it from now on
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(base + ".users", ignore_errors=True)
        return existed


async def remove_from_host(sha256: str) -> bool:
    """``remove`` off the worker's event loop; the controller runs it on every worker
    (``client.run``) when the last backend using the env is deleted."""
    import asyncio

    return await asyncio.to_thread(remove, sha256)


# -- internals ----------------------------------------------------------------------
def _ready(spec: EnvSpec, base: str) -> dict[str, Any] | None:
    try:
        with open(base + ".ready") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    if marker.get("sha256") != spec.sha256 or not os.path.isdir(base):
        return None  # another archive with the same 64-bit prefix: reinstall
    return marker["info"]


def _unpack(spec: EnvSpec, read_chunk: Callable[[int], bytes], root: str,
            base: str, timings: dict[str, float]) -> dict[str, Any]:
    what = spec.describe()
    started = time.monotonic()
    expected_platform = spec.platform
    if expected_platform and not probe.same_platform(expected_platform, probe.this_platform()):
        raise EnvError(f"{what} was packed on {expected_platform}, and this host is "
                       f"{probe.this_platform()}; pack the env on the workers' platform")
    tmp = tempfile.mkdtemp(prefix=f"{spec.short}.unpacking-", dir=root)
    try:
        stream = _ChunkStream(spec, read_chunk)
        try:
            with open_archive(stream) as tar:
                _extract(tar, tmp)
            stream.finish()
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
            raise EnvError(f"{what}: the archive cannot be unpacked: "
                           f"{type(exc).__name__}: {exc}") from None
        shutil.rmtree(base, ignore_errors=True)  # leftovers of an install that crashed
        os.rename(tmp, base)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    timings["unpack"] = time.monotonic() - started
    started = time.monotonic()
    try:
        _fix_prefix(spec, base)
        info = probe.probe(base, what)
        timings["probe"] = time.monotonic() - started
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    marker = base + ".ready"
    with open(marker + ".tmp", "w") as f:
        json.dump({"sha256": spec.sha256, "info": info}, f)
    os.replace(marker + ".tmp", marker)
    return info


def _extract(tar: tarfile.TarFile, dest: str) -> None:
    """Unpack, refusing members that would land outside ``dest``.

    Links may point anywhere (a venv's ``bin/python`` links to its base
    interpreter), so this is tarfile's ``tar`` filter, not the stricter ``data``.
    """
    tar_filter = getattr(tarfile, "tar_filter", None)

    def members() -> Iterator[tarfile.TarInfo]:
        for member in tar:
            parts = member.name.replace("\\", "/").split("/")
            if member.name.startswith("/") or ".." in parts:
                raise EnvError(f"archive member {member.name!r} would unpack outside "
                               f"the env's directory")
            yield member

    if tar_filter is not None:
        tar.extractall(dest, members=members(), filter=tar_filter)
    else:  # Pythons before the extraction filters (3.10.11 and older)
        tar.extractall(dest, members=members())


def _fix_prefix(spec: EnvSpec, prefix: str) -> None:
    """conda-pack's ``conda-unpack`` rewrites the packed env's prefix to this one.

    venv-pack needs nothing here: it made the activate scripts and shebangs
    location-independent when packing, and ``bin/python`` is a link to the base
    interpreter wherever the env lives.
    """
    script = os.path.join(prefix, "bin", "conda-unpack")
    if spec.kind != "conda" or not os.path.exists(script):
        return
    python = probe.check_interpreter(prefix, spec.describe())
    done = subprocess.run([python, "-I", script], capture_output=True, text=True,
                          env=probe.child_environment(prefix, {}), cwd=prefix)
    if done.returncode != 0:
        raise EnvError(f"{spec.describe()}: conda-unpack failed (exit {done.returncode}): "
                       f"{(done.stderr or done.stdout).strip()[-2000:]}")


def _live_users(users: str) -> list[str]:
    try:
        names = os.listdir(users)
    except FileNotFoundError:
        return []
    live = []
    for name in names:
        pid = int(name.split("-", 1)[0]) if name.split("-", 1)[0].isdigit() else 0
        if pid and _alive(pid):
            live.append(name)
        else:  # its worker process died without cleaning up
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(users, name))
    return live


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80] + "-" + hashlib.sha1(
        name.encode()).hexdigest()[:8]


class _ChunkStream(io.RawIOBase):
    """The archive as a byte stream, pulled chunk by chunk and hashed on the way."""

    def __init__(self, spec: EnvSpec, read_chunk: Callable[[int], bytes]):
        self._spec = spec
        self._read_chunk = read_chunk
        self._next = 0
        self._buffer = memoryview(b"")
        self._hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not len(self._buffer):
            if self._next >= self._spec.nchunks:
                return 0
            data = self._read_chunk(self._next)
            expected = min(self._spec.chunk_size,
                           self._spec.size - self._next * self._spec.chunk_size)
            if len(data) != expected:
                raise EnvError(f"{self._spec.describe()}: chunk {self._next} has "
                               f"{len(data)} bytes, expected {expected}")
            self._next += 1
            self._hash.update(data)
            self._buffer = memoryview(data)
        n = min(len(buffer), len(self._buffer))
        buffer[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def finish(self) -> None:
        """Read what tar left (padding) and check the whole archive's hash."""
        scratch = bytearray(1 << 20)
        while self.readinto(scratch):
            pass
        if self._hash.hexdigest() != self._spec.sha256:
            raise EnvError(f"{self._spec.describe()}: the archive received does not "
                           f"match its sha256 (got {self._hash.hexdigest()[:16]})")
