"""Restart from a checkpoint: the store itself, the controller around it, and a
scheduler and worker killed with SIGKILL and replaced by new processes."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import cloudpickle
import msgpack
import pytest
import requests

import daskserve as serve
from conftest import free_port, wait_until
from importable_backend import ConfiguredGreeter
from scheduler_plugin import checkpoint
from scheduler_plugin.checkpoint import CheckpointError
from scheduler_plugin.state import DesiredState

TIMEOUT = 30
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def wire_config(**fields):
    config = {"num_replicas": 1, "max_batch_size": None, "batch_wait_timeout": 0.0,
              "max_concurrent_queries": 100, "user_config": b"\x80\x05N."}
    config.update(fields)
    return config


def sample_state() -> DesiredState:
    state = DesiredState()
    state.add_backend("a", b"\x00code-a\xff", wire_config(num_replicas=2),
                      {"num_cpus": 0.5, "num_gpus": 0, "resources": {"ssd": 1.0},
                       "env_vars": {"MODEL": "x"}})
    state.add_backend("b", b"code-b", wire_config(user_config=b"\x80\x04\x95pickled"),
                      {"num_cpus": 1, "num_gpus": 0.25, "resources": {}, "env_vars": {}})
    state.add_backend("c", b"code-c", wire_config(max_batch_size=4, batch_wait_timeout=0.01),
                      {"num_cpus": 1, "num_gpus": 0, "resources": {}, "env_vars": {}})
    state.add_endpoint("http", "a", "/predict", ["GET", "POST"])
    state.set_traffic("http", {"a": 0.7, "b": 0.3})
    state.set_shadow("http", "c", 0.1)
    state.add_endpoint("handle-only", "b", None, ["GET"])
    state.add_endpoint("no-backend-yet", None, "/later", ["PUT"])
    return state


def leftovers(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


# -- the store --------------------------------------------------------------------------
def test_round_trip_keeps_everything_including_version(tmp_path):
    path = tmp_path / "serve.ckpt"
    state = sample_state()
    checkpoint.save(path, state)
    restored = checkpoint.load(path)
    assert restored == state  # dataclass equality: every backend, endpoint and the version
    assert restored.version == state.version == 8
    assert restored.backends["a"].code == b"\x00code-a\xff"
    assert isinstance(restored.backends["b"].config["user_config"], bytes)
    assert list(restored.endpoints) == ["http", "handle-only", "no-backend-yet"]
    # Plain msgpack with its format marked, owner-only (it holds code workers run).
    document = msgpack.unpackb(path.read_bytes())
    assert document["format"] == "daskserve-checkpoint"
    assert document["format_version"] == checkpoint.FORMAT_VERSION
    assert document["state"]["version"] == 8
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert leftovers(tmp_path) == []


def test_restored_state_goes_on_counting_and_changing(tmp_path):
    path = tmp_path / "serve.ckpt"
    checkpoint.save(path, sample_state())
    restored = checkpoint.load(path)
    restored.set_traffic("http", {"c": 1.0})
    assert restored.version == 9
    with pytest.raises(ValueError, match="used by endpoint"):
        restored.remove_backend("c")  # the restored endpoints still guard their backends


def test_no_file_yet_is_no_state(tmp_path):
    assert checkpoint.load(tmp_path / "absent.ckpt") is None


def test_a_state_that_cannot_be_packed_leaves_the_old_file(tmp_path):
    path = tmp_path / "serve.ckpt"
    checkpoint.save(path, sample_state())
    before = path.read_bytes()
    broken = sample_state()
    broken.backends["a"].replica_options["resources"] = {"ssd": object()}
    with pytest.raises(CheckpointError, match="cannot be stored"):
        checkpoint.save(path, broken)
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_a_write_failing_midway_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "serve.ckpt"
    checkpoint.save(path, sample_state())
    before = path.read_bytes()
    bigger = sample_state()
    bigger.add_backend("d", b"x" * 1_000_000, wire_config(),
                       {"num_cpus": 1, "num_gpus": 0, "resources": {}, "env_vars": {}})

    def disk_full(fd):  # the new bytes are written, then the disk gives up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {re.escape(str(path))}.*No space"):
        checkpoint.save(path, bigger)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert checkpoint.load(path) == sample_state()
    assert leftovers(tmp_path) == []


def test_a_missing_directory_is_not_created(tmp_path):
    path = tmp_path / "not-mounted" / "serve.ckpt"
    with pytest.raises(CheckpointError, match="directory .*not-mounted does not exist"):
        checkpoint.save(path, DesiredState())
    assert not path.parent.exists()


def _document(**changes) -> dict:
    document = msgpack.unpackb(checkpoint.pack(sample_state()))
    document.update(changes)
    return document


def _packed(document) -> bytes:
    return msgpack.packb(document, use_bin_type=True)


def _without_endpoints() -> bytes:
    document = _document()
    del document["state"]["endpoints"]
    return _packed(document)


def _traffic_to(backend: str) -> bytes:
    document = _document()
    document["state"]["endpoints"][0]["traffic"] = {backend: 1.0}
    return _packed(document)


CORRUPT = {
    "garbage": (lambda: b"\xc1 this is not msgpack", "not valid msgpack"),
    "empty": (lambda: b"", "not valid msgpack"),
    "truncated": (lambda: checkpoint.pack(sample_state())[:-20], "not valid msgpack"),
    "other msgpack": (lambda: _packed([1, 2, 3]), "not a daskserve checkpoint"),
    "newer format": (lambda: _packed(_document(format_version=99)),
                     "format version 99, written by a newer daskserve"),
    "missing field": (_without_endpoints, "missing field 'endpoints'"),
    "invalid state": (lambda: _traffic_to("nonexistent"),
                      "cannot restore: backend 'nonexistent' does not exist"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_a_corrupt_checkpoint_is_refused_naming_path_and_problem(tmp_path, kind):
    make, problem = CORRUPT[kind]
    path = tmp_path / "serve.ckpt"
    path.write_bytes(make())
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(path)
    assert str(path) in str(error.value)
    assert problem in str(error.value)


def test_a_directory_at_the_path_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {re.escape(str(tmp_path))}: Is a directory"):
        checkpoint.load(tmp_path)


# -- the controller, through serve.start ------------------------------------------------------
def hello(request):
    return "hello"


def double(x):
    return 2 * x


def _plugin_installed(dask_scheduler=None) -> bool:
    return "daskserve" in dask_scheduler.plugins


def test_every_change_is_stored_and_a_new_controller_serves_it(dask_client, tmp_path):
    path = tmp_path / "serve.ckpt"
    port = free_port()
    client = serve.start(dask_client, http_options={"port": port}, checkpoint_path=path)
    try:
        assert client.info()["checkpoint_path"] == str(path)
        assert checkpoint.load(path) == DesiredState()  # written at start: it is writable
        client.create_backend("hello", hello)
        assert set(checkpoint.load(path).backends) == {"hello"}
        client.create_backend("double", double, config={"max_concurrent_queries": 7})
        client.create_endpoint("hello", backend="hello", route="/hello")
        client.create_endpoint("double", backend="double")
        client.set_traffic("hello", {"hello": 0.5, "double": 0.5})
        client.set_traffic("hello", {"hello": 1.0})
        client.shadow_traffic("hello", "double", 0.2)
        stored = checkpoint.load(path)
        assert stored.endpoints["hello"].shadows == {"double": 0.2}
        assert stored.backends["double"].config["max_concurrent_queries"] == 7
        failed = stored.version
        with pytest.raises(ValueError):
            client.set_traffic("hello", {"nope": 1.0})
        assert checkpoint.load(path).version == failed  # a refused change changes nothing
        endpoints, backends = client.list_endpoints(), client.list_backends()
        kept = tmp_path / "kept.ckpt"
        shutil.copy(path, kept)
    finally:
        client.shutdown()
    # An explicit shutdown is a change like any other: a restart would start empty.
    assert checkpoint.load(path).backends == {}

    again = serve.start(dask_client, http_options={"port": port}, checkpoint_path=kept)
    try:
        assert again.list_endpoints() == endpoints  # with no call from the user
        restored = again.list_backends()
        assert {tag: {k: v for k, v in entry.items() if k not in ("replicas", "status")}
                for tag, entry in restored.items()} == \
               {tag: {k: v for k, v in entry.items() if k not in ("replicas", "status")}
                for tag, entry in backends.items()}
        wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/hello",
                                        timeout=TIMEOUT).status_code == 200,
                   timeout=TIMEOUT, what="restored route answering")
        assert requests.get(f"http://127.0.0.1:{port}/hello", timeout=TIMEOUT).text == "hello"
        assert again.get_handle("double").remote(21).result(timeout=TIMEOUT) == 42
        assert checkpoint.load(kept).version == failed  # restoring is not a change
    finally:
        again.shutdown()


def test_restored_replicas_that_fit_nowhere_are_pending_with_the_reason(dask_client,
                                                                        tmp_path):
    path = tmp_path / "serve.ckpt"
    state = DesiredState()
    state.add_backend("on-tpu", cloudpickle.dumps((double, ())), wire_config(),
                      {"num_cpus": 1, "num_gpus": 0, "resources": {"TPU": 1},
                       "env_vars": {}})
    state.add_endpoint("on-tpu", "on-tpu", "/tpu", ["GET"])
    checkpoint.save(path, state)
    port = free_port()
    client = serve.start(dask_client, http_options={"port": port}, checkpoint_path=path)
    try:
        entry = client.list_backends()["on-tpu"]
        assert entry["status"] == "PENDING"
        assert "TPU" in entry["pending_reason"]
        assert requests.get(f"http://127.0.0.1:{port}/-/routes",
                            timeout=TIMEOUT).json() == {"/tpu": "on-tpu"}
    finally:
        client.shutdown()


def test_a_closing_scheduler_leaves_the_checkpoint_as_it_was(tmp_path):
    from distributed import Client, LocalCluster

    path = tmp_path / "serve.ckpt"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as dask_client:
        client = serve.start(dask_client, http_options={"location": "NoServer"},
                             checkpoint_path=path)
        client.create_backend("double", double)
        client.create_endpoint("double", backend="double")
        stored = checkpoint.load(path)
    # Closing the scheduler tears the instance down, but that is no user's change.
    assert checkpoint.load(path) == stored
    assert set(stored.backends) == {"double"} and set(stored.endpoints) == {"double"}


def test_cli_start_takes_a_checkpoint_path(dask_client, tmp_path):
    path = tmp_path / "serve.ckpt"
    done = subprocess.run(
        [sys.executable, "-m", "daskserve.cli", "start", "--scheduler",
         dask_client.scheduler.address, "--location", "NoServer",
         "--checkpoint-path", str(path)],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    client = serve.connect(dask_client)
    try:
        assert client.info()["checkpoint_path"] == str(path)
        client.create_backend("double", double)
        assert set(checkpoint.load(path).backends) == {"double"}
    finally:
        client.shutdown()


def test_a_corrupt_checkpoint_stops_serve_start(dask_client, tmp_path):
    path = tmp_path / "serve.ckpt"
    path.write_bytes(b"\x00half a file")
    with pytest.raises(CheckpointError, match=f"checkpoint {re.escape(str(path))} is corrupt"):
        serve.start(dask_client, http_options={"port": free_port()}, checkpoint_path=path)
    assert not dask_client.run_on_scheduler(_plugin_installed)
    assert path.read_bytes() == b"\x00half a file"  # left for the operator to inspect


def test_a_missing_directory_stops_serve_start(dask_client, tmp_path):
    path = tmp_path / "missing" / "serve.ckpt"
    with pytest.raises(CheckpointError, match="missing does not exist"):
        serve.start(dask_client, http_options={"port": free_port()}, checkpoint_path=path)
    assert not dask_client.run_on_scheduler(_plugin_installed)


def test_start_with_another_checkpoint_path_names_both(dask_client, tmp_path):
    first = tmp_path / "first.ckpt"
    client = serve.start(dask_client, http_options={"port": free_port()},
                         checkpoint_path=first)
    try:
        with pytest.raises(ValueError) as error:
            serve.start(dask_client, checkpoint_path=tmp_path / "second.ckpt")
        assert str(first) in str(error.value)
        assert str(tmp_path / "second.ckpt") in str(error.value)
        assert not (tmp_path / "second.ckpt").exists()
        # The same file, however it is spelled, attaches; no path attaches too.
        same = serve.start(dask_client, checkpoint_path=tmp_path / "x" / ".." / "first.ckpt")
        assert same.info()["checkpoint_path"] == str(first)
        serve.start(dask_client)
    finally:
        client.shutdown()

    client = serve.start(dask_client, http_options={"port": free_port()})
    try:
        with pytest.raises(ValueError, match=re.escape(
                f"without a checkpoint_path, not checkpoint_path '{first}'")):
            serve.start(dask_client, checkpoint_path=first)
    finally:
        client.shutdown()


def test_a_change_that_cannot_be_stored_says_so_and_the_next_one_stores_it(dask_client,
                                                                          tmp_path):
    directory = tmp_path / "state"
    directory.mkdir()
    path = directory / "serve.ckpt"
    client = serve.start(dask_client, http_options={"location": "NoServer"},
                         checkpoint_path=path)
    try:
        client.create_backend("double", double)
        shutil.rmtree(directory)  # the filesystem went away
        with pytest.raises(CheckpointError, match="the change is live, but a restarted"):
            client.create_endpoint("double", backend="double")
        assert "double" in client.list_endpoints()  # served all the same
        assert client.get_handle("double").remote(4).result(timeout=TIMEOUT) == 8
        directory.mkdir()
        client.shadow_traffic("double", "double", 0.5)
        assert set(checkpoint.load(path).endpoints) == {"double"}
    finally:
        client.shutdown()


# -- real processes ---------------------------------------------------------------------------
class Processes:
    """Scheduler and worker subprocesses with their logs, killed at the end whatever happens."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.running: list[tuple[subprocess.Popen, object]] = []
        # Workers import importable_backend by name, as the pickled class refers to it.
        python_path = os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")]))
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path}

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.tmp_path / f"{name}.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                env=self.env)
        self.running.append((proc, log))
        return proc

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def scheduler(self, name: str, http_port: int, checkpoint_path) -> tuple:
        scheduler_file = self.tmp_path / f"{name}.json"
        proc = self.spawn(name, [
            sys.executable, "-m", "distributed.cli.dask_scheduler",
            "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
            "--scheduler-file", str(scheduler_file), "--preload", "scheduler_plugin",
            "--serve-http-port", str(http_port),
            "--serve-checkpoint-path", str(checkpoint_path)])

        def address():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited:\n{self.log(name)[-3000:]}")
            if scheduler_file.exists() and scheduler_file.stat().st_size > 0:
                return json.loads(scheduler_file.read_text())["address"]
            return None

        return proc, address

    def worker(self, name: str, address: str) -> subprocess.Popen:
        # No nanny: SIGKILL then reaches the process that hosts the replicas.
        return self.spawn(name, [
            sys.executable, "-m", "distributed.cli.dask_worker", address,
            "--nthreads", "4", "--no-nanny", "--no-dashboard", "--host", "127.0.0.1"])

    def close(self) -> None:
        for proc, log in reversed(self.running):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=15)
            log.close()


