"""Packed-environment archives in the cluster, and which backends use them.

A client scatters an archive's chunks (``PackedEnv.upload``) and hands each to the
registry, which keeps it alive in Dask's memory under a pseudo-client of the
scheduler (the way Dask's own ``fire_and_forget`` keeps futures nobody holds). The
chunks then live on workers (spilled to disk by Dask under memory pressure), never
in the scheduler, and any worker hosting a replica of the env pulls them from there:
scale-up and replacements on new hosts need no client.

An archive stays while a backend uses it. One that no backend has claimed yet (the
client uploads, then creates the backend) is kept for ``UNUSED_UPLOAD_TTL_S``, then
released at the next upload or backend change: a client that died between the two
leaves nothing behind for long, without a timer in the scheduler. When the last
backend using an archive is deleted, its chunks are released and every worker host
deletes its unpacked copy.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from daskserve.envs.cache import remove_from_host
from daskserve.envs.spec import EnvSpec, check_sha256, chunk_key
from daskserve.tasks import spawn

logger = logging.getLogger(__name__)

HOLDER = "daskserve-envs"      # the scheduler-side pseudo-client holding chunks
UNUSED_UPLOAD_TTL_S = 600.0
REMOVE_TIMEOUT_S = 60.0


class EnvRegistry:
    def __init__(self, scheduler: Any, client: Callable[[], Awaitable[Any]]):
        self._scheduler = scheduler
        self._client = client
        self._users: dict[str, set[str]] = {}      # sha256 -> backend tags
        self._uploads: dict[str, float] = {}       # sha256 -> last upload activity
        self._held: dict[str, set[str]] = {}       # sha256 -> chunk keys we hold

    # -- uploads (client API) -----------------------------------------------------------
    def prepare(self, sha256: str, nchunks: int) -> list[int]:
        """The chunks a client must send; those already in memory are kept for it."""
        if not isinstance(nchunks, int) or isinstance(nchunks, bool) or nchunks <= 0:
            raise ValueError(f"nchunks must be a positive integer, got {nchunks!r}")
        check_sha256(sha256)
        self._expire()
        self._uploads[sha256] = time.monotonic()
        keys = [chunk_key(sha256, i) for i in range(nchunks)]
        present = [key for key in keys if self._in_memory(key)]
        self._hold(sha256, present)
        held = set(present)
        return [i for i, key in enumerate(keys) if key not in held]

    def hold(self, sha256: str, keys: list[str]) -> None:
        check_sha256(sha256)
        prefix = chunk_key(sha256, 0)[:-1]
        for key in keys:
            if not isinstance(key, str) or not key.startswith(prefix) or \
                    not key[len(prefix):].isdigit():
                raise ValueError(f"{key!r} is not a chunk of archive {sha256}")
        self._uploads[sha256] = time.monotonic()
        missing = [key for key in keys if not self._in_memory(key)]
        if missing:
            raise ValueError(f"chunks {missing} of archive {sha256[:16]} are not in the "
                             f"cluster's memory; scatter them first")
        self._hold(sha256, keys)

    # -- backends -----------------------------------------------------------------------
    def use(self, backend: str, env: dict[str, Any]) -> None:
        self._expire()
        sha256 = EnvSpec.from_wire(env).sha256
        self._users.setdefault(sha256, set()).add(backend)
        self._uploads.pop(sha256, None)

    async def drop(self, backend: str) -> None:
        """``backend`` is gone; release the archives nothing uses any more."""
        self._expire()
        unused = []
        for sha256, users in list(self._users.items()):
            users.discard(backend)
            if not users:
                del self._users[sha256]
                if sha256 not in self._uploads:
                    unused.append(sha256)
        for sha256 in unused:
            await self._release(sha256)

    def status(self) -> dict[str, Any]:
        """For ``client.info()``: each archive in the cluster and who uses it."""
        return {sha256[:16]: {"backends": sorted(self._users.get(sha256, ())),
                              "chunks_held": len(self._held.get(sha256, ()))}
                for sha256 in set(self._users) | set(self._held)}

    # -- internals ----------------------------------------------------------------------
    def _in_memory(self, key: str) -> bool:
        task = self._scheduler.tasks.get(key)
        return task is not None and task.state == "memory"

    def _hold(self, sha256: str, keys: list[str]) -> None:
        held = self._held.setdefault(sha256, set())
        new = [key for key in keys if key not in held]
        if new:
            self._scheduler.client_desires_keys(keys=new, client=HOLDER)
            held.update(new)

    def _expire(self) -> None:
        now = time.monotonic()
        for sha256, when in list(self._uploads.items()):
            if now - when > UNUSED_UPLOAD_TTL_S and sha256 not in self._users:
                del self._uploads[sha256]
                spawn(self._release(sha256))

    async def _release(self, sha256: str) -> None:
        keys = self._held.pop(sha256, set())
        if keys and HOLDER in self._scheduler.clients:
            self._scheduler.client_releases_keys(keys=list(keys), client=HOLDER)
        try:
            client = await self._client()
            removed = await asyncio.wait_for(
                client.run(remove_from_host, sha256, on_error="return"), REMOVE_TIMEOUT_S)
        except Exception as exc:
            logger.warning("removing unpacked env %s from the workers: %r", sha256[:16], exc)
            return
        failures = {w: r for w, r in removed.items() if isinstance(r, BaseException)}
        if failures:
            logger.warning("removing unpacked env %s failed on %s", sha256[:16], failures)
