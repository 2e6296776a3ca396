"""``serve.PackedEnv``: an environment packed into one archive, on the client.

Packing a real environment takes seconds to minutes, and users call
``from_venv``/``from_conda`` in scripts they rerun, so packing is cached: the key is
the env's file metadata (path, size, mtime, mode of every file; compiled bytecode
left out, since running the env writes it), and the archive is named by the sha256
of its bytes. An unchanged env is found in the cache without packing or probing;
a changed one is packed again and its previous archive removed.

The archive's hash is its identity on the cluster: it names the Dask keys its chunks
travel under and the directory it is unpacked into on each host, so an archive
already shipped is never shipped again, whoever packed it.

Everything is checked here, before anything is shipped: the archive must be a
venv-pack or conda-pack archive that contains daskserve and the same distributed
as this client (hence as the cluster), and packed envs are probed by running their
interpreter. Workers check again after unpacking, against their own versions.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import lzma
import importlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from typing import Any, Iterator

from ..protocol import ControllerOp
from . import probe
from .cache import host_lock, open_archive
from .spec import EnvError, EnvSpec, chunk_key

_SITE = re.compile(r"^(?:lib/python(\d+\.\d+)/site-packages|Lib/site-packages)/"
                   r"([^/]+)-([^/-]+)\.dist-info/")
_PYLIB = re.compile(r"^lib/python(\d+\.\d+)/")
_MAX_META = 1 << 20


def pack_cache_dir() -> str:
    """Where packed archives and their index live on the client."""
    root = os.environ.get("DASKSERVE_PACK_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
            os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "daskserve", "packs")
    os.makedirs(root, exist_ok=True)
    return root


class PackedEnv:
    """A conda-pack or venv-pack archive that backends can run under.

    ``PackedEnv(archive_path)`` takes an archive packed beforehand; ``from_venv`` and
    ``from_conda`` pack an existing environment (cached, see the module docstring).
    Pass it as ``replica_options={"env": env}``: ``create_backend`` ships the archive
    to the cluster, the workers hosting the backend's replicas unpack it once per
    host, and the replicas run under its interpreter.
    """

    def __init__(self, archive_path: str | os.PathLike):
        path = os.path.abspath(os.fspath(archive_path))
        self.archive_path = path
        self.spec = _inspect_cached(path)

    # -- constructors -------------------------------------------------------------
    @classmethod
    def from_venv(cls, path: str | os.PathLike) -> "PackedEnv":
        """Pack a virtualenv (``python -m venv`` or virtualenv) with venv-pack.

        The env's ``bin/python`` stays a link to the base interpreter it was made
        from: workers need that same interpreter at the same path.
        """
        prefix = os.path.abspath(os.fspath(path))
        if not os.path.isdir(prefix):
            raise EnvError(f"PackedEnv.from_venv: no virtualenv at {prefix!r} "
                           f"(not a directory)")
        if not os.path.exists(os.path.join(prefix, "pyvenv.cfg")):
            raise EnvError(f"PackedEnv.from_venv: {prefix!r} is not a virtualenv (it has "
                           f"no pyvenv.cfg); for a conda env use PackedEnv.from_conda")
        return cls._pack("venv", prefix)

    @classmethod
    def from_conda(cls, name_or_prefix: str | os.PathLike) -> "PackedEnv":
        """Pack a conda environment, given by name or by path, with conda-pack.

        The archive carries its own interpreter; ``conda-unpack`` fixes its prefixes
        on each worker host.
        """
        given = os.fspath(name_or_prefix)
        if os.sep in given or os.path.isdir(given):
            prefix = os.path.abspath(given)
            if not os.path.isdir(prefix):
                raise EnvError(f"PackedEnv.from_conda: no conda env at {prefix!r}")
        else:
            prefix = _conda_prefix(given)
        if not os.path.isdir(os.path.join(prefix, "conda-meta")):
            raise EnvError(f"PackedEnv.from_conda: {prefix!r} is not a conda environment "
                           f"(it has no conda-meta directory); for a virtualenv use "
                           f"PackedEnv.from_venv")
        return cls._pack("conda", prefix)

    @classmethod
    def _pack(cls, kind: str, prefix: str) -> "PackedEnv":
        cache = pack_cache_dir()
        fingerprint = _fingerprint(prefix)
        index = os.path.join(cache, f"{kind}-{fingerprint}.json")
        what = f"the {kind} at {prefix!r}"
        expected = probe.expected_versions()
        with _locked(index + ".lock"):
            entry = _read_json(index)
            if entry is not None and os.path.exists(entry["archive"]):
                probe.check(entry["probe"], expected, what, "this client")
                return cls._from_entry(entry)
            info = probe.probe(prefix, what)
            probe.check(info, expected, what, "this client")
            archive = _run_packer(kind, prefix, cache)
            sha256, size = _hash_file(archive)
            final = os.path.join(cache, f"{sha256}.tar.gz")
            os.replace(archive, final)
            spec = EnvSpec(sha256=sha256, size=size, kind=kind,
                           name=os.path.basename(prefix.rstrip(os.sep)),
                           python=info.get("python"), distributed=info.get("distributed"),
                           daskserve=info.get("daskserve"),
                           platform=f"{info['os']}-{probe.normalize_machine(info['machine'])}")
            entry = {"prefix": prefix, "archive": final, "probe": info,
                     "spec": spec.to_wire()}
            _write_json(index, entry)
            _remove_stale(cache, prefix, index)
        return cls._from_entry(entry)

    @classmethod
    def _from_entry(cls, entry: dict[str, Any]) -> "PackedEnv":
        env = cls.__new__(cls)
        env.archive_path = entry["archive"]
        env.spec = EnvSpec.from_wire(entry["spec"])
        return env

    # -- identity -----------------------------------------------------------------
    @property
    def sha256(self) -> str:
        return self.spec.sha256

    def __repr__(self) -> str:
        return (f"PackedEnv({self.archive_path!r}, kind={self.spec.kind!r}, "
                f"sha256={self.spec.short}..., size={self.spec.size})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PackedEnv) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec.sha256)

    # -- shipping -----------------------------------------------------------------
    def upload(self, dask_client: Any) -> int:
        """Put the archive into the cluster's memory unless it is there already.

        ``create_backend`` calls this; returns how many chunks were sent. Each chunk
        is scattered on its own (through the scheduler, which forwards it at once,
        unless the client was made with ``direct_to_workers=True``), then handed to
        the controller, which keeps it while any backend uses the env. Neither this
        process nor the scheduler ever holds more than one chunk.
        """
        scheduler = dask_client.scheduler
        missing = dask_client.sync(getattr(scheduler, ControllerOp.ENV_PREPARE),
                                   sha256=self.sha256, nchunks=self.spec.nchunks)
        if not missing:
            return 0
        try:
            stat = os.stat(self.archive_path)
            handle = open(self.archive_path, "rb")
        except OSError as exc:
            raise EnvError(f"cannot read the archive of {self.spec.describe()}: {exc}") \
                from None
        if stat.st_size != self.spec.size:
            handle.close()
            raise EnvError(f"the archive {self.archive_path!r} changed since this "
                           f"PackedEnv was made ({stat.st_size} bytes, was "
                           f"{self.spec.size}); make a new PackedEnv")
        with handle:
            for index in missing:
                handle.seek(index * self.spec.chunk_size)
                data = handle.read(self.spec.chunk_size)
                key = chunk_key(self.sha256, index)
                futures = dask_client.scatter({key: data}, hash=False)
                dask_client.sync(getattr(scheduler, ControllerOp.ENV_HOLD),
                                 sha256=self.sha256, keys=[key])
                for future in futures.values():
                    future.release()
                del data, futures
        return len(missing)


# -- packing --------------------------------------------------------------------------
def _run_packer(kind: str, prefix: str, cache: str) -> str:
    fd, output = tempfile.mkstemp(prefix=".packing-", suffix=".tar.gz", dir=cache)
    os.close(fd)
    try:
        module, method = ("venv_pack", "from_venv") if kind == "venv" else \
            ("conda_pack", "from_conda")
        try:
            packer = importlib.import_module(module)
        except ImportError:
            package = module.replace("_", "-")
            raise EnvError(f"PackedEnv.{method} needs {package}: "
                           f"pip install {package}") from None
        packer.pack(prefix=prefix, output=output, format="tar.gz", force=True,
                    verbose=False)
    except EnvError:
        os.unlink(output)
        raise
    except Exception as exc:  # the packers raise their own exception types
        os.unlink(output)
        raise EnvError(f"packing {prefix!r} with {kind}-pack failed: {exc}") from None
    return output


def _conda_prefix(name: str) -> str:
    conda = os.environ.get("CONDA_EXE") or shutil.which("conda")
    if not conda:
        raise EnvError(f"PackedEnv.from_conda: cannot find the conda env named {name!r}: "
                       f"there is no conda executable on PATH (nor CONDA_EXE); pass the "
                       f"env's path instead")
    try:
        out = subprocess.run([conda, "info", "--json"], capture_output=True, text=True,
                             check=True, timeout=120).stdout
        info = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise EnvError(f"PackedEnv.from_conda: `conda info --json` failed: {exc}") from None
    if name == "base" and info.get("root_prefix"):
        return info["root_prefix"]
    for env in info.get("envs", []):
        if os.path.basename(env) == name:
            return env
    raise EnvError(f"PackedEnv.from_conda: conda knows no env named {name!r} "
                   f"(known: {sorted(os.path.basename(e) for e in info.get('envs', []))})")


def _fingerprint(prefix: str) -> str:
    """A hash of the metadata of every file in the env, bytecode left out."""
    digest = hashlib.sha256(prefix.encode())
    for root, dirs, files in os.walk(prefix):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            if name.endswith(".pyc"):
                continue
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
                link = os.readlink(path) if os.path.islink(path) else ""
            except OSError:
                continue  # vanished while we walked
            digest.update(f"{os.path.relpath(path, prefix)}\0{st.st_mode}\0{st.st_size}\0"
                          f"{st.st_mtime_ns}\0{link}\n".encode())
    return digest.hexdigest()[:32]


def _remove_stale(cache: str, prefix: str, current: str) -> None:
    """Drop earlier packs of this env and packs of envs that are gone, with their
    archives unless another pack uses them."""
    entries = {}
    for name in os.listdir(cache):
        if name.endswith(".json"):
            path = os.path.join(cache, name)
            entries[path] = _read_json(path)
    # (an env that no longer exists cannot be packed again: its archive is stale too)
    stale = [path for path, entry in entries.items()
             if entry is not None and path != current and
             (entry.get("prefix") == prefix or not os.path.isdir(entry.get("prefix", "")))]
    for path in stale:
        archive = entries.pop(path).get("archive")
        with contextlib.suppress(OSError):
            os.unlink(path)
        if archive and all(e is None or e.get("archive") != archive
                           for e in entries.values()):
            with contextlib.suppress(OSError):
                os.unlink(archive)


# -- archives given by path -----------------------------------------------------------
def _inspect_cached(path: str) -> EnvSpec:
    """``_inspect``, cached by the archive's path, size and mtime."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise EnvError(f"PackedEnv: cannot read archive {path!r}: {exc}") from None
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}".encode())
    index = os.path.join(pack_cache_dir(), f"archive-{key.hexdigest()[:32]}.meta")
    entry = _read_json(index)
    if entry is not None:
        spec = EnvSpec.from_wire(entry["spec"])
    else:
        spec = _inspect(path)
        _write_json(index, {"path": path, "spec": spec.to_wire()})
    _check_static(spec, path)
    return spec


