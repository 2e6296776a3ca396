"""Batch scoring: ``handle.map_partitions`` against plain ``ddf.map_partitions``.

    python benchmarks/batch_scoring.py [--partitions 8] [--rows 40000] [--repeats 5]
                                       [--http-duration 5]

Why: batch prediction through the live replicas is worth having only if it costs
little next to the best a user could do without daskserve, which is plain Dask with
the model loaded once per worker process and called inside each task. That is the
ceiling here, measured in the same run, on the same cluster and data.

Layout: a ``dask scheduler --preload scheduler_plugin`` process (controller and
HTTP proxy), ``dask worker --nworkers 2 --nthreads 1`` (two processes with one task
thread each; BLAS and OpenMP at one thread, so one model call uses one core) and
this process as the driver. The model is a scikit-learn ``MLPClassifier`` (20
features, two hidden layers of 256) costing 7-11 us of one core per row. The
backend runs two replicas with ``num_cpus=1``, one per worker. Each partition is made
on the cluster (``dd.from_map``, as ``read_parquet`` would read it), never in this
process.

Rows (runs are short and interleaved, so drift on a shared machine hits all alike;
the table gives every run, the ratio of medians, the ratio of best runs (the least
disturbed by other processes on a busy machine), and the CPU time the two worker
processes spent per row, which other processes disturb far less than wall time):
- ceiling: ``ddf.map_partitions(score_cached)``, the model cached per worker process;
- daskserve: ``handle.map_partitions(ddf)``; the replica on the task's worker is
  preferred (``daskserve.batch.locality``, the default);
- daskserve, locality off: the router picks any replica, as for any handle call;
- transport alone: both paths with a handler that skips the model, so the gap is
  what moving a partition to a replica and its result back costs (a pickle and an
  unpickle each way; a replica in the task's own process is called in process, one
  in another process over TCP) with no model time to hide it.

Each partition's result carries the pid of the process that scored it, and Dask's
task stream says which worker ran the task that sent it, so the bytes daskserve
sent to another worker are counted, not estimated (Dask may also move a partition
between its own tasks, in every row alike; that is not counted). On one machine
"another worker" is still loopback TCP; on a cluster those bytes cross the network.

Then live HTTP (``wrk -c1`` and ``-c8`` on the same backend's route, one row per
request): latency idle, and while batch jobs run back to back on the same replicas.
"""
from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import threading
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

FEATURES = [f"f{i}" for i in range(20)]
ROW_BYTES_IN = 8 * len(FEATURES)  # float64 features
ROW_BYTES_OUT = 8 * 2             # score, scorer pid
ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                     "MKL_NUM_THREADS")}

# -- what runs on the workers (imported there by name: PYTHONPATH holds this folder) ----
_cached_model = None  # the ceiling's model, loaded once per worker process


def make_partition(index: int, rows: int):
    import numpy as np
    import pandas as pd

    data = np.random.default_rng(index).normal(size=(rows, len(FEATURES)))
    return pd.DataFrame(data, columns=FEATURES)


def _scored(frame, scores):
    import pandas as pd

    return pd.DataFrame({"score": scores, "scorer": os.getpid()}, index=frame.index)


class Scorer:
    """The served model: whole partitions by handle, single rows over HTTP."""

    def __init__(self, model_blob: bytes):
        self.model = pickle.loads(model_blob)

    def score(self, frame):
        return _scored(frame, self.model.predict_proba(frame[FEATURES].to_numpy())[:, 1])

    def passthrough(self, frame):
        import numpy as np

        return _scored(frame, np.zeros(len(frame)))

    def __call__(self, request):
        import numpy as np

        row = np.random.default_rng(int(request.query_params["row"])).normal(
            size=(1, len(FEATURES)))
        return {"score": float(self.model.predict_proba(row)[0, 1])}


def install_model(model_blob: bytes) -> None:
    global _cached_model
    _cached_model = pickle.loads(model_blob)


def score_cached(frame):
    return _scored(frame, _cached_model.predict_proba(frame[FEATURES].to_numpy())[:, 1])


def passthrough_local(frame):
    import numpy as np

    return _scored(frame, np.zeros(len(frame)))


