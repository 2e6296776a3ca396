"""The replica host for packed environments: a child process of the worker.

``EnvHost`` is a Dask actor like ``ActorHost`` and is placed the same way, on the
worker that holds the replica's resources in the controller's ledger; Dask gives it
the same lifetime and failure signal. Instead of building the executor in the
worker, it makes sure the env is unpacked on this host, then starts
``python -m daskserve.envs.child`` from the env's interpreter. That process runs the
executor behind a Dask ``Server`` on its own address, with the same worker plugin
handlers, so routers reach it with the same ``WorkerOp.CALL`` messages; the worker
plugin answers ``WorkerOp.LOCATE`` with that address.

Why a bare child server rather than a child ``dask worker``: a worker would join the
cluster, so it would be given the user's ordinary tasks (which the env cannot run),
every worker plugin the user registers, ``client.run`` calls, and a vote in adaptive
scaling. A child server is invisible to Dask and costs one process per replica.

The child is tied to its worker both ways. It reads its spec from a pipe and exits
when that pipe closes, so a worker that dies (even by SIGKILL) takes its children
along. The worker watches the child: when it exits without being drained or stopped,
the controller is told (``ControllerOp.REPLICA_EXITED``) and starts a replacement.
When the actor is released (scale-down after draining, a failed start, backend
deleted) or the worker closes, the child is stopped.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from typing import Any

import dask
from distributed import get_worker
from distributed.comm.addressing import (get_address_host, parse_address,
                                         unparse_address, unparse_host_port)
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.worker import get_data_from_worker

from ..errors import ServeError
from ..gpus import count_gpus, visible_devices
from ..protocol import ControllerOp
from ..tasks import spawn
from ..worker_plugin import PLUGIN_NAME, ServeWorkerPlugin
from . import cache, probe
from .spec import EnvError, EnvSpec, chunk_key

logger = logging.getLogger(__name__)

STOP_GRACE_S = 5.0        # from closing a child's pipe to SIGKILL
OUTPUT_TAIL_LINES = 40    # of a child's output, quoted when it fails
FETCH_RETRIES = 20        # per chunk, when its holder is busy or going


class EnvHost:
    """A replica in a child process running a packed environment's interpreter."""

    def __init__(self, backend_tag: str, replica_tag: str, spec: bytes,
                 config: dict[str, Any], env_vars: dict[str, str], gpu_slots: list[int],
                 env: dict[str, Any]):
        # Runs in a worker thread (Dask builds actors as tasks): unpacking and the
        # child's start may take long without stalling the worker's event loop.
        worker = get_worker()
        plugin = ServeWorkerPlugin.on(worker)
        env_spec = EnvSpec.from_wire(env)
        loop = worker.loop.asyncio_loop
        children = asyncio.run_coroutine_threadsafe(ChildReplicas.on(worker), loop).result()
        key = worker.get_current_task()
        start = children.begin(key)
        try:
            where = f"worker {worker.address}"
            installed = cache.install(env_spec, _ChunkFetcher(worker, env_spec, loop),
                                      replica_tag, where)
            try:
                probe.check(installed.info, probe.expected_versions(),
                            env_spec.describe(), where)
                variables = dict(env_vars)
                if gpu_slots and count_gpus():
                    variables["CUDA_VISIBLE_DEVICES"] = visible_devices(gpu_slots)
                payload = {
                    "backend_tag": backend_tag, "replica_tag": replica_tag,
                    "scheduler": worker.scheduler.address, "code": spec,
                    "config": config, "listen": _listen_address(worker.address),
                    "security": worker.security, "dask_config": dask.config.config,
                }
                environment = probe.child_environment(installed.prefix,
                                                      plugin.baseline_environment())
                environment.update(variables)
                child = children.start(start, replica_tag, installed, payload, environment)
            except BaseException:
                installed.release()
                raise
        finally:
            children.end(start)
        plugin.add_remote(replica_tag, child.address)
        self.address = child.address
        self.pid = child.proc.pid