def _get(url: str, **params):
    try:
        return requests.get(url, params=params, timeout=TIMEOUT)
    except requests.ConnectionError:
        return None


def _port_refuses(port: int) -> bool:
    return _get(f"http://127.0.0.1:{port}/-/healthz") is None


def _without_runtime(backends: dict) -> dict:
    return {tag: {k: v for k, v in entry.items()
                  if k not in ("replicas", "status", "pending_reason", "last_error")}
            for tag, entry in backends.items()}


@pytest.mark.slow
def test_sigkilled_scheduler_and_worker_serve_again_from_the_checkpoint(tmp_path):
    from distributed import Client

    http_port = free_port()
    path = tmp_path / "serve.ckpt"
    base_url = f"http://127.0.0.1:{http_port}"
    procs = Processes(tmp_path)
    try:
        scheduler, address = procs.scheduler("scheduler-1", http_port, path)
        worker = procs.worker("worker-1", wait_until(address, what="first scheduler"))

        def shout(who):  # defined here, so it travels by value: no module needed
            if hasattr(who, "query_params"):
                who = who.query_params.get("name", "world")
            return f"{who.upper()}!"

        def quiet(request):
            return "never seen"

        with Client(address(), timeout=TIMEOUT, set_as_default=False) as dask_client:
            dask_client.wait_for_workers(1, timeout=60)
            client = serve.connect(dask_client)
            client.create_backend("greeter", ConfiguredGreeter, "hi",
                                  config={"user_config": {"punctuation": "?"}})
            client.create_backend("shout", shout)
            client.create_backend("quiet", quiet, replica_options={"num_cpus": 0.5})
            client.create_endpoint("greet", backend="greeter", route="/greet",
                                   methods=["GET", "POST"])
            client.set_traffic("greet", {"greeter": 0.5, "shout": 0.5})
            client.shadow_traffic("greet", "quiet", 0.25)
            client.create_endpoint("loud", backend="shout")  # handle only
            assert client.get_handle("loud").remote("x").result(timeout=TIMEOUT) == "X!"
            endpoints = client.list_endpoints()
            backends = _without_runtime(client.list_backends())
        stored_version = checkpoint.load(path).version

        scheduler.send_signal(signal.SIGKILL)
        worker.send_signal(signal.SIGKILL)
        scheduler.wait(timeout=15)
        worker.wait(timeout=15)
        wait_until(lambda: _port_refuses(http_port), what="the killed proxy's port closing")

        started = time.monotonic()
        scheduler, address = procs.scheduler("scheduler-2", http_port, path)
        new_address = wait_until(address, what="second scheduler")

        def routes():
            address()  # fails at once, with its log, if the new scheduler died
            reply = _get(f"{base_url}/-/routes")
            return reply is not None and reply.status_code == 200 and reply.json()

        # The proxy routes the restored endpoints before any worker has joined.
        assert wait_until(routes, what="restored routes") == {"/greet": "greet"}
        routed = time.monotonic() - started
        procs.worker("worker-2", new_address)

        def answered():
            address()
            reply = _get(f"{base_url}/greet", name="again")
            return reply is not None and reply.status_code == 200 and reply.text

        first_answer = wait_until(answered, timeout=120, interval=0.02,
                                  what="HTTP answer from the restarted scheduler")
        elapsed = time.monotonic() - started
        print(f"\nrestart from checkpoint: routes served {routed:.2f} s and the first "
              f"HTTP 200 {elapsed:.2f} s after the new scheduler process started "
              f"(its worker started once the routes were up)")
        assert first_answer in ("hi, again?", "AGAIN!")

        with Client(address(), timeout=TIMEOUT, set_as_default=False) as dask_client:
            client = serve.connect(dask_client)
            assert client.list_endpoints() == endpoints
            assert _without_runtime(client.list_backends()) == backends
            assert client.get_backend_config("greeter").user_config == {"punctuation": "?"}
            assert client.info()["checkpoint_path"] == str(path)
            wait_until(lambda: all(b["status"] == "RUNNING"
                                   for b in client.list_backends().values()),
                       what="every restored backend running")
            assert client.get_handle("loud").remote("y").result(timeout=TIMEOUT) == "Y!"
            answers = {_get(f"{base_url}/greet", name="z").text for _ in range(40)}
            assert answers == {"hi, z?", "Z!"}  # the traffic split came back too
        assert checkpoint.load(path).version == stored_version  # nothing changed it
    finally:
        procs.close()


@pytest.mark.slow
def test_preloaded_scheduler_refuses_a_corrupt_checkpoint(tmp_path):
    path = tmp_path / "serve.ckpt"
    path.write_bytes(checkpoint.pack(sample_state())[:-7])
    procs = Processes(tmp_path)
    try:
        scheduler, _ = procs.scheduler("scheduler", free_port(), path)
        assert scheduler.wait(timeout=60) != 0
        log = procs.log("scheduler")
        assert f"checkpoint {path} is corrupt: it is not valid msgpack" in log
    finally:
        procs.close()
    assert path.read_bytes() == checkpoint.pack(sample_state())[:-7]
