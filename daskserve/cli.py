"""The ``daskserve`` command: demo, start, status, shutdown."""
from __future__ import annotations

import json
import signal
import threading
from typing import Any, Callable

import click


@click.group()
def main() -> None:
    """Serve Python models and business logic on a Dask cluster."""


def _local_client(workers: int, threads: int) -> Any:
    from distributed import Client

    from . import event_loop
    from .api import DASHBOARD_ADDRESS

    return Client(event_loop.local_cluster(n_workers=workers, threads_per_worker=threads,
                                           processes=True,
                                           dashboard_address=DASHBOARD_ADDRESS))


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
    click.echo(f"Serve page:     {client.dask_client.dashboard_link.rsplit('/', 1)[0]}/serve")
    click.echo(f"  metrics: curl http://{host}:{port}/-/metrics")
    click.echo("Press Ctrl-C to stop.", err=True)
    try:
        _wait(stop, duration)
    finally:
        client.shutdown()
        client.dask_client.close()
        cluster = client.dask_client.cluster
        if cluster is not None:
            cluster.close()


# -- SLURM through dask-jobqueue -----------------------------------------------------
JOBS_METADATA = "daskserve-slurm-jobs"  # where status finds the jobs of `start --cluster`


def _slurm_options(command: Callable) -> Callable:
    """``start --cluster slurm``: what an HPC user types; jobqueue's config file
    (queue, account, walltime, interface...) supplies the rest."""
    for option in reversed([
        click.option("--cluster", type=click.Choice(["slurm"]), default=None,
                     help="Start a SLURM cluster (dask-jobqueue) and serve on it, "
                          "in the foreground until Ctrl-C."),
        click.option("--jobs", type=click.IntRange(min=0), default=None,
                     help="SLURM jobs (Dask workers) to run, with --cluster slurm "
                          "[default: 1]."),
        click.option("--cores", type=click.IntRange(min=1), default=None,
                     help="Cores per job (default: dask-jobqueue's config)."),
        click.option("--memory", default=None,
                     help="Memory per job, e.g. 4GB (default: dask-jobqueue's config)."),
    ]):
        command = option(command)
    return command


def _start_slurm(host: str, port: int, location: str, checkpoint_path: str | None,
                 cluster: str, jobs: int | None, cores: int | None, memory: str | None
                 ) -> None:
    """Controller and proxy live in this process with the Dask scheduler; replicas in
    the jobs. Closing the cluster on the way out cancels every job it submitted."""
    import daskserve as serve
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    stop = _stop_signal()
    sizes = {k: v for k, v in {"cores": cores, "memory": memory}.items() if v is not None}
    slurm_cluster = SLURMCluster(**sizes)
    dask_client = Client(slurm_cluster)
    try:
        client = serve.start(dask_client, http_options={"host": host, "port": port,
                                                        "location": location},
                             checkpoint_path=checkpoint_path)
        slurm_cluster.scale(jobs=1 if jobs is None else jobs)
        click.echo(json.dumps(client.info(), indent=2, default=str))
        click.echo(f"scheduler: {dask_client.scheduler.address}")
        click.echo("Ctrl-C stops serving and cancels the SLURM jobs", err=True)
        _publish_jobs(stop, dask_client, slurm_cluster)
        if checkpoint_path is None:
            client.shutdown()  # with a checkpoint, the next start serves this state again
    finally:
        dask_client.close()
        slurm_cluster.close()


def _publish_jobs(stop: threading.Event, dask_client: Any, slurm_cluster: Any) -> None:
    """Keep the job list ``daskserve status`` shows current (jobs are submitted in the
    background and come and go with walltime) until Ctrl-C or SIGTERM."""
    published = None
    try:
        while not stop.is_set():
            workers = dict(slurm_cluster.workers)  # a copy: the cluster's loop edits it
            current = [{"name": name, "job_id": job.job_id}
                       for name, job in sorted(workers.items()) if job.job_id]
            if current != published:
                dask_client.set_metadata(JOBS_METADATA, current)
                published = current
            stop.wait(1.0)
    except KeyboardInterrupt:
        pass


def _job_states(jobs: list[dict]) -> list[dict]:
    """The published jobs with their state as squeue reports it, where it can."""
    import shutil
    import subprocess

    states: dict[str, str] = {}
    if jobs and shutil.which("squeue"):
        done = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j",
                               ",".join(j["job_id"] for j in jobs)],
                              capture_output=True, text=True, timeout=30)
        states = dict(line.split(None, 1) for line in done.stdout.splitlines()
                      if line.strip())
    return [{**j, "state": states.get(j["job_id"], "not in squeue")} for j in jobs]


@main.command()
@click.option("--scheduler", "address", default=None,
              help="Scheduler address; without it a local cluster is started.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--location", default="HeadOnly", show_default=True,
              type=click.Choice(["HeadOnly", "EveryNode", "NoServer"]))
@click.option("--checkpoint-path", default=None,
              help="File on the scheduler's host holding the serve state; restored "
                   "if present, rewritten after every change. Its directory must exist.")
@_slurm_options
def start(address: str | None, host: str, port: int, location: str,
          checkpoint_path: str | None, **slurm: Any) -> None:
    """Install daskserve on a cluster's scheduler (or on a new local or SLURM cluster)."""
    import daskserve as serve
    from distributed import Client

    if slurm["cluster"] == "slurm":
        if address:
            raise click.UsageError("--scheduler and --cluster slurm exclude each other")
        return _start_slurm(host, port, location, checkpoint_path, **slurm)
    if any(value is not None for value in slurm.values()):
        raise click.UsageError("--jobs, --cores and --memory go with --cluster slurm")
    stop = _stop_signal()
    dask_client = Client(address) if address else _local_client(workers=2, threads=1)
    client = serve.start(dask_client, http_options={"host": host, "port": port,
                                                    "location": location},
                         checkpoint_path=checkpoint_path)
    click.echo(json.dumps(client.info(), indent=2, default=str))
    if address is None:
        click.echo(f"local scheduler: {dask_client.scheduler.address}; Ctrl-C or SIGTERM "
                   f"stops it once the requests in progress are answered")
        _wait(stop, None)
        if checkpoint_path is None:
            client.shutdown()  # drains: proxies finish their requests before closing
        # With a checkpoint the state stays stored; closing the scheduler still drains.
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
    jobs = client.dask_client.get_metadata(JOBS_METADATA, None)
    if jobs is not None:  # started with `daskserve start --cluster slurm`
        report["slurm_jobs"] = _job_states(jobs)
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
