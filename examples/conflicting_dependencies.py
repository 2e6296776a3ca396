"""Two backends whose dependencies conflict, served side by side on one cluster.

One backend needs six 1.16, the other six 1.17. Each gets its own virtualenv, packed
with venv-pack (``serve.PackedEnv.from_venv``); daskserve ships each archive to the
workers, unpacks it once per host, and runs the replicas in processes started from
that env's interpreter. The workers themselves do not even have six.

Run: python examples/conflicting_dependencies.py
"""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib import metadata

import requests
from distributed import Client, LocalCluster

import daskserve as serve

PORT = int(os.environ.get("DASKSERVE_PORT", "8000"))


def six_version(request=None):
    import six  # the env's own six: the worker has none

    return six.__version__


def make_venv(path, *requirements):
    """A venv holding this interpreter's daskserve and distributed, plus ``requirements``.

    A packed env must run the cluster's versions of daskserve and distributed. A real
    setup would ``pip install daskserve==<v> distributed==<v> ...`` into the venv;
    to stay quick, this copies the installed packages daskserve needs from the
    running interpreter (exactly what pip would put there) and pip-installs only
    ``requirements``.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", path], check=True)
    site = glob.glob(os.path.join(path, "lib", "python*", "site-packages"))[0]
    for dist in _requirements_of("daskserve"):
        _copy_distribution(dist, site)
    if requirements:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--disable-pip-version-check", "--target", site, *requirements],
                       check=True)
    return path


def _requirements_of(name):
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    # Only what is installed (not, say, a source tree's egg-info on sys.path).
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonicalize_name(d.metadata["Name"]): d
                 for d in metadata.distributions(path=paths)}
    found, todo = {}, [name]
    while todo:
        wanted = canonicalize_name(todo.pop())
        if wanted in found:
            continue
        dist = found[wanted] = installed[wanted]
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(found.values())


def _copy_distribution(dist, site):
    editable = '"editable": true' in (dist.read_text("direct_url.json") or "")
    for file in dist.files or []:
        name = str(file)
        if name.startswith("..") or "__pycache__" in name or "__editable__" in name \
                or name.endswith("direct_url.json"):
            continue
        target = os.path.join(site, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(dist.locate_file(file), target)
    if editable:  # an editable install's code lives in its source tree: copy that
        for top in (dist.read_text("top_level.txt") or "").split():
            source = importlib.util.find_spec(top).submodule_search_locations[0]
            shutil.copytree(source, os.path.join(site, top), dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))


def workers_have_six():
    return importlib.util.find_spec("six") is not None


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DASKSERVE_PACK_CACHE", os.path.join(tmp, "packs"))
        envs = {}
        for version in ("1.16.0", "1.17.0"):
            venv = make_venv(os.path.join(tmp, f"six-{version}"), f"six=={version}")
            envs[version] = serve.PackedEnv.from_venv(venv)
            print(f"packed six {version}: {envs[version].spec.size / 1e6:.0f} MB")

        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") \
                as cluster, Client(cluster) as dask_client:
            client = serve.start(dask_client, http_options={"port": PORT})
            print("workers can import six:", any(dask_client.run(workers_have_six).values()))
            for version, env in envs.items():
                name = "six" + version.replace(".", "")[:3]       # six116, six117
                client.create_backend(name, six_version, replica_options={"env": env})
                client.create_endpoint(name, backend=name, route=f"/{name}")
            for name in ("six116", "six117"):
                answer = requests.get(f"http://127.0.0.1:{PORT}/{name}").text
                print(f"/{name} over HTTP: {answer}")
                print(f"{name} via a handle: {client.get_handle(name).remote().result()}")
            client.shutdown()