def _inspect(path: str) -> EnvSpec:
    """Hash an archive and read what it holds, in one streaming pass."""
    reader = _HashingReader(open(path, "rb"))
    kind = None
    found: dict[str, str] = {}
    python = platform = None
    try:
        with reader, open_archive(reader) as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if name == "pyvenv.cfg":
                    kind = kind or "venv"
                elif name.startswith("conda-meta/"):
                    kind = "conda"
                    if (platform is None and name.endswith(".json") and member.isfile()
                            and member.size < _MAX_META):
                        platform = _conda_subdir(tar.extractfile(member))
                elif name in ("python.exe", "Scripts/python.exe"):
                    platform = "win32"
                match = _SITE.match(name)
                if match:
                    python = python or match.group(1)
                    found.setdefault(match.group(2).lower().replace("_", "-"),
                                     match.group(3))
                elif python is None and _PYLIB.match(name):
                    python = _PYLIB.match(name).group(1)
                if name.endswith("site-packages/daskserve/__init__.py"):
                    found.setdefault("daskserve-package", "")  # installed without metadata
            reader.drain()
    except (tarfile.TarError, EOFError, OSError, ValueError, lzma.LZMAError,
            zlib.error) as exc:
        raise EnvError(f"PackedEnv: {path!r} is not a readable tar archive "
                       f"(conda-pack and venv-pack write .tar.gz by default; zip archives "
                       f"are not supported): {type(exc).__name__}: {exc}") from None
    if kind is None:
        raise EnvError(f"PackedEnv: {path!r} is neither a venv-pack archive (pyvenv.cfg "
                       f"at its root) nor a conda-pack archive (conda-meta/ at its root)")
    daskserve = found.get("daskserve")
    if daskserve is None and "daskserve-package" in found:
        daskserve = "unknown"
    return EnvSpec(sha256=reader.hexdigest(), size=reader.size, kind=kind,
                   name=os.path.basename(path), python=python,
                   distributed=found.get("distributed"), daskserve=daskserve,
                   platform=platform)


