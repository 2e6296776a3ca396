"""Configuration that is refused, and the per-process environment replicas share;
no cluster needed."""
from __future__ import annotations

import os

import pytest

from daskserve.config import BackendConfig, ReplicaOptions
from daskserve.worker_plugin import ProcessEnvironment


def test_env_must_be_a_packed_env():
    with pytest.raises(TypeError, match="replica_options.env must be a serve.PackedEnv"):
        ReplicaOptions(env="/some/env.tar.gz")
    with pytest.raises(TypeError, match="replica_options.env"):
        ReplicaOptions.coerce({"env": object()})
    with pytest.raises(ValueError, match="replica_options.env: missing"):
        ReplicaOptions(env={"sha256": "0" * 64})
    wire = {"sha256": "ab" * 32, "size": 10, "kind": "venv", "name": "x"}
    options = ReplicaOptions(env=wire)
    assert options.to_dict()["env"]["sha256"] == "ab" * 32
    assert "env" not in ReplicaOptions().to_dict()


@pytest.mark.parametrize("amount", [1.5, 2.3])
def test_more_than_one_gpu_must_be_whole(amount):
    with pytest.raises(ValueError, match="num_gpus"):
        ReplicaOptions(num_gpus=amount)
    assert ReplicaOptions(num_gpus=2).demand()["GPU"] == 2.0
    assert ReplicaOptions(num_gpus=0.25).demand()["GPU"] == 0.25


HEALTH_FIELDS = ["health_check_period_s", "health_check_timeout_s"]


@pytest.mark.parametrize("name", HEALTH_FIELDS)
@pytest.mark.parametrize("value, error", [(0, ValueError), (-1.5, ValueError),
                                          (float("inf"), ValueError), (None, TypeError),
                                          ("10", TypeError), (True, TypeError)])
def test_health_check_fields_must_be_positive_numbers(name, value, error):
    with pytest.raises(error, match=name):
        BackendConfig(**{name: value})
    with pytest.raises(error, match=name):  # as the controller checks a merged update
        BackendConfig.validate_wire({**BackendConfig().to_wire(), name: value})


def test_health_check_fields_travel_and_default_for_older_configs():
    config = BackendConfig(health_check_period_s=2, health_check_timeout_s=0.5)
    wire = config.to_wire()
    assert BackendConfig.health_check(wire) == (2, 0.5)
    assert BackendConfig.from_wire(wire).to_dict()["health_check_timeout_s"] == 0.5
    # a config checkpointed before the fields existed gets their defaults
    older = {k: v for k, v in wire.items() if k not in HEALTH_FIELDS}
    BackendConfig.validate_wire(older)
    assert BackendConfig.health_check(older) == (10.0, 30.0)


@pytest.fixture
def clean_names(monkeypatch):
    names = ("DASKSERVE_UNIT_A", "DASKSERVE_UNIT_B")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DASKSERVE_UNIT_B", "worker's own")
    return names


def test_environment_of_a_removed_replica_does_not_leak(clean_names):
    a, b = clean_names
    env = ProcessEnvironment()
    env.add("r1", {a: "one", b: "one"})
    env.add("r2", {a: "two"})
    assert (os.environ[a], os.environ[b]) == ("two", "one")

    env.remove("r2")            # r1 still sets A: its value comes back
    assert os.environ[a] == "one"
    env.remove("r1")            # nobody sets them: the worker's own values return
    assert a not in os.environ
    assert os.environ[b] == "worker's own"


def test_older_replica_leaving_keeps_the_newer_value(clean_names):
    a, _ = clean_names
    env = ProcessEnvironment()
    env.add("r1", {a: "one"})
    env.add("r2", {a: "two"})
    env.remove("r1")
    assert os.environ[a] == "two"
    env.remove("r2")
    assert a not in os.environ
    env.remove("unknown")       # removing what was never added changes nothing
    assert a not in os.environ
