"""The daskserve controller, installable as a Dask scheduler plugin or preload.

``dask scheduler --preload scheduler_plugin --serve-http-port 8000`` starts a
serve instance with the scheduler; clients then attach with ``serve.connect``.
With ``--serve-checkpoint-path FILE`` a restarted scheduler serves what the last
one served, before any client attaches.
"""
from __future__ import annotations

from typing import Any

import click

from .controller import PLUGIN_NAME, ServeController

__all__ = ["PLUGIN_NAME", "ServeController", "dask_setup"]


@click.command()
@click.option("--serve-http-host", default="127.0.0.1", show_default=True,
              help="Address the HTTP proxy binds to.")
@click.option("--serve-http-port", default=8000, type=int, show_default=True,
              help="Port of the HTTP proxy.")
@click.option("--serve-http-location", default="HeadOnly", show_default=True,
              type=click.Choice(["HeadOnly", "EveryNode", "NoServer"]),
              help="Where HTTP proxies run.")
@click.option("--serve-http-access-log", is_flag=True, default=False,
              help="Log one JSON line per HTTP request (logger 'daskserve.access').")
@click.option("--serve-checkpoint-path", default=None,
              help="File holding the serve state (backends, endpoints, traffic); "
                   "restored at start, rewritten after every change. Its directory "
                   "must exist.")
def dask_setup(scheduler: Any, serve_http_host: str, serve_http_port: int,
               serve_http_location: str, serve_checkpoint_path: str | None,
               serve_http_access_log: bool = False) -> None:
    controller = ServeController({"host": serve_http_host, "port": serve_http_port,
                                  "location": serve_http_location,
                                  "access_log": serve_http_access_log},
                                 checkpoint_path=serve_checkpoint_path)
    # Preloads run before the scheduler starts its plugins, which starts this one.
    scheduler.add_plugin(controller, name=PLUGIN_NAME, idempotent=True)
