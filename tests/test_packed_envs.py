"""Packed environments: backends with conflicting dependencies on one cluster.

The venvs are made by the tests: the running interpreter's daskserve and distributed
(the cluster needs the same versions) plus one version of six, which the workers
themselves do not have. They are packed with venv-pack through ``PackedEnv``, shipped
as Dask data, unpacked once per host, and served from child processes.

Errors are checked where they are raised: ``PackedEnv`` (before anything is shipped)
or ``create_backend`` (what only a worker host can find out). The conda-pack path
runs where a ``conda`` executable exists.
"""
from __future__ import annotations

import fcntl
import importlib.util
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cloudpickle
import pytest
import requests
from distributed import Client, LocalCluster

import daskserve as serve
from conftest import free_port, wait_until
from daskserve.envs import cache, probe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from conflicting_dependencies import make_venv  # noqa: E402  (one recipe for both)

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.slow  # venvs and child processes: tens of seconds in all

TIMEOUT = 120


# -- backends (pickled by value; they import six in the env) --------------------------
class SixModel:
    def __init__(self, fail: bool = False):
        import six

        if fail:
            raise RuntimeError("this model refuses to load")
        self.version = six.__version__
        self.user_config = None

    def __call__(self, request=None):
        return self.version

    def reconfigure(self, user_config):
        self.user_config = user_config

    def info(self):
        return {"pid": os.getpid(), "prefix": sys.prefix, "version": self.version,
                "user_config": self.user_config,
                "replica": serve.get_replica_context().replica_tag}


class Composed:
    """Calls another endpoint through a handle made in its constructor."""

    def __init__(self):
        import six

        self.version = six.__version__
        self.plain = serve.get_handle("plain")

    def __call__(self, request=None):
        return [self.version, self.plain.remote().result()]


class BatchedSix:
    @serve.accept_batch
    def __call__(self, items):
        import six

        return [(six.__version__, item, len(items)) for item in items]


def plain(request=None):
    return "plain"


def has_six():
    return importlib.util.find_spec("six") is not None


# -- fixtures -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed-envs")
    saved = {k: os.environ.get(k) for k in ("DASKSERVE_PACK_CACHE", "DASKSERVE_ENV_CACHE")}
    os.environ["DASKSERVE_PACK_CACHE"] = str(root / "packs")
    os.environ["DASKSERVE_ENV_CACHE"] = str(root / "unpacked")  # workers inherit it
    yield root
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def six_envs(dirs):
    """``{"1.16.0": PackedEnv, "1.17.0": PackedEnv}``."""
    envs = {}
    for version in ("1.16.0", "1.17.0"):
        venv = make_venv(str(dirs / f"six-{version}"), f"six=={version}")
        envs[version] = serve.PackedEnv.from_venv(venv)
    return envs


@pytest.fixture(scope="module")
def cluster(dirs):
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        yield client


@pytest.fixture
def serving(cluster):
    port = free_port()
    client = serve.start(cluster, http_options={"port": port})
    client.port = port
    yield client
    client.shutdown()


def installs(env) -> list[str]:
    try:
        log = Path(cache.cache_root(), "installs.log").read_text()
    except FileNotFoundError:
        return []
    return [line for line in log.splitlines() if env.sha256 in line]


def chunks_in_cluster(dask_client, env) -> list[str]:
    keys = set(env.spec.keys())
    return dask_client.run_on_scheduler(
        lambda dask_scheduler: [k for k in dask_scheduler.tasks if k in keys])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- serving ----------------------------------------------------------------------------
