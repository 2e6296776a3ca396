"""daskserve on dask-jobqueue workers that are real SLURM jobs.

An HPC user's cluster manager, not daskserve, decides when workers come and go: a
``cluster.scale(n)`` cancels jobs with ``scancel`` while requests are in flight.
These tests run that against a real single-node SLURM (``ci/slurm.sh``) and count
every request, so a request stranded by a job that went away shows up as a
failure. They skip, saying why, where no SLURM answers.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections import Counter

import cloudpickle
import pytest
import requests

import daskserve as serve
from daskserve.errors import ReplicaUnavailableError
from conftest import free_port, wait_until
from slurm_support import slurm_problem, squeue_jobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROBLEM = slurm_problem()
if PROBLEM:
    print(f"\ntest_slurm: skipped: {PROBLEM}", file=sys.stderr)
    pytestmark.append(pytest.mark.skip(reason=PROBLEM))

# Backends defined here travel by value: SLURM workers cannot import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 10        # a request that takes longer than this is counted as hung
START_TIMEOUT = 90  # safety limit for jobs to start and replicas to settle
THREADS = 4
MAX_REQUESTS_PER_THREAD = 5000  # bounds the load loop whatever the timing


class WhereAmI:
    """Says which SLURM job ran each request, and echoes what identifies it."""

    def __call__(self, request):
        return {"x": request.query_params["x"], "job": os.environ.get("SLURM_JOB_ID")}

    def echo(self, x):
        return {"x": x, "job": os.environ.get("SLURM_JOB_ID")}


def slurm_cluster(tmp_path, **options):
    from dask_jobqueue import SLURMCluster

    scheduler_options = {"dashboard_address": ":0", **options.pop("scheduler_options", {})}
    return SLURMCluster(cores=1, processes=1, memory="1GB", walltime="00:15:00",
                        interface="lo", log_directory=str(tmp_path),
                        scheduler_options=scheduler_options, **options)


def job_ids(cluster) -> set[str]:
    jobs = dict(cluster.workers)  # a copy: the cluster's event loop edits it
    return {job.job_id for job in jobs.values() if job.job_id}


def running_replicas(serve_client, backend="where") -> int:
    return serve_client.list_backends()[backend]["replicas"].get("running", 0)


def worker_count(dask_client) -> int:
    return len(dask_client.scheduler_info(n_workers=-1)["workers"])


def close_cluster(dask_client, cluster) -> set[str]:
    """Close everything; return the job ids the cluster had, to check squeue with."""
    jobs = job_ids(cluster)
    dask_client.close()
    cluster.close()
    return jobs


def assert_no_jobs_left(jobs: set[str]) -> None:
    # scancel returns before the jobs finish; they leave squeue within KillWait.
    wait_until(lambda: not squeue_jobs(jobs), timeout=60, interval=0.5,
               what=f"jobs {sorted(jobs)} to leave squeue")


def assert_no_lost_task_errors(caplog) -> None:
    gc.collect()  # "never retrieved" is reported when the task is collected
    bad = [r.getMessage() for r in caplog.records
           if "never retrieved" in r.getMessage() or "was destroyed but it is pending"
           in r.getMessage()]
    assert not bad, bad


class Load:
    """Threads sending requests (HTTP and handle calls in turn) and checking each answer.

    Every request has a client-side timeout, so a stranded one is counted as
    ``hung`` instead of blocking the test. ``unavailable`` are the 503s / errors the
    contract allows for requests that were executing on a replica whose worker died.
    """

    def __init__(self, url: str, handle, threads: int = THREADS):
        self.url, self.handle = url, handle
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.problems: list[str] = []
        self.jobs: Counter = Counter()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(threads)]

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(TIMEOUT * 3)
        assert not any(t.is_alive() for t in self.threads), "a load thread did not stop"

    def _record(self, outcome: str, problem: str | None = None, job: str | None = None):
        with self.lock:
            self.counts[outcome] += 1
            if problem:
                self.problems.append(problem)
            if job:
                self.jobs[job] += 1

    def _run(self, thread: int) -> None:
        session = requests.Session()
        method = self.handle.options(method_name="echo")
        for i in range(MAX_REQUESTS_PER_THREAD):
            if self.stop.is_set():
                return
            x = f"{thread}-{i}"
            if i % 2:
                self._http(session, x)
            else:
                self._call(method, x)

    def _http(self, session, x: str) -> None:
        try:
            reply = session.get(f"{self.url}/where", params={"x": x}, timeout=TIMEOUT)
        except requests.Timeout:
            return self._record("hung", f"HTTP x={x}: no answer in {TIMEOUT}s")
        except requests.RequestException as exc:
            return self._record("wrong", f"HTTP x={x}: {exc!r}")
        if reply.status_code == 200 and reply.json().get("x") == x:
            return self._record("ok", job=reply.json()["job"])
        if reply.status_code == 503 and "ReplicaUnavailableError" in reply.text:
            return self._record("unavailable")
        self._record("wrong", f"HTTP x={x}: {reply.status_code} {reply.text[:300]}")

    def _call(self, method, x: str) -> None:
        import concurrent.futures

        try:
            value = method.remote(x).result(timeout=TIMEOUT)
        except concurrent.futures.TimeoutError:
            return self._record("hung", f"handle x={x}: no answer in {TIMEOUT}s")
        except ReplicaUnavailableError:
            return self._record("unavailable")
        except Exception as exc:
            return self._record("wrong", f"handle x={x}: {exc!r}")
        if value.get("x") == x:
            return self._record("ok", job=value["job"])
        self._record("wrong", f"handle x={x}: {value!r}")

    def wait_for_answers(self, count: int) -> None:
        """Let at least ``count`` more requests finish, so each phase sees traffic."""
        target = sum(self.counts.values()) + count
        wait_until(lambda: sum(self.counts.values()) >= target or
                   not any(t.is_alive() for t in self.threads),
                   timeout=START_TIMEOUT, what=f"{count} more answers")


def scale_and_settle(cluster, dask_client, serve_client, jobs: int) -> None:
    cluster.scale(jobs)
    wait_until(lambda: worker_count(dask_client) == jobs and len(cluster.workers) == jobs,
               timeout=START_TIMEOUT, interval=0.2, what=f"{jobs} SLURM workers")
    wait_until(lambda: running_replicas(serve_client) == 2 and
               serve_client.list_backends()["where"]["status"] == "RUNNING",
               timeout=START_TIMEOUT, interval=0.2,
               what=f"both replicas running on {jobs} worker(s)")


def deploy(serve_client) -> None:
    # Half a CPU each, so both replicas fit on the one one-core job left after
    # scaling down to a single job.
    serve_client.create_backend("where", WhereAmI, config={"num_replicas": 2},
                                replica_options={"num_cpus": 0.5})
    serve_client.create_endpoint("where", backend="where", route="/where")


def test_serve_start_on_slurm_cluster_survives_scaling(tmp_path, caplog):
    from distributed import Client

    caplog.set_level(logging.WARNING)
    port = free_port()
    cluster = slurm_cluster(tmp_path)
    dask_client = Client(cluster)
    jobs_seen: set[str] = set()
    try:
        cluster.scale(2)
        dask_client.wait_for_workers(2, timeout=START_TIMEOUT)
        serve_client = serve.start(dask_client, http_options={"port": port})
        deploy(serve_client)
        url = f"http://127.0.0.1:{port}"
        handle = serve_client.get_handle("where")

        # Each replica runs inside its own SLURM job and sees that job's id.
        first_jobs = job_ids(cluster)
        assert len(first_jobs) == 2
        seen = {handle.options(method_name="echo").remote(i).result(timeout=TIMEOUT)["job"]
                for i in range(40)}
        seen |= {requests.get(f"{url}/where", params={"x": i}, timeout=TIMEOUT).json()["job"]
                 for i in range(40)}
        assert seen == first_jobs

        with Load(url, handle) as load:
            load.wait_for_answers(100)
            for jobs in (3, 1, 2):
                jobs_seen |= job_ids(cluster)
                scale_and_settle(cluster, dask_client, serve_client, jobs)
                if jobs == 1:
                    # Both replicas moved to the one job left and answer from there.
                    (only_job,) = job_ids(cluster)
                    replies = {handle.options(method_name="echo").remote(i)
                               .result(timeout=TIMEOUT)["job"] for i in range(20)}
                    assert replies == {only_job}
                load.wait_for_answers(100)
            jobs_seen |= job_ids(cluster)
            # Every scaling step happened under load, none after it ran out.
            assert all(t.is_alive() for t in load.threads), "raise MAX_REQUESTS_PER_THREAD"

        counts = load.counts
        print(f"\nrequests: {dict(counts)}; answered by jobs {dict(load.jobs)}")
        assert counts["hung"] == 0 and counts["wrong"] == 0, load.problems[:20]
        # Only a request already on its way to a replica whose job was cancelled
        # may fail (503 / ReplicaUnavailableError): each load thread has one request
        # in flight at a time, and scaling from 3 jobs to 1 cancels two.
        assert counts["unavailable"] <= THREADS * 2, dict(counts)
        assert counts["ok"] >= 400
        serve_client.shutdown()
    finally:
        jobs_seen |= close_cluster(dask_client, cluster)
    assert_no_jobs_left(jobs_seen)
    assert_no_lost_task_errors(caplog)


def test_adaptive_jobqueue_cluster_follows_the_replicas(tmp_path, caplog):
    """``cluster.adapt`` on SLURM: jobs start for replicas that fit nowhere and are
    cancelled once the replicas are gone, with no request lost on the way."""
    from distributed import Client

    caplog.set_level(logging.WARNING)
    port = free_port()
    cluster = slurm_cluster(tmp_path)
    dask_client = Client(cluster)
    jobs_seen: set[str] = set()
    try:
        cluster.adapt(minimum=1, maximum=3, interval="500ms", wait_count=2)
        dask_client.wait_for_workers(1, timeout=START_TIMEOUT)
        serve_client = serve.start(dask_client, http_options={"port": port})
        # One CPU each and one core per job: a job per replica.
        serve_client.create_backend("where", WhereAmI, config={"num_replicas": 3})
        serve_client.create_endpoint("where", backend="where", route="/where")
        handle = serve_client.get_handle("where")
        with Load(f"http://127.0.0.1:{port}", handle) as load:
            wait_until(lambda: running_replicas(serve_client) == 3 and
                       worker_count(dask_client) == 3, timeout=START_TIMEOUT,
                       interval=0.2, what="3 replicas on 3 SLURM jobs")
            jobs_seen |= job_ids(cluster)
            load.wait_for_answers(100)
            serve_client.update_backend_config("where", {"num_replicas": 1})
            wait_until(lambda: worker_count(dask_client) == 1 and
                       len(job_ids(cluster)) == 1, timeout=START_TIMEOUT, interval=0.2,
                       what="the adaptive cluster to shrink to 1 job")
            load.wait_for_answers(100)
            assert all(t.is_alive() for t in load.threads), "raise MAX_REQUESTS_PER_THREAD"
        (only_job,) = job_ids(cluster)
        assert load.jobs[only_job] > 0 and len(jobs_seen) == 3
        counts = load.counts
        print(f"\nrequests: {dict(counts)}; answered by jobs {dict(load.jobs)}")
        # Replicas left only by draining: nothing may fail, not even as unavailable.
        assert counts["hung"] == counts["wrong"] == counts["unavailable"] == 0, \
            (dict(counts), load.problems[:20])
        serve_client.shutdown()
    finally:
        jobs_seen |= close_cluster(dask_client, cluster)
    assert_no_jobs_left(jobs_seen)
    assert_no_lost_task_errors(caplog)


def test_preload_in_jobqueue_scheduler_options(tmp_path, caplog):
    from distributed import Client

    caplog.set_level(logging.WARNING)
    port = free_port()
    # The controller and its proxy start with the scheduler, before any client.
    cluster = slurm_cluster(tmp_path, scheduler_options={
        "preload": ["scheduler_plugin"],
        "preload_argv": [["--serve-http-port", str(port)]]})
    dask_client = Client(cluster)
    try:
        assert requests.get(f"http://127.0.0.1:{port}/-/routes", timeout=TIMEOUT).json() == {}
        cluster.scale(2)
        dask_client.wait_for_workers(2, timeout=START_TIMEOUT)
        serve_client = serve.connect(dask_client)
        deploy(serve_client)
        url = f"http://127.0.0.1:{port}/where"
        jobs = {requests.get(url, params={"x": i}, timeout=TIMEOUT).json()["job"]
                for i in range(40)}
        assert jobs == job_ids(cluster)
        handle = serve_client.get_handle("where").options(method_name="echo")
        assert handle.remote("h").result(timeout=TIMEOUT)["x"] == "h"
        serve_client.shutdown()
    finally:
        jobs = close_cluster(dask_client, cluster)
    assert_no_jobs_left(jobs)
    assert_no_lost_task_errors(caplog)


def test_cli_start_cluster_slurm_runs_until_sigterm(tmp_path):
    """``daskserve start --cluster slurm``: jobs, controller and proxy from one
    command; ``status`` lists the jobs; SIGTERM cancels them all."""
    from distributed import Client

    port = free_port()
    # What an HPC user keeps in jobqueue.yaml, given here through Dask's environment.
    env = {**os.environ, "DASK_JOBQUEUE__SLURM__INTERFACE": "lo",
           "DASK_JOBQUEUE__SLURM__WALLTIME": "00:15:00",
           "DASK_JOBQUEUE__SLURM__SCHEDULER_OPTIONS": "{'dashboard_address': ':0'}"}
    out, err = tmp_path / "start.out", tmp_path / "start.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "daskserve.cli", "start", "--cluster", "slurm",
             "--jobs", "2", "--cores", "1", "--memory", "1GB", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=stdout, stderr=stderr, text=True)
    jobs: list[str] = []
    try:
        def scheduler_address():
            assert server.poll() is None, err.read_text()[-3000:]
            lines = [l for l in out.read_text().splitlines() if l.startswith("scheduler: ")]
            return lines[0].split(": ", 1)[1] if lines else None

        address = wait_until(scheduler_address, timeout=START_TIMEOUT, interval=0.2,
                             what="the scheduler address on stdout")
        wait_until(lambda: _healthy(port), timeout=START_TIMEOUT, interval=0.2,
                   what="the proxy")

        def running_jobs():
            done = subprocess.run([sys.executable, "-m", "daskserve.cli", "status",
                                   "--scheduler", address], capture_output=True,
                                  text=True, timeout=60)
            assert done.returncode == 0, done.stderr[-3000:]
            listed = json.loads(done.stdout).get("slurm_jobs", [])
            ok = len(listed) == 2 and all(j["state"] == "RUNNING" for j in listed)
            return listed if ok else None

        listed = wait_until(running_jobs, timeout=START_TIMEOUT, interval=0.5,
                            what="status to list 2 running SLURM jobs")
        jobs = [j["job_id"] for j in listed]
        assert set(squeue_jobs(jobs)) == set(jobs)

        with Client(address, timeout=START_TIMEOUT) as dask_client:
            dask_client.wait_for_workers(2, timeout=START_TIMEOUT)
            serve_client = serve.connect(dask_client)
            deploy(serve_client)
            reply = requests.get(f"http://127.0.0.1:{port}/where", params={"x": "cli"},
                                 timeout=TIMEOUT).json()
            assert reply["x"] == "cli" and reply["job"] in jobs

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0, err.read_text()[-3000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
    assert_no_jobs_left(set(jobs))
    assert "never retrieved" not in err.read_text(), err.read_text()[-3000:]


def _healthy(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/-/healthz", timeout=5).ok
    except requests.ConnectionError:
        return False