class _ChunkFetcher:
    """Chunks of an archive, pulled from the workers holding them, one ahead.

    Called from the installing thread; the transfers run on the worker's loop with
    Dask's own worker-to-worker data transfer. Prefetching the next chunk while the
    current one is unpacked overlaps the network and tar's work.
    """

    def __init__(self, worker: Any, spec: EnvSpec, loop: asyncio.AbstractEventLoop):
        self._worker = worker
        self._spec = spec
        self._loop = loop
        self._pending: dict[int, Any] = {}

    def __call__(self, index: int) -> bytes:
        future = self._pending.pop(index, None) or self._submit(index)
        if index + 1 < self._spec.nchunks:
            self._pending[index + 1] = self._submit(index + 1)
        return future.result()

    def _submit(self, index: int) -> Any:
        return asyncio.run_coroutine_threadsafe(self._fetch(chunk_key(self._spec.sha256,
                                                                      index)), self._loop)

    async def _fetch(self, key: str) -> bytes:
        worker = self._worker
        for attempt in range(FETCH_RETRIES):
            if key in worker.data:
                return worker.data[key]
            who_has = await worker.scheduler.who_has(keys=[key])
            holders = [h for h in who_has.get(key) or [] if h != worker.address]
            if not holders:
                raise EnvError(
                    f"{self._spec.describe()} is no longer held in the cluster (a worker "
                    f"holding part of its archive left, or the scheduler restarted); call "
                    f"create_backend again, or env.upload(dask_client), to ship it again")
            for holder in holders:
                try:
                    response = await get_data_from_worker(worker.rpc, [key], holder,
                                                          who=worker.address)
                except OSError:
                    continue  # that holder is going away: try another
                if response["status"] == "OK":
                    return response["data"][key]
            await asyncio.sleep(min(0.05 * 2 ** attempt, 2.0))  # holders busy
        raise EnvError(f"{self._spec.describe()}: could not fetch {key} from "
                       f"its holders after {FETCH_RETRIES} attempts")


def _listen_address(worker_address: str) -> str:
    """Where the child listens: the worker's own host and scheme, a free port."""
    scheme, _ = parse_address(worker_address)
    if scheme not in ("tcp", "tls"):  # inproc and others cannot cross processes
        return "tcp://127.0.0.1:0"
    return unparse_address(scheme, unparse_host_port(get_address_host(worker_address), 0))


class _Start:
    """A start in progress; the actor may be released before it finishes."""

    def __init__(self, key: str):
        self.key = key
        self.cancelled = False
        self.child: _Child | None = None


class _Child:
    def __init__(self, replica: str, key: str, proc: subprocess.Popen,
                 installed: cache.InstalledEnv):
        self.replica = replica
        self.key = key
        self.proc = proc
        self.installed = installed
        self.address: str | None = None
        self.drained = False
        self.stopping = False
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)

    def stop(self) -> None:
        """Close its pipe (it exits at once), and SIGKILL it if it has not soon."""
        self.stopping = True
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        timer = threading.Timer(STOP_GRACE_S, self._kill)
        timer.daemon = True
        timer.start()

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def tail(self) -> str:
        return "".join(self.output).strip()[-3000:] or "(no output)"

    def exit_reason(self, code: int) -> str:
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"