def test_conflicting_versions_serve_side_by_side(cluster, serving, six_envs):
    assert not any(cluster.run(has_six).values()), "the workers must not have six"
    for version, env in six_envs.items():
        tag = "six" + version.replace(".", "")[:3]
        serving.create_backend(tag, SixModel, config={"num_replicas": 2},
                               replica_options={"env": env, "num_cpus": 0.5})
        serving.create_endpoint(tag, backend=tag, route=f"/{tag}")

    url = f"http://127.0.0.1:{serving.port}"
    handles = {tag: serving.get_handle(tag) for tag in ("six116", "six117")}
    expected = {"six116": "1.16.0", "six117": "1.17.0"}

    def over_http(tag):
        return tag, requests.get(f"{url}/{tag}", timeout=TIMEOUT).text

    def over_handle(tag):
        return tag, handles[tag].remote().result(timeout=TIMEOUT)

    calls = [(how, tag) for _ in range(10) for tag in expected
             for how in (over_http, over_handle)]
    with ThreadPoolExecutor(8) as pool:  # both backends, both paths, at the same time
        answers = list(pool.map(lambda c: c[0](c[1]), calls))
    assert answers == [(tag, expected[tag]) for _, tag in calls]

    # Two replicas of each, on two workers of this one host: unpacked once.
    for version, env in six_envs.items():
        assert len(installs(env)) == 1, installs(env)
    info = handles["six116"].options(method_name="info").remote().result(timeout=TIMEOUT)
    assert info["prefix"] == os.path.join(cache.cache_root(), six_envs["1.16.0"].spec.short)
    # Model composition from inside an env: serve.get_handle works there too.
    serving.create_backend("plain", plain, replica_options={"num_cpus": 0.5})
    serving.create_endpoint("plain", backend="plain")
    serving.create_backend("composed", Composed, replica_options={"env": six_envs["1.17.0"],
                                                                 "num_cpus": 0.5})
    serving.create_endpoint("composed", backend="composed", route="/composed")
    assert requests.get(f"{url}/composed", timeout=TIMEOUT).json() == ["1.17.0", "plain"]

    backends = serving.list_backends()
    assert backends["six116"]["replica_options"]["env"]["sha256"] == \
        six_envs["1.16.0"].sha256
    assert backends["six116"]["status"] == backends["six117"]["status"] == "RUNNING"


def test_scale_reconfigure_batch_and_drain(cluster, serving, six_envs):
    env = six_envs["1.17.0"]
    serving.create_backend("m", SixModel, config={"user_config": {"v": 1}},
                           replica_options={"env": env, "num_cpus": 0.5})
    serving.create_endpoint("m", backend="m")
    info = serving.get_handle("m").options(method_name="info")
    first = info.remote().result(timeout=TIMEOUT)
    assert first["user_config"] == {"v": 1} and first["version"] == "1.17.0"

    serving.update_backend_config("m", {"user_config": {"v": 2}})
    assert info.remote().result(timeout=TIMEOUT)["user_config"] == {"v": 2}

    # Scale up and back down while calls keep flowing: none fails, the drained
    # replica's process exits.
    stop = threading.Event()
    failures, seen = [], set()

    def load():
        while not stop.is_set():
            try:
                seen.add(info.remote().result(timeout=TIMEOUT)["pid"])
            except Exception as exc:  # noqa: BLE001 - every failure is reported
                failures.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        serving.update_backend_config("m", {"num_replicas": 2})
        wait_until(lambda: len(seen) >= 2, timeout=TIMEOUT, what="both replicas answering")
        serving.update_backend_config("m", {"num_replicas": 1})
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[:3]
    assert serving.list_backends()["m"]["replicas"] == {"running": 1}
    survivor = info.remote().result(timeout=TIMEOUT)["pid"]
    for pid in seen - {survivor}:
        wait_until(lambda: not alive(pid), timeout=30, what="the drained process to exit")

    serving.create_backend("batched", BatchedSix,
                           config={"max_batch_size": 4, "batch_wait_timeout": 0.5},
                           replica_options={"env": env, "num_cpus": 0.5})
    serving.create_endpoint("batched", backend="batched")
    handle = serving.get_handle("batched")
    futures = [handle.remote(i) for i in range(8)]
    results = [f.result(timeout=TIMEOUT) for f in futures]
    assert [(v, i) for v, i, _ in results] == [("1.17.0", i) for i in range(8)]
    assert max(size for _, _, size in results) > 1  # they were batched


def test_replica_process_that_dies_is_replaced(cluster, serving, six_envs):
    serving.create_backend("m", SixModel, replica_options={"env": six_envs["1.16.0"],
                                                             "num_cpus": 0.5})
    serving.create_endpoint("m", backend="m", route="/m")
    info = serving.get_handle("m").options(method_name="info")
    before = info.remote().result(timeout=TIMEOUT)

    os.kill(before["pid"], signal.SIGKILL)

    def replaced():
        try:
            after = info.remote().result(timeout=30)
        except Exception:  # noqa: BLE001 - the old replica is gone until replaced
            return None
        return after if after["pid"] != before["pid"] else None

    after = wait_until(replaced, timeout=TIMEOUT, what="a replacement replica")
    assert after["replica"] != before["replica"] and after["version"] == "1.16.0"
    reply = requests.get(f"http://127.0.0.1:{serving.port}/m", timeout=TIMEOUT)
    assert reply.text == "1.16.0"
    assert serving.list_backends()["m"]["status"] == "RUNNING"


