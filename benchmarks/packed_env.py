"""Pack, ship and first-request times of a packed environment with distributed + numpy.

    python benchmarks/packed_env.py [--pad-mb N]

Layout: ``dask scheduler --preload scheduler_plugin`` in one process, ``dask worker
--nworkers 2 --nthreads 1`` (two worker processes on this one host), and this
process as the client. The env is a venv holding this interpreter's daskserve and
distributed (copied, as examples/conflicting_dependencies.py does) plus numpy from
PyPI. ``--pad-mb`` adds that many MB of random bytes to the env, to see how a large
(incompressible) archive ships: the scheduler's peak RSS before and after shipping
shows whether it ever held the archive.

Prints a Markdown table: one row per step, with seconds and what was moved.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

from conflicting_dependencies import make_venv  # noqa: E402
from run import free_port, peak_rss_mib, process  # noqa: E402


class NumpyModel:
    def __init__(self):
        import numpy

        self.np = numpy

    def __call__(self, request=None):
        return {"numpy": self.np.__version__, "sum": float(self.np.arange(10).sum())}


def plain(request=None):
    return "plain"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+) kB", status.read()).group(1)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pad-mb", type=int, default=0)
    args = parser.parse_args()

    import requests
    from distributed import Client

    import cloudpickle

    import daskserve as serve

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    rows = []

    def row(step: str, seconds: float | None, note: str = "") -> None:
        rows.append((step, "-" if seconds is None else f"{seconds:.2f}", note))
        print(f"  {step}: {rows[-1][1]} s {note}", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DASKSERVE_PACK_CACHE"] = os.path.join(tmp, "packs")
        os.environ["DASKSERVE_ENV_CACHE"] = os.path.join(tmp, "unpacked")
        start = time.perf_counter()
        venv = make_venv(os.path.join(tmp, "numpy-env"), "numpy")
        if args.pad_mb:
            with open(os.path.join(venv, "padding.bin"), "wb") as pad:
                for _ in range(args.pad_mb):
                    pad.write(os.urandom(1 << 20))
        row("build the venv (copy + pip install numpy)", time.perf_counter() - start)

        start = time.perf_counter()
        env = serve.PackedEnv.from_venv(venv)
        mb = env.spec.size / 1e6
        row("pack (probe + venv-pack + sha256)", time.perf_counter() - start,
            f"{mb:.0f} MB archive, {env.spec.nchunks} chunks")
        start = time.perf_counter()
        serve.PackedEnv.from_venv(venv)
        row("pack again, env unchanged (cache hit)", time.perf_counter() - start)

        sched_port, http_port = free_port(), free_port()
        address = f"tcp://127.0.0.1:{sched_port}"
        with process(sys.executable, "-m", "distributed.cli.dask_scheduler",
                     "--host", "127.0.0.1",
                     "--port", str(sched_port), "--dashboard-address", ":0",
                     "--preload", "scheduler_plugin", "--serve-http-port", str(http_port)
                     ) as scheduler, \
                process(sys.executable, "-m", "distributed.cli.dask_worker", address,
                        "--nworkers", "2", "--nthreads", "1", "--dashboard-address", ":0"):
            client = Client(address, timeout=60)
            client.wait_for_workers(2, timeout=60)
            sc = serve.connect(client)
            time.sleep(1)
            before = peak_rss_mib(scheduler.pid), rss_mib(scheduler.pid)

            start = time.perf_counter()
            sent = env.upload(client)
            seconds = time.perf_counter() - start
            peak = peak_rss_mib(scheduler.pid)
            row("ship: client -> scheduler -> a worker's memory", seconds,
                f"{sent} chunks, {mb / seconds:.0f} MB/s; scheduler peak RSS "
                f"{before[0]:.0f} -> {peak:.0f} MiB")

            start = created = time.perf_counter()
            sc.create_backend("numpy", NumpyModel, replica_options={"env": env,
                                                                    "num_cpus": 0.5})
            row("create_backend: fetch + unpack + probe + start the replica process",
                time.perf_counter() - start, _unpack_note(env))
            sc.create_endpoint("numpy", backend="numpy", route="/numpy")
            start = time.perf_counter()
            reply = requests.get(f"http://127.0.0.1:{http_port}/numpy", timeout=60).json()
            row("first HTTP request (its replica already runs)", time.perf_counter() - start,
                f"-> {reply}")
            row("from create_backend to the first answer", time.perf_counter() - created)
            start = time.perf_counter()
            sc.get_handle("numpy").remote().result(timeout=60)
            row("first handle call", time.perf_counter() - start)

            start = time.perf_counter()
            sc.update_backend_config("numpy", {"num_replicas": 2})
            row("second replica (the other worker, env already on this host)",
                time.perf_counter() - start)
            start = time.perf_counter()
            sc.create_backend("plain", plain, replica_options={"num_cpus": 0.5})
            row("for comparison: create_backend without an env",
                time.perf_counter() - start)
            row("scheduler peak RSS over the whole run", None,
                f"{peak_rss_mib(scheduler.pid):.0f} MiB")
            sc.shutdown()
            client.close()

    print(f"\n`python benchmarks/packed_env.py{f' --pad-mb {args.pad_mb}' if args.pad_mb else ''}`"
          f" ({'numpy + %d MB of padding' % args.pad_mb if args.pad_mb else 'numpy'})\n")
    print("| step | seconds | notes |\n|---|---|---|")
    for step, seconds, note in rows:
        print(f"| {step} | {seconds} | {note} |")


def _unpack_note(env) -> str:
    from daskserve.envs import cache

    try:
        with open(os.path.join(cache.cache_root(), "installs.log")) as log:
            line = [line for line in log if env.sha256 in line][-1]
    except (OSError, IndexError):
        return ""
    took = re.search(r"installed .* in ([\d.]+)s: (.*)$", line)
    return f"installed on this host once, in {took.group(1)} s: {took.group(2)}" if took \
        else ""


if __name__ == "__main__":
    main()
