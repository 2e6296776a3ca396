"""What travels about a packed environment: its identity, never its bytes.

A backend's ``replica_options`` carry an ``EnvSpec`` as a plain dict, so the
controller, its checkpoint and ``list_backends`` handle it like any other option.
The archive itself crosses the cluster as Dask data, in chunks whose keys derive
from the archive's content hash: a worker that knows the spec knows what to fetch,
and two uploads of the same archive name the same keys.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from ..errors import ServeError

# Big enough that a 1 GB archive is ~64 messages, small enough that the scheduler
# (which forwards each chunk when the client cannot reach workers directly) and the
# fetching worker only ever hold one such message at a time.
CHUNK_SIZE = 16 * 1024 * 1024
KINDS = ("venv", "conda")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class EnvError(ServeError, ValueError):
    """A packed environment cannot be packed, shipped, unpacked or run, and why."""


def check_sha256(sha256: Any) -> str:
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise TypeError(f"an archive's sha256 must be 64 hex digits, got {sha256!r}")
    return sha256


def chunk_key(sha256: str, index: int) -> str:
    """The Dask key of one chunk of an archive."""
    return f"daskserve-env-{sha256}-{index}"


@dataclass(frozen=True)
class EnvSpec:
    """A packed environment as the cluster sees it.

    The version fields are what was found in the environment when it was packed
    or inspected (``None``: not found); workers check them again, for real, by
    running the unpacked interpreter.
    """

    sha256: str            # of the archive's bytes: its identity everywhere
    size: int              # bytes
    kind: str              # "venv" (venv-pack) or "conda" (conda-pack)
    name: str              # for messages: the env's or the archive's name
    chunk_size: int = CHUNK_SIZE
    python: str | None = None        # "3.11.7"
    distributed: str | None = None
    daskserve: str | None = None
    platform: str | None = None      # "linux-x86_64", when known

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise TypeError(f"replica_options.env: sha256 must be 64 hex digits, "
                            f"got {self.sha256!r}")
        for name in ("size", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TypeError(f"replica_options.env: {name} must be a positive "
                                f"integer, got {value!r}")
        if self.kind not in KINDS:
            raise ValueError(f"replica_options.env: kind must be one of {list(KINDS)}, "
                             f"got {self.kind!r}")
        for name in ("name", "python", "distributed", "daskserve", "platform"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"replica_options.env: {name} must be a string, "
                                f"got {value!r}")

    @property
    def nchunks(self) -> int:
        return -(-self.size // self.chunk_size)

    @property
    def short(self) -> str:
        """Names the env in messages and on disk; 64 bits of the hash are plenty."""
        return self.sha256[:16]

    def describe(self) -> str:
        return f"packed env {self.name!r} ({self.kind}, {self.short})"

    def keys(self) -> list[str]:
        return [chunk_key(self.sha256, i) for i in range(self.nchunks)]

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> "EnvSpec":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(wire) - known)
        if unknown:
            raise ValueError(f"replica_options.env: unknown field(s) {unknown}")
        missing = sorted({"sha256", "size", "kind", "name"} - set(wire))
        if missing:
            raise ValueError(f"replica_options.env: missing field(s) {missing}")
        return cls(**wire)


def coerce_env(value: Any) -> EnvSpec:
    """A ``PackedEnv`` (client side) or its wire dict (controller side) as a spec."""
    spec = getattr(value, "spec", None)
    if isinstance(spec, EnvSpec):
        return spec
    if isinstance(value, EnvSpec):
        return value
    if isinstance(value, Mapping):
        return EnvSpec.from_wire(value)
    raise TypeError(
        f"replica_options.env must be a serve.PackedEnv (PackedEnv.from_venv(path), "
        f"PackedEnv.from_conda(name_or_prefix) or PackedEnv(archive_path)), "
        f"got {type(value).__name__} {value!r}")
