"""Every example runs as a user would run it: a fresh process with its own cluster."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import free_port, wait_until
from slurm_support import slurm_problem, squeue_jobs
from test_gpu import gpu_problem

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

EXPECTED = {
    "quickstart_function.py": ["{'you_sent': 'hi'}"],
    "quickstart_class.py": ["{'count': 101}", "{'count': 103}", "peek via handle: 103"],
    "scaling.py": ["num_replicas=4: served by 4 replica(s)",
                   "num_replicas=1: served by 1 replica(s)", "{'running': 1}"],
    "reconfigure.py": ["'threshold': 0.2, 'accept': True",
                       "'threshold': 0.9, 'accept': False"],
    "gpu_placement.py": ["model_a RUNNING", "model_b RUNNING", "model_c PENDING",
                         "'backend': 'model_a'"],
    "composition.py": ["{'x': 3.0, 'scores': [7.0, 9.0], 'mean': 8.0}"],
    "custom_metric.py": [
        "classifier_predictions_total{backend=classifier,label=cat,model_version=v1,"
        "replica=classifier#...} 2.0",
        "classifier_predictions_total{backend=classifier,label=dog,model_version=v1,"
        "replica=classifier#...} 1.0",
        "classifier_score_count{backend=classifier,replica=classifier#...} 3.0",
        "classifier_threshold{backend=classifier,replica=classifier#...} 0.5",
        "serve_backend_request_counter_total{backend=classifier,replica=classifier#...} 3.0"],
    "autoscaling.py": ["under load: 3 replicas on 3 workers",
                       "after the load: 1 replica on 1 worker", "failed requests: 0"],
    "batch_scoring.py": ["{'species': 'setosa'}", "scored 200000 rows in 8 partitions",
                         ", failed: 0", "batch results match the model run locally: True"],
    "slurm_jobqueue.py": ["{'y': 6.0}", "replicas answer from 2 SLURM job(s)",
                          "after scale(jobs=1): replicas answer from 1 SLURM job(s)",
                          "{'running': 2}"],
    "conflicting_dependencies.py": ["workers can import six: False",
                                    "/six116 over HTTP: 1.16.0", "six116 via a handle: 1.16.0",
                                    "/six117 over HTTP: 1.17.0", "six117 via a handle: 1.17.0"],
    "local_cuda_cluster.py": ["worker(s), one per GPU", "over HTTP: replica whole#",
                              "whole: each replica has a GPU of its own: True",
                              "shared: each GPU serves two half-GPU replicas: True"],
}
NEEDS_SLURM = {"slurm_jobqueue.py"}
NEEDS_GPU = {"local_cuda_cluster.py"}


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name, tmp_path):
    slurm = name in NEEDS_SLURM
    if slurm and slurm_problem():
        pytest.skip(slurm_problem())
    if name in NEEDS_GPU and gpu_problem():
        pytest.skip(gpu_problem())
    jobs_before = set(squeue_jobs()) if slurm else set()
    env = {**os.environ, "DASKSERVE_PORT": str(free_port())}
    # SLURM writes its jobs' output files into the working directory.
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], env=env,
                          cwd=tmp_path if slurm else None,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    for line in EXPECTED[name]:
        assert line in done.stdout, f"{line!r} missing from:\n{done.stdout}"
    if slurm:  # the example cancelled every job it started
        wait_until(lambda: not set(squeue_jobs()) - jobs_before, timeout=60,
                   what="the example's SLURM jobs to leave squeue")


@pytest.mark.slow
def test_demo_command_serves_until_stopped():
    port = free_port()
    demo = subprocess.Popen([sys.executable, "-m", "daskserve.cli", "demo", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        reply = None
        while reply is None or reply.status_code == 404:
            # Connection refused until the proxy listens, 404 until the endpoint exists.
            assert demo.poll() is None, demo.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "demo never started serving"
            time.sleep(0.2)
            try:
                reply = requests.get(f"http://127.0.0.1:{port}/greet?name=dask", timeout=5)
            except requests.ConnectionError:
                reply = None
        assert reply.json() == {"message": "hello, dask!", "method": "GET"}
        demo.send_signal(signal.SIGTERM)
        out, err = demo.communicate(timeout=120)
        assert demo.returncode == 0, err[-3000:]
        assert f"curl 'http://127.0.0.1:{port}/greet?name=dask'" in out
    finally:
        if demo.poll() is None:
            demo.kill()


@pytest.mark.parametrize("command", ["demo", "start", "status", "shutdown"])
def test_cli_subcommands_have_help(command):
    done = subprocess.run([sys.executable, "-m", "daskserve.cli", command, "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Usage:" in done.stdout