def summarize(scored, partition_info=None):
    """One row per partition: the driver fetches counts, not the scores."""
    import pandas as pd

    return pd.DataFrame({"partition": [partition_info["number"]], "rows": [len(scored)],
                         "scorer": [int(scored["scorer"].iloc[0])],
                         "score_sum": [float(scored["score"].sum())]})


def cpu_seconds() -> float:
    """CPU time of this worker process so far (its task threads and replicas alike)."""
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


def set_locality(on: bool) -> None:
    import dask

    from daskserve.batch import LOCALITY_CONFIG

    dask.config.set({LOCALITY_CONFIG: on})


# -- the driver ----------------------------------------------------------------------------
def train_model() -> bytes:
    from sklearn.datasets import make_classification
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    X, y = make_classification(n_samples=2000, n_features=len(FEATURES), random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # speed is all we measure
        model = MLPClassifier(hidden_layer_sizes=(256, 256), max_iter=5,
                              random_state=0).fit(X, y)
    return pickle.dumps(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--rows", type=int, default=40_000, help="rows per partition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--http-duration", type=float, default=5.0)
    args = parser.parse_args()

    import dask.dataframe as dd
    from distributed import Client, get_task_stream

    import batch_scoring as bench  # by name, so workers import it rather than unpickle it
    import daskserve as serve
    from run import free_port, process, run_wrk, wait_http

    sched_port, http_port = free_port(), free_port()
    address = f"tcp://127.0.0.1:{sched_port}"
    # The scheduler unpickles task graphs too, so both import this module by name.
    env = {"DASK_DISTRIBUTED__ADMIN__EVENT_LOOP": "uvloop", **ONE_THREAD,
           "PYTHONPATH": os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))}
    with process(sys.executable, "-m", "distributed.cli.dask_scheduler", "--host",
                 "127.0.0.1", "--port", str(sched_port), "--dashboard-address", ":0",
                 "--preload", "scheduler_plugin", "--serve-http-port", str(http_port),
                 env=env), \
            process(sys.executable, "-m", "distributed.cli.dask_worker", address,
                    "--nworkers", "2", "--nthreads", "1", "--dashboard-address", ":0",
                    env=env), \
            Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=60)
        blob = train_model()
        client.run(bench.install_model, blob)
        sc = serve.connect(client)
        sc.create_backend("scorer", bench.Scorer, blob, config={"num_replicas": 2},
                          replica_options={"num_cpus": 1})
        sc.create_endpoint("scorer", backend="scorer", route="/score")
        handle = sc.get_handle("scorer")
        url = f"http://127.0.0.1:{http_port}/score?row=7"
        wait_http(url)

        def frame(partitions=args.partitions, rows=args.rows):
            return dd.from_map(bench.make_partition, range(partitions), rows=rows,
                               meta=bench.make_partition(0, 0))

        meta = {"score": "f8", "scorer": "i8"}
        summary_meta = {"partition": "i8", "rows": "i8", "scorer": "i8", "score_sum": "f8"}
        worker_pid = client.run(os.getpid)
        jobs = {
            "ceiling": lambda: frame().map_partitions(bench.score_cached, meta=meta),
            "daskserve": lambda: handle.options(method_name="score").map_partitions(
                frame(), meta=meta),
            "daskserve, locality off": lambda: handle.options(
                method_name="score").map_partitions(frame(), meta=meta),
            "transport alone: plain": lambda: frame().map_partitions(
                bench.passthrough_local, meta=meta),
            "transport alone: daskserve": lambda: handle.options(
                method_name="passthrough").map_partitions(frame(), meta=meta),
        }

        def run(name):
            client.run(bench.set_locality, "locality off" not in name)
            job = jobs[name]().map_partitions(bench.summarize, meta=summary_meta)
            cpu_before = sum(client.run(bench.cpu_seconds).values())
            with get_task_stream(client) as stream:
                start = time.perf_counter()
                summary = job.compute()
                seconds = time.perf_counter() - start
            cpu = sum(client.run(bench.cpu_seconds).values()) - cpu_before
            # Which process sent each partition's call: the worker of its "serve-" task.
            sender = {task["key"][1]: worker_pid[task["worker"]] for task in stream.data
                      if isinstance(task["key"], tuple) and "serve-" in task["key"][0]}
            remote = summary[[sender.get(p) not in (None, s) for p, s in
                              zip(summary["partition"], summary["scorer"])]]
            return {"rows": int(summary["rows"].sum()), "s": seconds, "cpu": cpu,
                    "remote_rows": int(remote["rows"].sum()),
                    "score_sum": float(summary["score_sum"].sum())}

        for name in jobs:  # warm-up: routers, connections, imports
            small = jobs[name]
            jobs[name] = lambda small=small: small().partitions[:4]
            run(name)
            jobs[name] = small
        results = {name: [] for name in jobs}
        for _ in range(args.repeats):
            for name in jobs:
                results[name].append(run(name))
        client.run(bench.set_locality, True)

        http = {"idle": {c: run_wrk(url, c, args.http_duration) for c in (1, 8)}}
        busy, during = {}, {}
        for c in (1, 8):  # wrk in a thread; batch jobs back to back until it is done
            load = threading.Thread(target=lambda c=c: busy.update({c: run_wrk(
                url, c, args.http_duration)}))
            rows, start = 0, time.perf_counter()
            load.start()
            while load.is_alive():
                rows += int(jobs["daskserve"]().map_partitions(
                    bench.summarize, meta=summary_meta).compute()["rows"].sum())
            during[c] = {"rows/s": rows / (time.perf_counter() - start)}
        http["during batch"] = busy
        sc.shutdown()
    report(args, results, http, during)


