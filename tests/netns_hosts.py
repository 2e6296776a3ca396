"""Hosts for tests, made of Linux network namespaces on one machine.

Each host is a namespace with its own loopback and one veth link to a bridge the
network creates, addressed in ``10.200.N.0/24``; the root namespace gets
``10.200.N.254`` on that bridge, so the test process reaches every host the way a
client on another machine would. Programs started on a host see only its address:
a server bound to its ``127.0.0.1`` cannot be reached from anywhere else.

Names carry the test process's id and ``N`` is a subnet no interface of the root
namespace uses yet, so concurrent runs on one machine stay apart. ``close`` stops
every process started here and removes the namespaces, links and bridge, whatever
happened before; a namespace deleted while a process still runs in it would live
on, so processes go first.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import uuid
from typing import IO

SUBNETS = ipaddress.ip_network("10.200.0.0/16")


class NamespacesUnavailable(RuntimeError):
    """This process cannot create network namespaces (no ``ip``, not privileged)."""


def _ip(*args: str, namespace: str | None = None) -> str:
    command = ["ip", *(["-n", namespace] if namespace else []), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")
    return done.stdout


def check_available() -> None:
    """Raise ``NamespacesUnavailable`` saying why, unless a namespace can be made."""
    if shutil.which("ip") is None:
        raise NamespacesUnavailable("the 'ip' command (iproute2) is not installed")
    probe = f"dsprobe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except RuntimeError as exc:
        raise NamespacesUnavailable(f"cannot create a network namespace (needs root or "
                                    f"CAP_NET_ADMIN): {exc}") from None
    _ip("netns", "del", probe)


def _unused_subnet() -> ipaddress.IPv4Network:
    """A /24 of ``SUBNETS`` that no interface of the root namespace is in."""
    used = set()
    for line in _ip("-4", "-o", "addr", "show").splitlines():
        address = ipaddress.ip_interface(line.split()[3]).ip
        if address in SUBNETS:
            used.add(int(address) >> 8 & 0xFF)
    start = os.getpid() % 250 + 1
    for offset in range(250):
        third = (start + offset) % 250 + 1
        if third not in used:
            return ipaddress.ip_network(f"10.200.{third}.0/24")
    raise RuntimeError("every 10.200.N.0/24 is in use on this machine")


class Host:
    """One namespace: an address and the processes running there."""

    def __init__(self, namespace: str, address: str):
        self.namespace = namespace
        self.address = address
        self.processes: list[subprocess.Popen] = []

    def spawn(self, args: list[str], log: IO[bytes], env: dict[str, str],
              cwd: str) -> subprocess.Popen:
        """Run ``args`` inside this host. ``ip netns exec`` replaces itself with the
        command, so the returned process is the command itself (signals reach it)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespace, *args], cwd=cwd,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(proc)
        return proc

    def stop(self, timeout: float = 15) -> None:
        """Stop this host's processes: SIGTERM (Dask closes gracefully), then SIGKILL.
        SIGCONT wakes a process a test froze, so that it can act on the SIGTERM."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.send_signal(signal.SIGCONT)
        for proc in self.processes:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)


class HostNetwork:
    """A bridge with hosts on it; a context manager that removes all it made."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid()}"
        self.bridge = f"dsbr{self.tag}"[:15]
        self.subnet = _unused_subnet()
        self.hosts: list[Host] = []
        self._links: list[str] = []
        _ip("link", "add", self.bridge, "type", "bridge")
        try:
            _ip("addr", "add", f"{self.subnet[254]}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    def add_host(self) -> Host:
        """A new namespace linked to the bridge, with the next address of the subnet."""
        index = len(self.hosts) + 1
        host = Host(f"daskserve-{self.tag}-h{index}", str(self.subnet[index]))
        link = f"dsv{self.tag}h{index}"[:15]
        _ip("netns", "add", host.namespace)
        self.hosts.append(host)  # from here on ``close`` removes it
        _ip("link", "add", link, "type", "veth", "peer", "name", "eth0",
            "netns", host.namespace)
        self._links.append(link)
        _ip("link", "set", link, "master", self.bridge, "up")
        _ip("addr", "add", f"{host.address}/24", "dev", "eth0", namespace=host.namespace)
        _ip("link", "set", "eth0", "up", namespace=host.namespace)
        _ip("link", "set", "lo", "up", namespace=host.namespace)
        return host

    def close(self) -> None:
        """Stop every process, then remove namespaces, links and the bridge. Each
        step runs even if one before it failed; the first failure is raised last."""
        errors: list[BaseException] = []
        steps = [host.stop for host in self.hosts]
        steps += [lambda ns=host.namespace: _ip("netns", "del", ns) for host in self.hosts]
        # A veth pair goes with its namespace; a link left over means a step failed.
        steps += [lambda link=link: _delete_link(link) for link in self._links]
        steps.append(lambda: _delete_link(self.bridge))
        for step in steps:
            try:
                step()
            except BaseException as exc:
                errors.append(exc)
        self.hosts.clear()
        self._links.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> "HostNetwork":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _delete_link(name: str) -> None:
    done = subprocess.run(["ip", "link", "del", name], capture_output=True, text=True,
                          timeout=30)
    if done.returncode != 0 and "Cannot find device" not in done.stderr:
        raise RuntimeError(f"ip link del {name}: {done.stderr.strip()}")