def _check_static(spec: EnvSpec, path: str) -> None:
    """What the archive's listing already says about versions, checked before shipping."""
    expected = probe.expected_versions()
    info = {"distributed": spec.distributed,
            "daskserve": expected["daskserve"] if spec.daskserve == "unknown"
            else spec.daskserve}
    for name in ("distributed", "daskserve"):
        if info[name] is None:
            info[name + "_error"] = f"the archive {os.path.basename(path)!r} holds no " \
                                    f"{name}-*.dist-info"
    probe.check(info, expected, spec.describe(), "this client")


def _conda_subdir(handle: io.BufferedReader | None) -> str | None:
    if handle is None:
        return None
    try:
        subdir = json.load(handle).get("subdir")
    except ValueError:
        return None
    return probe.conda_platform(subdir) if isinstance(subdir, str) else None


class _HashingReader(io.RawIOBase):
    """A file as tarfile reads it, hashed on the way."""

    def __init__(self, raw: io.BufferedReader):
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer)
        if n:
            self._hash.update(memoryview(buffer)[:n])
            self.size += n
        return n

    def drain(self) -> None:
        """Hash what the tar reader left unread (end-of-archive padding)."""
        while self.readinto(bytearray(1 << 20)):
            pass

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        self._raw.close()
        super().close()


# -- small helpers --------------------------------------------------------------------
def _hash_file(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, value: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """One packer per env at a time, across processes."""
    with host_lock(path):
        yield