class ChildReplicas(WorkerPlugin):
    """The packed-env replica processes of one worker, installed on first use.

    Local to the worker (not registered with the scheduler) because only workers
    that host such replicas need it; Dask still calls its ``transition`` and
    ``teardown`` hooks.
    """

    name = "daskserve-env-children"

    def __init__(self) -> None:
        self.children: dict[str, _Child] = {}       # by actor key
        self._starting: dict[str, _Start] = {}

    @classmethod
    async def on(cls, worker: Any) -> "ChildReplicas":
        plugin = worker.plugins.get(cls.name)
        if not isinstance(plugin, cls):
            plugin = cls()
            await worker.plugin_add(plugin, name=cls.name)
        return plugin

    def setup(self, worker: Any) -> None:
        self.worker = worker
        self.loop = worker.loop.asyncio_loop

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish not in ("released", "forgotten", "cancelled", "error"):
            return
        starting = self._starting.get(key)
        if starting is not None:
            starting.cancelled = True
            if starting.child is not None:
                starting.child.stop()
        child = self.children.get(key)
        if child is not None:
            child.stop()

    async def teardown(self, worker: Any) -> None:
        children = list(self.children.values())
        for child in children:
            child.stop()
        await asyncio.gather(*(asyncio.to_thread(c.proc.wait) for c in children),
                             return_exceptions=True)

    # -- starting, in the actor's thread ---------------------------------------------
    def begin(self, key: str) -> _Start:
        start = self._starting[key] = _Start(key)
        return start

    def end(self, start: _Start) -> None:
        self._starting.pop(start.key, None)

    def start(self, start: _Start, replica: str, installed: cache.InstalledEnv,
              payload: dict[str, Any], environment: dict[str, str]) -> _Child:
        """Start the child and return once it serves; raise if it cannot."""
        if start.cancelled:
            raise ServeError(f"replica {replica!r} was released while it was starting")
        python = probe.interpreter(installed.prefix)
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(
                [python, "-I", "-u", "-m", "daskserve.envs.child", str(write_fd)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                pass_fds=(write_fd,), env=environment)
        except OSError as exc:
            os.close(read_fd)
            raise EnvError(f"{installed.spec.describe()}: cannot start {python}: {exc}") \
                from None
        finally:
            os.close(write_fd)
        child = start.child = _Child(replica, start.key, proc, installed)
        status = os.fdopen(read_fd, "rb")
        threading.Thread(target=self._forward_output, args=(child,), daemon=True,
                         name=f"daskserve-output-{replica}").start()
        data = pickle.dumps(payload, protocol=4)
        try:
            proc.stdin.write(struct.pack("!Q", len(data)) + data)
            proc.stdin.flush()
        except OSError:
            pass  # it died already; the status pipe says how
        if start.cancelled:
            child.stop()
        line = status.readline()
        message = json.loads(line) if line.strip() else None
        if message is None or "address" not in message:
            status.close()
            child.stop()
            code = proc.wait()
            if message is not None and "error" in message:
                raise ServeError(f"replica {replica!r} failed to start under "
                                 f"{installed.spec.describe()}: {message['error']}")
            raise ServeError(f"replica {replica!r}: its process under "
                             f"{installed.spec.describe()} {child.exit_reason(code)} "
                             f"before serving; its output ends with:\n{child.tail()}")
        child.address = message["address"]
        self.children[start.key] = child
        threading.Thread(target=self._watch, args=(child, status), daemon=True,
                         name=f"daskserve-watch-{replica}").start()
        if start.cancelled:
            child.stop()
            raise ServeError(f"replica {replica!r} was released while it was starting")
        return child

    # -- watching, in threads --------------------------------------------------------
    def _forward_output(self, child: _Child) -> None:
        """The child's stdout and stderr, into this worker's stderr, tagged."""
        prefix = f"[{child.replica}] "
        for raw in child.proc.stdout:
            line = raw.decode(errors="replace")
            child.output.append(line)
            try:
                sys.stderr.write(prefix + line)
            except (OSError, ValueError):
                pass

    def _watch(self, child: _Child, status: Any) -> None:
        with status:
            for line in status:
                try:
                    if json.loads(line).get("drained"):
                        child.drained = True
                except ValueError:
                    pass
        code = child.proc.wait()
        child.installed.release()
        try:
            self.loop.call_soon_threadsafe(self._exited, child, code)
        except RuntimeError:
            pass  # the worker's loop is closed: nobody is left to tell

    def _exited(self, child: _Child, code: int) -> None:
        if self.children.get(child.key) is child:
            del self.children[child.key]
        plugin = self.worker.plugins.get(PLUGIN_NAME)
        if isinstance(plugin, ServeWorkerPlugin):
            plugin.remove_remote(child.replica)
        if child.stopping or child.drained:
            return
        reason = f"its process {child.exit_reason(code)}; output ends with:\n{child.tail()}"
        logger.warning("replica %s under a packed env: %s", child.replica, reason)
        spawn(self._report(child.replica, reason))

    async def _report(self, replica: str, reason: str) -> None:
        try:
            await getattr(self.worker.scheduler, ControllerOp.REPLICA_EXITED)(
                replica=replica, reason=reason)
        except Exception as exc:
            logger.info("could not tell the controller that %s exited: %r", replica, exc)
