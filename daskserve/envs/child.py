"""The process a packed-env replica lives in: ``python -m daskserve.envs.child FD``.

Started by ``daskserve.envs.host`` from the env's interpreter (isolated mode: neither
the worker's ``PYTHONPATH`` nor its working directory reach ``sys.path``). Its spec
arrives length-prefixed on stdin; stdin then stays open for as long as the worker
lives, and EOF on it means the worker is gone, so the process exits at once. It
reports on file descriptor ``FD``, one JSON line each: ``{"address": ...}`` once it
serves or ``{"error": ...}`` if it cannot, and later ``{"drained": true}`` before it
exits after a drain, so the worker can tell a drain from a crash.

It serves the same worker-plugin handlers as a worker, on a Dask ``Server`` of its
own, using this env's daskserve and distributed: routers cannot tell the difference.
Handles work inside it (they reach the scheduler with this process's own connection
pool).
"""
from __future__ import annotations

import asyncio
import json
import os
import pickle
import platform
import signal
import struct
import sys
import threading
import traceback
from typing import Any, BinaryIO, TextIO

DRAIN_EXIT_DELAY_S = 0.1  # lets the drain's reply leave before the process does


def main(argv: list[str]) -> None:
    status = os.fdopen(int(argv[1]), "w", buffering=1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when we stop
    payload = _read_payload(sys.stdin.buffer)
    threading.Thread(target=_exit_with_parent, args=(sys.stdin.buffer,), daemon=True,
                     name="daskserve-parent-watch").start()
    # Isolated mode ignores PYTHONPATH; honour one the backend set in its env_vars.
    for entry in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
        if entry:
            sys.path.insert(0, entry)
    import dask

    dask.config.update(dask.config.config, payload.pop("dask_config", None) or {},
                       priority="new")
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(payload, status))
    else:
        uvloop.run(_serve(payload, status))
    status.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # user threads must not keep a drained replica alive


def _read_payload(stream: BinaryIO) -> dict[str, Any]:
    header = stream.read(8)
    if len(header) != 8:
        os._exit(1)  # the worker died before sending anything
    (size,) = struct.unpack("!Q", header)
    return pickle.loads(stream.read(size))


def _exit_with_parent(stream: BinaryIO) -> None:
    while stream.read(65536):
        pass
    os._exit(0)


def _say(status: TextIO, message: dict[str, Any]) -> None:
    status.write(json.dumps(message) + "\n")


async def _serve(payload: dict[str, Any], status: TextIO) -> None:
    from distributed.core import Server

    from daskserve.context import ReplicaContext
    from daskserve.executor import ReplicaExecutor
    from daskserve.handle import register_home
    from daskserve.protocol import WorkerOp
    from daskserve.worker_plugin import ServeWorkerPlugin

    loop = asyncio.get_running_loop()
    try:
        security = payload["security"]
        server = Server({}, connection_args=security.get_connection_args("worker"),
                        needs_workdir=False)
        await server
        await server.listen(payload["listen"], **security.get_listen_args("worker"))
        server.security = security  # the request channel takes its TLS settings
        plugin = ServeWorkerPlugin()
        await plugin.setup(server)
        register_home(payload["scheduler"], server.rpc, loop)
        replica = ReplicaContext(payload["backend_tag"], payload["replica_tag"],
                                 payload["scheduler"])
        # The user's constructor may block: keep the loop free meanwhile.
        executor = await loop.run_in_executor(None, ReplicaExecutor, replica,
                                              payload["code"], payload["config"], loop)
        await executor.start()
    except BaseException as exc:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        _say(status, {"error": f"{type(exc).__name__}: {exc} (in a process running "
                               f"Python {platform.python_version()} from {sys.prefix})"
                               f"\n{text[-3000:]}"})
        raise SystemExit(1)
    plugin.add_replica(executor)

    stopped = asyncio.Event()
    drain = server.handlers[WorkerOp.DRAIN]

    async def drain_then_exit(**kwargs: Any) -> Any:
        result = await drain(**kwargs)
        if not plugin.executors:
            _say(status, {"drained": True})
            loop.call_later(DRAIN_EXIT_DELAY_S, stopped.set)
        return result

    server.handlers[WorkerOp.DRAIN] = drain_then_exit
    _say(status, {"address": server.address})
    await stopped.wait()


if __name__ == "__main__":
    main(sys.argv)
