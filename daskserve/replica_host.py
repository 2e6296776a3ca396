"""Replica hosts: what places a replica executor in a process.

A host prepares the process (environment variables, visible GPUs, the home of the
handles user code may call), builds the ``ReplicaExecutor`` there, registers it with
that process's worker plugin, and says at which address requests for it are
answered. The controller treats the worker holding a replica's resources and that
address as two things, so a host may serve from a process other than its worker.

The host here is a Dask actor on the worker that holds the resources: Dask gives it
placement, lifetime (the controller holds its future) and a failure signal when the
worker dies. Backends with a packed environment use ``daskserve.envs.host.EnvHost``,
an actor placed the same way that runs the executor in a child process started from
the env's interpreter, serving the same protocol on its own address. Requests do not use ``actor_execute``: routers call the
worker plugin's handlers directly (benchmarks/transport.py measures that path at
2-4x the message rate), and the controller asks the plugin (``WorkerOp.LOCATE``)
where the replica answers, never the actor: a Dask actor proxy binds to whichever
client is the process default, which in a scheduler with several clients may be
another cluster's.
"""
from __future__ import annotations

import asyncio
from typing import Any

from distributed import get_worker

from .context import ReplicaContext
from .executor import ReplicaExecutor
from .gpus import count_gpus, visible_devices
from .handle import register_home
from .worker_plugin import ServeWorkerPlugin


class ActorHost:
    """A replica as a Dask actor in the worker process that holds its resources."""

    def __init__(self, backend_tag: str, replica_tag: str, spec: bytes,
                 config: dict[str, Any], env_vars: dict[str, str], gpu_slots: list[int]):
        # Runs in a worker thread (Dask builds actors as tasks), not on the loop.
        worker = get_worker()
        plugin = ServeWorkerPlugin.on(worker)
        loop = worker.loop.asyncio_loop
        # Handles used by this backend (model composition) route from this worker.
        register_home(worker.scheduler.address, worker.rpc, loop)
        env = dict(env_vars)
        if gpu_slots and count_gpus():
            env["CUDA_VISIBLE_DEVICES"] = visible_devices(gpu_slots)
        plugin.set_environment(replica_tag, env)
        try:
            executor = ReplicaExecutor(
                ReplicaContext(backend_tag, replica_tag, worker.scheduler.address),
                spec, config, loop)
            asyncio.run_coroutine_threadsafe(executor.start(), loop).result()
        except BaseException:
            plugin.remove_replica(replica_tag)
            raise
        plugin.add_replica(executor)
