"""Can this environment serve on this cluster? Asked by running its interpreter.

Dask refuses to mix versions of ``distributed`` across a cluster, and a replica in a
packed env talks to routers and the scheduler with the env's own ``distributed`` and
``daskserve``; a mismatch would show up later as an obscure wire or unpickling error.
So the env is probed when it is packed (against the packing client's versions) and
again on each worker host after unpacking (against that worker's), and every problem
found is reported at once, naming the package, both versions and the fix.

Reading the interpreter's binary header first turns "Exec format error" into "this
env was built for aarch64, this host is x86_64", and a venv whose ``bin/python``
points at a base interpreter this host lacks (venv-pack archives are not
self-contained) into a message that says so.
"""
from __future__ import annotations

import json
import os
import platform
import struct
import subprocess
import sys
from typing import Any

from .spec import EnvError

# Runs under the env's interpreter, whatever its version: plain Python 3, stdlib only.
PROBE = r"""
import json, platform, sys
out = {"python": "%d.%d.%d" % tuple(sys.version_info[:3]), "os": sys.platform,
       "machine": platform.machine(), "prefix": sys.prefix}
for name in ("distributed", "daskserve"):
    try:
        out[name] = getattr(__import__(name), "__version__", "unknown")
    except BaseException as exc:
        out[name] = None
        out[name + "_error"] = "%s: %s" % (type(exc).__name__, exc)
sys.stdout.write(json.dumps(out))
"""
PROBE_TIMEOUT_S = 300.0  # first imports on a cold network filesystem can be slow

_MACHINES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "i386": "x86",
             "i686": "x86"}
_ELF_MACHINES = {0x03: "x86", 0x28: "arm", 0x3E: "x86_64", 0xB7: "aarch64",
                 0x14: "ppc", 0x15: "ppc64", 0x16: "s390x", 0xF3: "riscv"}
_CONDA_OS = {"linux": "linux", "osx": "darwin", "win": "win32"}
_CONDA_MACHINE = {"64": "x86_64", "32": "x86", "aarch64": "aarch64", "arm64": "aarch64",
                  "ppc64le": "ppc64", "s390x": "s390x", "armv7l": "arm"}


def normalize_machine(machine: str) -> str:
    machine = machine.lower()
    return _MACHINES.get(machine, machine)


def this_platform() -> str:
    """``os-machine`` of this process, in the form ``EnvSpec.platform`` uses."""
    return f"{sys.platform}-{normalize_machine(platform.machine())}"


def conda_platform(subdir: str) -> str | None:
    """A conda ``subdir`` ("linux-64", "osx-arm64") in ``this_platform`` form."""
    osname, _, arch = subdir.partition("-")
    if osname not in _CONDA_OS or arch not in _CONDA_MACHINE:
        return None
    return f"{_CONDA_OS[osname]}-{_CONDA_MACHINE[arch]}"


def expected_versions() -> dict[str, str]:
    """What an env must run to join this process's cluster."""
    import distributed

    from .. import __version__

    return {"distributed": distributed.__version__, "daskserve": __version__}


def interpreter(prefix: str) -> str:
    return os.path.join(prefix, "Scripts" if sys.platform == "win32" else "bin", "python")


def check_interpreter(prefix: str, what: str) -> str:
    """The env's interpreter, if this host can run it; else ``EnvError`` saying why."""
    path = interpreter(prefix)
    if not os.path.lexists(path):
        if os.path.exists(os.path.join(prefix, "python.exe")):
            raise EnvError(f"{what} was packed on Windows (it has python.exe, not "
                           f"bin/python); this host runs {this_platform()}")
        raise EnvError(f"{what} has no interpreter at bin/python")
    real = os.path.realpath(path)
    if not os.path.exists(real):
        raise EnvError(
            f"{what}: bin/python links to {os.readlink(path)!r}, which does not exist "
            f"on this host. venv-pack archives are not self-contained: their python "
            f"links to the base interpreter the venv was made from, which must exist at "
            f"the same path on every worker host (or pack a conda env with conda-pack, "
            f"which carries its interpreter)")
    built_for = binary_platform(real)
    here = this_platform()
    if built_for is not None and not same_platform(built_for, here):
        raise EnvError(f"{what}: its interpreter is built for {built_for}, and this "
                       f"host is {here}; pack the env on (or for) the workers' platform")
    return path