def test_replica_process_dies_with_its_worker(dirs, six_envs):
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as lc, Client(lc) as dask_client:
        client = serve.start(dask_client, http_options={"port": free_port()})
        try:
            client.create_backend("m", SixModel,
                                  replica_options={"env": six_envs["1.16.0"]})
            client.create_endpoint("m", backend="m")
            child = client.get_handle("m").options(
                method_name="info").remote().result(timeout=TIMEOUT)["pid"]
            (worker_pid,) = dask_client.run(os.getpid).values()
            os.kill(worker_pid, signal.SIGKILL)
            wait_until(lambda: not alive(child), timeout=60,
                       what="the replica's process to exit with its worker")
        finally:
            client.shutdown()


def test_env_replicas_on_a_tls_cluster(dirs, six_envs):
    from distributed.security import Security

    security = Security.temporary()  # in-memory certificates reach the child too
    port = free_port()
    with LocalCluster(n_workers=1, threads_per_worker=1, security=security,
                      dashboard_address=":0") as lc, \
            Client(lc, security=security) as dask_client:
        client = serve.start(dask_client, http_options={"port": port})
        try:
            client.create_backend("m", SixModel, replica_options={"env": six_envs["1.17.0"]})
            client.create_endpoint("m", backend="m", route="/m")
            info = client.get_handle("m").options(method_name="info").remote().result(
                timeout=TIMEOUT)
            assert info["version"] == "1.17.0"
            assert requests.get(f"http://127.0.0.1:{port}/m", timeout=TIMEOUT).text == "1.17.0"
            routes = dask_client.run_on_scheduler(_replica_addresses)
            assert routes and all(a.startswith("tls://") for a in routes)
        finally:
            client.shutdown()


def _replica_addresses(dask_scheduler):
    controller = dask_scheduler.plugins["daskserve"]
    return [r["address"] for b in controller.table()["backends"].values()
            for r in b["replicas"]]


def test_env_is_removed_when_no_backend_uses_it(cluster, serving, six_envs):
    env = six_envs["1.16.0"]
    serving.create_backend("a", SixModel, replica_options={"env": env, "num_cpus": 0.5})
    serving.create_backend("b", SixModel, replica_options={"env": env, "num_cpus": 0.5})
    unpacked = Path(cache.cache_root(), env.spec.short)
    assert unpacked.is_dir() and chunks_in_cluster(cluster, env)

    assert list(serving.info()["envs"][env.spec.short]["backends"]) == ["a", "b"]
    serving.delete_backend("a")  # "b" still uses it
    assert unpacked.is_dir() and chunks_in_cluster(cluster, env)

    serving.delete_backend("b")
    assert not unpacked.exists()
    wait_until(lambda: not chunks_in_cluster(cluster, env), timeout=30,
               what="the archive's chunks to be released")

    # Used again later: shipped and unpacked again.
    serving.create_backend("c", SixModel, replica_options={"env": env, "num_cpus": 0.5})
    serving.create_endpoint("c", backend="c")
    assert serving.get_handle("c").remote().result(timeout=TIMEOUT) == "1.16.0"


