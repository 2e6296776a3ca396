"""Autoscaling backends on a real cluster: a load step scales a backend up and, once
the load is gone, back down with nothing lost; counts set by hand are refused; and
``list_backends`` says why the count last changed."""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter

import cloudpickle
import pytest

from conftest import wait_until

# Worker processes cannot import this test module; ship its backends by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 60                   # safety limit per wait; no test relies on timing
MAX_CALLS_PER_THREAD = 3000    # bounds the load loops whatever the timing


def sleepy(*args):
    """A handler with a fixed 200 ms service time."""
    time.sleep(0.2)
    return "done"


class Load:
    """Handle callers in threads, each one request at a time, counting outcomes."""

    def __init__(self, handle, threads: int):
        self.handle = handle
        self.counts: Counter = Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stops = [threading.Event() for _ in range(threads)]
        self.threads = [threading.Thread(target=self._run, args=(stop,), daemon=True)
                        for stop in self._stops]
        for thread in self.threads:
            thread.start()

    def _run(self, stop: threading.Event) -> None:
        for _ in range(MAX_CALLS_PER_THREAD):
            if stop.is_set():
                return
            try:
                ok = self.handle.remote().result(timeout=TIMEOUT) == "done"
                error = None if ok else "wrong answer"
            except Exception as exc:
                ok, error = False, repr(exc)
            with self._lock:
                self.counts["ok" if ok else "failed"] += 1
                if error:
                    self.errors.append(error)

    def stop(self, keep: int = 0) -> None:
        """Stop all callers but ``keep``."""
        for stop in self._stops[keep:]:
            stop.set()
        for thread in self.threads[keep:]:
            thread.join(timeout=TIMEOUT)

    def stop_all(self) -> None:
        self.stop(0)


def test_load_step_scales_up_then_back_down_losing_nothing(serve_client):
    serve_client.create_backend("step", sleepy, config={"autoscaling_config": {
        "min_replicas": 1, "max_replicas": 3, "target_num_ongoing_requests_per_replica": 2,
        "upscale_delay_s": 0.5, "downscale_delay_s": 1.0}})
    serve_client.create_endpoint("step", backend="step")
    entry = serve_client.list_backends()["step"]
    assert entry["num_replicas"] == 1 and entry["replicas"] == {"running": 1}
    assert entry["autoscaling"]["last_decision"] is None
    handle = serve_client.get_handle("step")

    load = Load(handle, threads=12)  # 12 in flight wants 6 replicas: max_replicas caps at 3
    try:
        def scaled_up():
            entry = serve_client.list_backends()["step"]
            return entry if entry["replicas"] == {"running": 3} else None

        entry = wait_until(scaled_up, TIMEOUT, interval=0.1, what="3 running replicas")
        assert entry["num_replicas"] == 3
        auto = entry["autoscaling"]
        assert auto["last_decision"]["to"] == 3 and auto["load"] > 0
        assert "upscale_delay_s" in auto["reason"] and "max_replicas 3" in auto["reason"]

        # The step ends; one caller keeps going, so the drain happens under traffic.
        load.stop(keep=1)

        def scaled_down():
            entry = serve_client.list_backends()["step"]
            return entry if entry["replicas"] == {"running": 1} and \
                entry["num_replicas"] == 1 else None

        entry = wait_until(scaled_down, TIMEOUT, interval=0.1, what="back to 1 replica")
        assert entry["autoscaling"]["last_decision"]["to"] == 1
        assert "downscale_delay_s" in entry["autoscaling"]["reason"]
        answered = load.counts["ok"]
        wait_until(lambda: load.counts["ok"] > answered + 2, TIMEOUT,
                   what="the last replica to keep answering")
    finally:
        load.stop_all()
    assert all(not t.is_alive() for t in load.threads)
    assert load.counts["failed"] == 0, load.errors[:5]
    assert load.counts["ok"] > 12


def test_counts_by_hand_are_refused_and_bounds_move_the_count(serve_client):
    serve_client.create_backend("auto", sleepy, config={"autoscaling_config": {
        "min_replicas": 1, "max_replicas": 2, "downscale_delay_s": 600}})
    with pytest.raises(ValueError, match="num_replicas and autoscaling_config"):
        serve_client.update_backend_config("auto", {"num_replicas": 2})
    with pytest.raises(ValueError, match="num_replicas and autoscaling_config"):
        serve_client.create_backend("both", sleepy, config={
            "num_replicas": 2, "autoscaling_config": {"max_replicas": 3}})

    # Raising min_replicas raises the count at once, and says why.
    serve_client.update_backend_config("auto", {"autoscaling_config": {
        "min_replicas": 2, "max_replicas": 3, "downscale_delay_s": 600}})
    entry = serve_client.list_backends()["auto"]
    assert entry["num_replicas"] == 2 and entry["replicas"] == {"running": 2}
    assert entry["autoscaling"]["last_decision"]["from"] == 1
    assert "autoscaling_config changed" in entry["autoscaling"]["reason"]

    # A fetched config sent back whole keeps the controller's count.
    config = serve_client.get_backend_config("auto")
    config.max_concurrent_queries = 5
    serve_client.update_backend_config("auto", config)
    assert serve_client.get_backend_config("auto").num_replicas == 2

    # Autoscaling off: the count is the user's again.
    serve_client.update_backend_config("auto", {"autoscaling_config": None})
    serve_client.update_backend_config("auto", {"num_replicas": 1})
    entry = serve_client.list_backends()["auto"]
    assert entry["num_replicas"] == 1 and entry["autoscaling"] is None


def test_scales_from_zero_for_http_requests_waiting_in_the_proxy(serve_client, base_url):
    """With ``min_replicas`` 0 a request waits in the proxy's router; the proxy's load
    report brings a replica up, and the backend goes back to zero afterwards."""
    import requests

    serve_client.create_backend("lazy", sleepy, config={"autoscaling_config": {
        "min_replicas": 0, "max_replicas": 1, "upscale_delay_s": 0,
        "downscale_delay_s": 0.5}})
    serve_client.create_endpoint("lazy", backend="lazy", route="/lazy")
    assert serve_client.list_backends()["lazy"]["replicas"] == {}
    reply = requests.get(f"{base_url}/lazy", timeout=TIMEOUT)
    assert reply.status_code == 200 and reply.text == "done"
    entry = serve_client.list_backends()["lazy"]
    assert entry["autoscaling"]["last_decision"]["from"] == 0
    wait_until(lambda: serve_client.list_backends()["lazy"]["replicas"] == {}, TIMEOUT,
               interval=0.1, what="the backend to go back to zero replicas")
    assert serve_client.list_backends()["lazy"]["num_replicas"] == 0
