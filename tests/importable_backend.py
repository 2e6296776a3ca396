"""Backends that tests name by import path ("importable_backend.Greeter").

Not a test module: workers import it by name. The tests directory is on the
workers' ``sys.path`` because pytest puts it on the driver's before the session
LocalCluster starts, and spawned worker processes inherit the driver's path.
"""
from __future__ import annotations

import os


class Greeter:
    """A class backend built with init_args; answers HTTP requests and handle calls."""

    def __init__(self, greeting: str = "hello", punctuation: str = "!"):
        self.greeting = greeting
        self.punctuation = punctuation
        self.pid = os.getpid()

    def __call__(self, who):
        if hasattr(who, "query_params"):  # an HTTP request
            who = who.query_params.get("name", "world")
        return f"{self.greeting}, {who}{self.punctuation}"

    def where(self):
        return self.pid


class ConfiguredGreeter(Greeter):
    """A class backend whose punctuation comes from ``user_config``."""

    def reconfigure(self, user_config):
        self.punctuation = user_config["punctuation"]


def triple(x):
    return 3 * x


NOT_CALLABLE = 42