def binary_platform(path: str) -> str | None:
    """``os-machine`` (or just ``os``) an executable is built for, read from its
    header; None if the format is not one we know."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if head[:4] == b"\x7fELF" and len(head) >= 20:
        endian = "<" if head[5] == 1 else ">"
        (code,) = struct.unpack(endian + "H", head[18:20])
        return f"linux-{_ELF_MACHINES.get(code, f'machine-{code:#x}')}"
    if head[:4] in (b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe") and len(head) >= 8:
        (cpu,) = struct.unpack("<I", head[4:8])
        return "darwin-" + {0x01000007: "x86_64", 0x0100000C: "aarch64"}.get(cpu, "other")
    if head[:4] == b"\xca\xfe\xba\xbe":
        return "darwin"  # a universal binary
    if head[:2] == b"MZ":
        return "win32"
    return None


def same_platform(built_for: str, here: str) -> bool:
    """Whether a binary built for ``built_for`` runs here (just the OS when the
    header does not say the machine)."""
    if "-" not in built_for:
        return here.split("-", 1)[0] == built_for
    return built_for == here


def probe(prefix: str, what: str) -> dict[str, Any]:
    """Run the env's interpreter, isolated from this process's packages, and report."""
    python = check_interpreter(prefix, what)
    try:
        done = subprocess.run([python, "-I", "-c", PROBE], capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT_S, cwd=prefix,
                              env=child_environment(prefix, {}))
    except OSError as exc:
        raise EnvError(f"{what}: cannot run its interpreter {python}: {exc}") from None
    except subprocess.TimeoutExpired:
        raise EnvError(f"{what}: its interpreter did not answer within "
                       f"{PROBE_TIMEOUT_S:.0f}s") from None
    if done.returncode != 0:
        raise EnvError(f"{what}: its interpreter {python} failed "
                       f"(exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    try:
        return json.loads(done.stdout)
    except ValueError:
        raise EnvError(f"{what}: unexpected output from its interpreter: "
                       f"{done.stdout[-500:]!r}") from None


def problems(info: dict[str, Any], expected: dict[str, str], where: str) -> list[str]:
    """Everything that keeps an env with ``info`` from serving where ``expected`` runs."""
    found = []
    for name in ("distributed", "daskserve"):
        want = expected[name]
        have = info.get(name)
        if have is None:
            error = info.get(name + "_error")
            detail = f" ({error})" if error else ""
            found.append(f"{name} cannot be imported in the env{detail}; install "
                         f"{name}=={want} (the version {where} runs) into it")
        elif have != want:
            found.append(f"the env has {name} {have} but {where} runs {want}; install "
                         f"{name}=={want} into the env (Dask needs one version of "
                         f"distributed across a cluster, and replicas speak daskserve's "
                         f"protocol)")
    return found


def check(info: dict[str, Any], expected: dict[str, str], what: str, where: str) -> None:
    found = problems(info, expected, where)
    if found:
        raise EnvError(f"{what} cannot serve: " + "; ".join(found))


# Variables that would leak this process's packages or interpreter into the env's.
_LEAKY = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE",
          "PYTHONUSERBASE", "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV",
          "__PYVENV_LAUNCHER__")


def child_environment(prefix: str, base: dict[str, str]) -> dict[str, str]:
    """Environment variables for a process of the env: the env's ``bin`` first on
    PATH, activated the way venv/conda activation scripts would, nothing that points
    Python at this process's packages."""
    env = {k: v for k, v in (base or os.environ).items() if k not in _LEAKY}
    bindir = os.path.dirname(interpreter(prefix))
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if os.path.isdir(os.path.join(prefix, "conda-meta")):
        env["CONDA_PREFIX"] = prefix
    else:
        env["VIRTUAL_ENV"] = prefix
    env["PYTHONNOUSERSITE"] = "1"
    return env
