"""Settings known to be slow are named in the logs, once, and stay allowed."""
from __future__ import annotations

import asyncio
import logging

import pytest
from distributed import Client

import daskserve as serve
from daskserve import event_loop


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(event_loop, "_warned", set())


def test_default_asyncio_loop_is_named_once(fresh_warnings, caplog):
    async def start_twice():
        event_loop.warn_if_slow("HTTP proxy")
        event_loop.warn_if_slow("HTTP proxy")

    with caplog.at_level(logging.WARNING, logger="daskserve.event_loop"):
        asyncio.run(start_twice())
    records = [r for r in caplog.records if r.name == "daskserve.event_loop"]
    assert len(records) == 1
    assert "HTTP proxy" in records[0].getMessage()
    assert "DASK_DISTRIBUTED__ADMIN__EVENT_LOOP=uvloop" in records[0].getMessage()


def test_uvloop_gets_no_warning(fresh_warnings, caplog):
    uvloop = pytest.importorskip("uvloop")

    async def start():
        event_loop.warn_if_slow("HTTP proxy")

    with caplog.at_level(logging.WARNING, logger="daskserve.event_loop"):
        uvloop.run(start())
    assert not [r for r in caplog.records if r.name == "daskserve.event_loop"]


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_clusters_daskserve_starts_run_the_preferred_loop():
    with event_loop.local_cluster(n_workers=1, processes=True,
                                  dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        modules = [type(cluster.scheduler.loop.asyncio_loop).__module__,
                   *client.run(_loop_module).values()]
    assert all(m.startswith(event_loop.preferred()) for m in modules), modules


def test_batch_size_near_the_concurrency_limit_is_named(serve_client, caplog):
    @serve.accept_batch
    def double(requests):
        return [2 for _ in requests]

    with caplog.at_level(logging.WARNING, logger="scheduler_plugin.controller"):
        serve_client.create_backend("tight_batches", double,
                                    config={"max_batch_size": 8, "max_concurrent_queries": 8})
        serve_client.create_backend("roomy_batches", double,
                                    config={"max_batch_size": 8, "max_concurrent_queries": 16})
    slow = [r.getMessage() for r in caplog.records if "configured to run slowly" in
            r.getMessage()]
    assert len(slow) == 1
    assert "'tight_batches'" in slow[0] and "max_concurrent_queries to 16" in slow[0]
    assert serve_client.list_backends()["tight_batches"]["status"] == "RUNNING"
