"""Module-level API: ``serve.start``, ``serve.connect`` and functions acting on the
most recently started or connected instance (or, inside a replica, on the
instance that replica belongs to).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping

from distributed import Client, get_client

from . import event_loop
from .client import ServeClient
from .config import HTTPOptions
from .context import current_replica

_current: ServeClient | None = None

# A cluster daskserve starts serves its Dask dashboard on loopback only, like the
# proxy: the dashboard shows task code and logs and can start profilers, so it must
# not face the network unless its owner asks (with a cluster of their own).
DASHBOARD_ADDRESS = "127.0.0.1:0"


def start(dask_client: Client | None = None,
          http_options: Mapping[str, Any] | None = None,
          checkpoint_path: str | os.PathLike | None = None) -> ServeClient:
    """Install the controller on the cluster's scheduler (idempotent) and connect.

    If an instance already runs there, this attaches to it; ``http_options`` given
    here must then match the running instance's (only the options named are
    compared), since they could not take effect: a ``ValueError`` names those that
    differ; so must ``checkpoint_path``. With no ``dask_client`` a ``LocalCluster`` is
    started (on uvloop when it is installed) and owned by the returned client:
    ``shutdown()`` closes it too.
    ``checkpoint_path`` is a file on the scheduler's host (relative paths are taken
    from the scheduler's working directory); if it holds a checkpoint, the instance
    serves that state at once.
    """
    from scheduler_plugin import PLUGIN_NAME, ServeController

    options = HTTPOptions.coerce(http_options)
    if checkpoint_path is not None:
        checkpoint_path = os.fspath(checkpoint_path)
    owns_cluster = dask_client is None
    if dask_client is None:
        dask_client = Client(event_loop.local_cluster(
            processes=True, threads_per_worker=1, dashboard_address=DASHBOARD_ADDRESS))
    dask_client.register_plugin(ServeController(options.to_dict(), checkpoint_path),
                                name=PLUGIN_NAME)
    client = ServeClient(dask_client, owns_cluster=owns_cluster)
    if http_options is not None:
        _check_http_options(http_options, options, client.info()["http_options"])
    if checkpoint_path is not None:
        _check_same_checkpoint(client, checkpoint_path)
    return _set_current(client)


def _check_same_checkpoint(client: ServeClient, requested: str) -> None:
    """An instance that was already running kept its own checkpoint path: a caller
    who asked for another must learn that its state is not stored where it thinks."""
    from scheduler_plugin.checkpoint import resolve

    running = client.info().get("checkpoint_path")
    wanted = client.dask_client.run_on_scheduler(resolve, requested)
    if running != wanted:
        where = f"with checkpoint_path {running!r}" if running else "without a checkpoint_path"
        raise ValueError(
            f"the daskserve instance on scheduler {client.scheduler_address} already runs "
            f"{where}, not checkpoint_path {wanted!r}; use serve.connect, or shut it "
            f"down and start it again with the path you want")


def _check_http_options(asked: Mapping[str, Any] | HTTPOptions, options: HTTPOptions,
                        running: Mapping[str, Any]) -> None:
    wanted = options.to_dict()
    named = wanted if isinstance(asked, HTTPOptions) else {k: wanted[k] for k in asked}
    differ = [f"{name}={value!r} (running: {running.get(name)!r})"
              for name, value in named.items() if running.get(name) != value]
    if differ:
        raise ValueError(
            f"a daskserve instance already runs on this scheduler with other "
            f"http_options: {', '.join(differ)}; shut it down first to change them, or "
            f"attach with serve.connect(client) or serve.start(client) without "
            f"http_options")


def connect(dask_client: Client | None = None) -> ServeClient:
    """Attach to a running instance; inside a replica, to that replica's instance."""
    if dask_client is None:
        replica = current_replica()
        # By address: a packed env's replica process has no worker to ask, so this
        # makes it a client of its own.
        dask_client = (get_client(replica.scheduler_address, resolve_address=False)
                       if replica is not None else Client.current())
    return _set_current(ServeClient(dask_client))


def _set_current(client: ServeClient) -> ServeClient:
    global _current
    _current = client
    return client


def _client() -> ServeClient:
    if _current is not None and _current.dask_client.status not in ("closed", "closing"):
        return _current
    if current_replica() is not None:
        return connect()
    raise RuntimeError("no serve instance: call serve.start(...) or serve.connect(...) first")


def _forward(name: str) -> Callable:
    method = getattr(ServeClient, name)

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(_client(), name)(*args, **kwargs)

    return call


create_backend = _forward("create_backend")
list_backends = _forward("list_backends")
get_backend_config = _forward("get_backend_config")
update_backend_config = _forward("update_backend_config")
delete_backend = _forward("delete_backend")
create_endpoint = _forward("create_endpoint")
delete_endpoint = _forward("delete_endpoint")
list_endpoints = _forward("list_endpoints")
set_traffic = _forward("set_traffic")
shadow_traffic = _forward("shadow_traffic")
get_handle = _forward("get_handle")


def shutdown() -> None:
    """Shut down the current instance and forget it."""
    global _current
    _client().shutdown()
    _current = None
