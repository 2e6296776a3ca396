"""Autoscaling under a load step, against a fixed backend sized for the peak.

    pip install matplotlib            # for the plot only; not a daskserve dependency
    python benchmarks/autoscaling.py [--warm 5] [--step 30] [--cool 15] [--peak 32]
                                     [--service-ms 100] [--plot benchmarks/autoscaling.png]

Why: autoscaling trades latency during a surge (replicas take time to start) for
replicas that are not held while idle. This measures both sides on one cluster, in
one run: the same load step against an autoscaling backend (``min_replicas`` 1) and
against a fixed backend with as many replicas as the peak needs.

The handler sleeps for a fixed service time and each replica runs at most
``--per-replica`` requests at once (``max_concurrent_queries``), so a replica's
capacity is bounded as for a model on one device, whatever the machine's cores:
sleeping costs no CPU, so the figures reflect scheduling, not a 2-core machine.

Load: closed-loop handle callers in threads, one request at a time each; 1 caller
for ``--warm`` s, ``--peak`` callers for ``--step`` s, then 1 caller for ``--cool`` s.
The autoscaling backend targets ``--per-replica`` ongoing requests per replica, so
the step asks for ``peak / per_replica`` replicas; the fixed backend starts with that
many. Reported per backend:

- time from the step to the first added replica, and to steady state (the last
  change of the running count during the step);
- p50 / p99 latency during the step's transient (its first ``steady`` seconds, the
  autoscaling backend's time to steady state, for both backends) and after it;
- replica-seconds held over the whole run, failed requests, and the time the
  autoscaling backend took to return to one replica after the step.

Layout: a LocalCluster of ``--workers`` worker processes with ``--threads`` threads
(one CPU slot per thread; a replica takes one), the controller in its scheduler,
and this process driving the load. Results print as JSON; the plot shows the
running replicas and the per-second p99 latency of both backends over time.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time

import cloudpickle

import daskserve as serve

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SAMPLE_S = 0.25


def make_handler(service_s: float):
    def handler(*args):
        time.sleep(service_s)
        return "ok"
    return handler


class StepLoad:
    """Closed-loop callers: ``peak`` threads, of which only the first runs while the
    load is low. Each request is recorded as (start, latency, ok)."""

    def __init__(self, handle, peak: int, t0: float, max_calls: int = 1_000_000):
        self.handle, self.t0, self.max_calls = handle, t0, max_calls
        self.records: list[tuple[float, float, bool]] = []
        self._lock = threading.Lock()
        self._active = [threading.Event() for _ in range(peak)]
        self._done = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(e,), daemon=True)
                        for e in self._active]
        self._active[0].set()
        for thread in self.threads:
            thread.start()

    def set_callers(self, n: int) -> None:
        for i, event in enumerate(self._active):
            event.set() if i < n else event.clear()

    def _run(self, active: threading.Event) -> None:
        for _ in range(self.max_calls):
            while not active.wait(0.05):
                if self._done.is_set():
                    return
            if self._done.is_set():
                return
            start = time.monotonic()
            try:
                ok = self.handle.remote().result(timeout=120) == "ok"
            except Exception:
                ok = False
            with self._lock:
                self.records.append((start - self.t0, time.monotonic() - start, ok))

    def stop(self) -> None:
        self._done.set()
        for thread in self.threads:
            thread.join(timeout=180)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


def run_phase(client, tag: str, config: dict, args) -> dict:
    """Create a backend, drive the step against it, and return what was measured."""
    client.create_backend(tag, make_handler(args.service_ms / 1000), config=config)
    client.create_endpoint(tag, backend=tag)
    handle = client.get_handle(tag)
    handle.remote().result(timeout=60)  # warm the handle's router
    t0 = time.monotonic()
    samples: list[tuple[float, int]] = []
    load = StepLoad(handle, args.peak, t0)
    step_at, cool_at, end_at = args.warm, args.warm + args.step, \
        args.warm + args.step + args.cool
    stepped = cooled = False
    while True:
        now = time.monotonic() - t0
        if now >= end_at:
            break
        if not stepped and now >= step_at:
            load.set_callers(args.peak)
            stepped = True
        if not cooled and now >= cool_at:
            load.set_callers(1)
            cooled = True
        running = client.list_backends()[tag]["replicas"].get("running", 0)
        samples.append((now, running))
        time.sleep(SAMPLE_S)
    load.stop()
    client.delete_endpoint(tag)
    client.delete_backend(tag)
    return {"samples": samples, "records": load.records, "step_at": step_at,
            "cool_at": cool_at, "end_at": end_at}


def summarize(phase: dict, steady_window: float | None) -> dict:
    samples, records = phase["samples"], phase["records"]
    step_at, cool_at = phase["step_at"], phase["cool_at"]
    start_count = next((n for t, n in reversed(samples) if t < step_at), samples[0][1])
    first_added = next((t - step_at for t, n in samples
                        if step_at <= t < cool_at and n > start_count), None)
    changes = [t for (t, n), (_, before) in zip(samples[1:], samples)
               if step_at <= t < cool_at and n != before]
    steady = (changes[-1] - step_at) if changes else 0.0
    window = steady if steady_window is None else steady_window
    during = [lat for t, lat, ok in records if step_at <= t < step_at + window]
    after = [lat for t, lat, ok in records if step_at + window <= t < cool_at]
    back_to_one = next((t - cool_at for t, n in samples if t >= cool_at and n <= 1), None)
    held = sum(n * (t2 - t1) for (t1, n), (t2, _) in zip(samples, samples[1:]))
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {
        "first_added_replica_s": None if first_added is None else round(first_added, 2),
        "steady_state_s": round(steady, 2),
        "peak_running": max(n for t, n in samples if step_at <= t < cool_at),
        "transient_window_s": round(window, 2),
        "p50_ms_transient": ms(percentile(during, 50)),
        "p99_ms_transient": ms(percentile(during, 99)),
        "p50_ms_after": ms(percentile(after, 50)),
        "p99_ms_after": ms(percentile(after, 99)),
        "step_requests": sum(1 for t, _, _ in records if step_at <= t < cool_at),
        "failed": sum(1 for _, _, ok in records if not ok),
        "replica_seconds": round(held, 1),
        "back_to_1_replica_after_step_s": None if back_to_one is None
        else round(back_to_one, 2),
    }


def plot(phases: dict, path: str, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for label, phase in phases.items():
        ts, ns = zip(*phase["samples"])
        top.step(ts, ns, where="post", label=label)
        bins: dict[int, list[float]] = {}
        for t, lat, ok in phase["records"]:
            bins.setdefault(int(t), []).append(lat)
        seconds = sorted(bins)
        bottom.plot([s + 0.5 for s in seconds],
                    [percentile(bins[s], 99) * 1000 for s in seconds], label=label)
    any_phase = next(iter(phases.values()))
    for axis in (top, bottom):
        axis.axvspan(any_phase["step_at"], any_phase["cool_at"], color="0.9", zorder=0)
        axis.legend(loc="upper right")
    top.set_ylabel("running replicas")
    bottom.set_ylabel("p99 latency per second (ms)")
    bottom.set_yscale("log")
    bottom.set_xlabel(f"seconds (shaded: {args.peak} callers, else 1)")
    top.set_title(f"load step 1 -> {args.peak} callers, {args.service_ms:g} ms handler, "
                  f"{args.per_replica} per replica")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm", type=float, default=5.0)
    parser.add_argument("--step", type=float, default=30.0)
    parser.add_argument("--cool", type=float, default=15.0)
    parser.add_argument("--peak", type=int, default=32)
    parser.add_argument("--service-ms", type=float, default=100.0)
    parser.add_argument("--per-replica", type=int, default=4)
    parser.add_argument("--upscale-delay", type=float, default=1.0)
    parser.add_argument("--downscale-delay", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--plot", default=None, help="PNG path (needs matplotlib)")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    peak_replicas = math.ceil(args.peak / args.per_replica)
    if peak_replicas > args.workers * args.threads:
        sys.exit(f"{peak_replicas} replicas need {peak_replicas} CPU slots; "
                 f"raise --workers or --threads")
    with LocalCluster(n_workers=args.workers, threads_per_worker=args.threads,
                      dashboard_address=":0") as cluster, Client(cluster) as dask_client:
        client = serve.start(dask_client, http_options={"location": "NoServer"})
        common = {"max_concurrent_queries": args.per_replica}
        phases = {
            "autoscaling": run_phase(client, "autoscaled", {**common, "autoscaling_config": {
                "min_replicas": 1, "max_replicas": peak_replicas,
                "target_num_ongoing_requests_per_replica": args.per_replica,
                "upscale_delay_s": args.upscale_delay,
                "downscale_delay_s": args.downscale_delay}}, args),
            f"fixed {peak_replicas}": run_phase(
                client, "fixed", {**common, "num_replicas": peak_replicas}, args),
        }
        client.shutdown()
    auto = summarize(phases["autoscaling"], None)
    fixed = summarize(phases[f"fixed {peak_replicas}"], auto["steady_state_s"])
    print(json.dumps({"settings": vars(args), "autoscaling": auto,
                      f"fixed_{peak_replicas}": fixed}, indent=2))
    if args.plot:
        plot(phases, args.plot, args)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