def report(args, results, http, during) -> None:
    print(f"\n{args.partitions} partitions x {args.rows:,} rows, {args.repeats} runs each\n")
    print("| path | rows/s, each run | ratio of medians | ratio of best | "
          "worker CPU us/row (median) | ratio | MB sent to another worker, each run |")
    print("|---|---|---|---|---|---|---|")

    def rates(name):
        return [r["rows"] / r["s"] for r in results[name]]

    def cpu_per_row(name):
        return statistics.median(r["cpu"] / r["rows"] * 1e6 for r in results[name])

    for name, runs in results.items():
        base_name = "transport alone: plain" if "transport" in name else "ceiling"
        base, mine = rates(base_name), rates(name)
        sent = " / ".join(f"{r['remote_rows'] * ROW_BYTES_IN / 1e6:.0f}" for r in runs) \
            if "daskserve" in name else "- (no call)"
        print(f"| {name} | {' / '.join(f'{x:,.0f}' for x in mine)} | "
              f"{statistics.median(mine) / statistics.median(base):.3f} | "
              f"{max(mine) / max(base):.3f} | {cpu_per_row(name):.2f} | "
              f"{cpu_per_row(base_name) / cpu_per_row(name):.3f} | {sent} |")
    scored = ("ceiling", "daskserve", "daskserve, locality off")
    sums = {round(r["score_sum"], 3) for k in scored for r in results[k]}
    print(f"\nscore sums agree across paths: {len(sums) == 1} ({sorted(sums)})")
    for label, pick in (("median", statistics.median), ("best", min)):
        extra = pick(r["s"] for r in results["transport alone: daskserve"]) - \
            pick(r["s"] for r in results["transport alone: plain"])
        print(f"transport cost per partition ({label} runs): "
              f"{extra / args.partitions * 2 * 1e3:.1f} ms of worker time "
              f"({args.rows * ROW_BYTES_IN / 1e6:.1f} MB in, "
              f"{args.rows * ROW_BYTES_OUT / 1e6:.1f} MB out; 2 workers)")
    print("\n| HTTP GET /score (one row) | c | req/s | p50 ms | p99 ms | non-2xx |")
    print("|---|---|---|---|---|---|")
    for state, by_c in http.items():
        for c, r in by_c.items():
            print(f"| {state} | {c} | {r['rps']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} | "
                  f"{r['errors'] + r['timeouts']} |")
    for c, d in during.items():
        print(f"batch jobs beside HTTP c={c}, back to back while wrk ran: "
              f"{d['rows/s']:,.0f} rows/s")


if __name__ == "__main__":
    main()
