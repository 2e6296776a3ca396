"""The ``daskserve`` command: demo, start, status, shutdown."""
from __future__ import annotations

import json
import signal
import threading
from typing import Any

import click
import dask


@click.group()
def main() -> None:
    """Serve Python models and business logic on a Dask cluster."""


def _local_client(workers: int, threads: int) -> Any:
    from distributed import Client, LocalCluster

    from .api import DASHBOARD_ADDRESS

    # uvloop reaches Nanny-spawned workers through the Dask config.
    with dask.config.set({"distributed.admin.event-loop": _event_loop()}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads,
                               processes=True, dashboard_address=DASHBOARD_ADDRESS)
        return Client(cluster)


def _event_loop() -> str:
    try:
        import uvloop  # noqa: F401
        return "uvloop"
    except ImportError:
        return "asyncio"


def _stop_signal() -> threading.Event:
    """An event set by SIGTERM; installed first, so an early SIGTERM still stops cleanly."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def _wait(stop: threading.Event, duration: float | None) -> None:
    try:
        stop.wait(duration)
    except KeyboardInterrupt:
        pass


def greet(request: Any) -> dict:
    """The demo backend: a greeting that shows what the request carried."""
    name = request.query_params.get("name", "world")
    return {"message": f"hello, {name}!", "method": request.method}


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--duration", default=None, type=float,
              help="Stop after this many seconds (default: run until Ctrl-C).")
def demo(host: str, port: int, duration: float | None) -> None:
    """Start a local Dask cluster, serve an example and print how to call it."""
    import daskserve as serve

    stop = _stop_signal()

    client = serve.start(_local_client(workers=1, threads=2),
                         http_options={"host": host, "port": port})
    client.create_backend("greet", greet, config={"num_replicas": 2},
                          replica_options={"num_cpus": 1})
    client.create_endpoint("greet", backend="greet", route="/greet", methods=["GET", "POST"])
    click.echo(f"daskserve is serving on http://{host}:{port}")
    click.echo(f"  try:    curl 'http://{host}:{port}/greet?name=dask'")
    click.echo(f"  routes: curl http://{host}:{port}/-/routes")
    click.echo(f"Dask dashboard: {client.dask_client.dashboard_link}")
    click.echo("Press Ctrl-C to stop.", err=True)
    try:
        _wait(stop, duration)
    finally:
        client.shutdown()
        client.dask_client.close()
        cluster = client.dask_client.cluster
        if cluster is not None:
            cluster.close()


@main.command()
@click.option("--scheduler", "address", default=None,
              help="Scheduler address; without it a local cluster is started.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--location", default="HeadOnly", show_default=True,
              type=click.Choice(["HeadOnly", "EveryNode", "NoServer"]))
def start(address: str | None, host: str, port: int, location: str) -> None:
    """Install daskserve on a cluster's scheduler (or on a new local cluster)."""
    import daskserve as serve
    from distributed import Client

    stop = _stop_signal()
    dask_client = Client(address) if address else _local_client(workers=2, threads=1)
    client = serve.start(dask_client, http_options={"host": host, "port": port,
                                                    "location": location})
    click.echo(json.dumps(client.info(), indent=2, default=str))
    if address is None:
        click.echo(f"local scheduler: {dask_client.scheduler.address}; Ctrl-C or SIGTERM "
                   f"stops it once the requests in progress are answered")
        _wait(stop, None)
        client.shutdown()  # drains: proxies finish their requests before closing
        dask_client.close()
        dask_client.cluster.close()
    else:
        dask_client.close()


def _connect(address: str) -> Any:
    import daskserve as serve
    from distributed import Client

    return serve.connect(Client(address))


@main.command()
@click.option("--scheduler", "address", required=True, help="Scheduler address.")
def status(address: str) -> None:
    """Print proxies, backends and endpoints of a running instance as JSON."""
    client = _connect(address)
    report = {"instance": client.info(), "backends": client.list_backends(),
              "endpoints": client.list_endpoints()}
    click.echo(json.dumps(report, indent=2, default=repr))
    client.dask_client.close()


@main.command()
@click.option("--scheduler", "address", required=True, help="Scheduler address.")
def shutdown(address: str) -> None:
    """Remove every endpoint, backend, replica and proxy; the cluster keeps running."""
    client = _connect(address)
    client.shutdown()
    client.dask_client.close()
    click.echo("daskserve shut down")
if __name__ == "__main__":
    main()