def test_slow_unpack_blocks_no_api_call_nor_other_backend(cluster, serving, dirs):
    env = serve.PackedEnv.from_venv(make_venv(str(dirs / "plain-env")))
    root = Path(cache.cache_root())
    root.mkdir(parents=True, exist_ok=True)
    started = threading.Event()
    outcome = {}

    def create():
        started.set()
        try:
            serving_thread.create_backend("slow", plain, replica_options={"env": env})
            outcome["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    serving_thread = serve.connect(cluster)
    # Hold this host's lock on the env, as another worker unpacking it would.
    with open(root / f"{env.spec.short}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        creator = threading.Thread(target=create)
        creator.start()
        started.wait()
        wait_until(lambda: serving.list_backends().get("slow", {}).get("replicas")
                   == {"starting": 1}, timeout=TIMEOUT, what="the env replica to start")
        serving.create_backend("fast", plain, replica_options={"num_cpus": 0.5})
        serving.create_endpoint("fast", backend="fast")
        assert serving.get_handle("fast").remote().result(timeout=TIMEOUT) == "plain"
        assert serving.list_backends()["slow"]["status"] == "UPDATING"
        assert creator.is_alive()
        fcntl.flock(lock, fcntl.LOCK_UN)
    creator.join(TIMEOUT)
    assert outcome == {"ok": True}
    serving.create_endpoint("slow", backend="slow")
    assert serving.get_handle("slow").remote().result(timeout=TIMEOUT) == "plain"


# -- packing ------------------------------------------------------------------------------
def test_packing_is_cached_by_content(dirs):
    venv = make_venv(str(dirs / "cached-env"))
    first = serve.PackedEnv.from_venv(venv)
    stamp = os.stat(first.archive_path).st_mtime_ns
    again = serve.PackedEnv.from_venv(venv)
    assert again == first and again.archive_path == first.archive_path
    assert os.stat(again.archive_path).st_mtime_ns == stamp  # not packed again

    Path(venv, "lib", "extra.txt").write_text("a change")
    changed = serve.PackedEnv.from_venv(venv)
    assert changed.sha256 != first.sha256
    assert not os.path.exists(first.archive_path)  # the outdated archive is removed

    by_path = serve.PackedEnv(changed.archive_path)
    assert by_path.sha256 == changed.sha256 and by_path.spec.kind == "venv"
    assert by_path.spec.distributed == probe.expected_versions()["distributed"]


# -- errors ------------------------------------------------------------------------------
def test_pack_time_errors_say_what_is_wrong(dirs, tmp_path):
    with pytest.raises(serve.EnvError, match="no virtualenv at"):
        serve.PackedEnv.from_venv(tmp_path / "missing")
    with pytest.raises(serve.EnvError, match="not a virtualenv"):
        serve.PackedEnv.from_venv(tmp_path)

    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    with pytest.raises(serve.EnvError, match=r"daskserve cannot be imported.*"
                                            r"install daskserve==") as raised:
        serve.PackedEnv.from_venv(bare)
    assert "distributed cannot be imported" in str(raised.value)

    # An env whose distributed is not the cluster's.
    site = next(bare.glob("lib/python*/site-packages"))
    (site / "distributed").mkdir()
    (site / "distributed" / "__init__.py").write_text("__version__ = '2000.1.0'\n")
    wanted = probe.expected_versions()["distributed"]
    with pytest.raises(serve.EnvError, match=f"the env has distributed 2000.1.0 but this "
                                             f"client runs {wanted}"):
        serve.PackedEnv.from_venv(bare)

    with pytest.raises(serve.EnvError, match="not a conda environment"):
        serve.PackedEnv.from_conda(str(bare))
    if shutil.which("conda") is None and not os.environ.get("CONDA_EXE"):
        with pytest.raises(serve.EnvError, match="no conda executable"):
            serve.PackedEnv.from_conda("some-env-name")


def test_broken_archives_are_refused(tmp_path):
    with pytest.raises(serve.EnvError, match="cannot read archive"):
        serve.PackedEnv(tmp_path / "missing.tar.gz")
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b" + os.urandom(2000))
    with pytest.raises(serve.EnvError, match="not a readable tar archive"):
        serve.PackedEnv(junk)
    other = _tar(tmp_path / "other.tar.gz", {"README": b"not an env"})
    with pytest.raises(serve.EnvError, match="neither a venv-pack archive"):
        serve.PackedEnv(other)
    versions = probe.expected_versions()
    no_dask = _tar(tmp_path / "nodask.tar.gz", {"pyvenv.cfg": b"home = /nowhere\n"})
    with pytest.raises(serve.EnvError, match="no distributed-\\*.dist-info"):
        serve.PackedEnv(no_dask)
    truncated = tmp_path / "truncated.tar.gz"
    whole = _tar(tmp_path / "whole.tar.gz", _fake_venv(versions, b"#!/bin/sh\n"))
    truncated.write_bytes(whole.read_bytes()[:-40])
    with pytest.raises(serve.EnvError, match="not a readable tar archive"):
        serve.PackedEnv(truncated)


def test_start_time_errors_reach_create_backend(cluster, serving, dirs, six_envs,
                                                 tmp_path):
    # An env whose daskserve cannot be imported (a dependency is missing). Its listing
    # looks fine, so only the worker host, running its interpreter, finds out.
    venv = make_venv(str(dirs / "no-starlette"))
    site = next(Path(venv).glob("lib/python*/site-packages"))
    for path in site.glob("starlette*"):
        shutil.rmtree(path)
    import venv_pack

    archive = str(tmp_path / "no-starlette.tar.gz")
    venv_pack.pack(prefix=venv, output=archive, verbose=False)
    broken = serve.PackedEnv(archive)
    with pytest.raises(Exception, match=r"daskserve cannot be imported in the env "
                                        r"\(ModuleNotFoundError: No module named "
                                        r"'starlette'\)"):
        serving.create_backend("broken", plain, replica_options={"env": broken})

    # An env built for another machine.
    machine = "aarch64" if probe.this_platform().endswith("x86_64") else "x86_64"
    elf = _elf_header(machine)
    foreign = serve.PackedEnv(_tar(tmp_path / "foreign.tar.gz",
                                   _fake_venv(probe.expected_versions(), elf)))
    with pytest.raises(Exception, match=f"built for linux-{machine}, and this host is "
                                        f"{probe.this_platform()}"):
        serving.create_backend("foreign", plain, replica_options={"env": foreign})

    # A constructor that raises in the env: its error, not a generic one.
    with pytest.raises(Exception, match="RuntimeError: this model refuses to load"):
        serving.create_backend("refuses", SixModel, True,
                               replica_options={"env": six_envs["1.17.0"]})

    # None of it hurt the controller.
    assert set(serving.list_backends()) == set()
    serving.create_backend("fine", plain, replica_options={"num_cpus": 0.5})
    serving.create_endpoint("fine", backend="fine")
    assert serving.get_handle("fine").remote().result(timeout=TIMEOUT) == "plain"


# -- conda-pack ---------------------------------------------------------------------------
CONDA = shutil.which("conda")


@pytest.mark.skipif(CONDA is None, reason="no conda executable on this machine (conda "
                                          "channels are unreachable here, so no conda env "
                                          "can be created); this test runs where conda "
                                          "exists")
def test_conda_pack_env_serves(serving, dirs):
    prefix = dirs / "conda-env"
    python = "%d.%d" % sys.version_info[:2]
    subprocess.run([CONDA, "create", "--yes", "--quiet", "--prefix", str(prefix),
                    f"python={python}"], check=True, timeout=900)
    site = next(prefix.glob("lib/python*/site-packages"))
    from conflicting_dependencies import _copy_distribution, _requirements_of

    for dist in _requirements_of("daskserve"):
        _copy_distribution(dist, str(site))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(site), "six==1.16.0"], check=True)
    env = serve.PackedEnv.from_conda(str(prefix))
    assert env.spec.kind == "conda"
    serving.create_backend("conda", SixModel, replica_options={"env": env})
    serving.create_endpoint("conda", backend="conda")
    info = serving.get_handle("conda").options(method_name="info").remote().result(
        timeout=TIMEOUT)
    assert info["version"] == "1.16.0"
    assert info["prefix"] == os.path.join(cache.cache_root(), env.spec.short)


# -- helpers ------------------------------------------------------------------------------
def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return path


def _fake_venv(versions: dict[str, str], python: bytes) -> dict[str, bytes]:
    site = "lib/python%d.%d/site-packages" % sys.version_info[:2]
    return {"pyvenv.cfg": b"home = /usr/bin\n", "bin/python": python,
            f"{site}/distributed-{versions['distributed']}.dist-info/METADATA": b"",
            f"{site}/daskserve-{versions['daskserve']}.dist-info/METADATA": b""}


def _elf_header(machine: str) -> bytes:
    code = {"aarch64": 0xB7, "x86_64": 0x3E}[machine]
    return (b"\x7fELF\x02\x01\x01" + b"\x00" * 9 + (2).to_bytes(2, "little")
            + code.to_bytes(2, "little") + b"\x00" * 44)
