"""The Python client of a serve instance.

Every method is one call to a controller handler on the Dask scheduler, made
through the user's own ``distributed.Client`` (so Dask's TLS ``Security``
settings apply). Arguments are validated here first, where the error can name the
field; the controller validates again, since other clients may talk to it.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import cloudpickle
from distributed import Client

from .config import BackendConfig, ReplicaOptions, normalize_methods
from .handle import AsyncServeHandle, ServeHandle, register_home
from .protocol import CONTROLLER_PREFIX


class ServeClient:
    """Manage backends, endpoints and traffic of the serve instance on a Dask cluster."""

    def __init__(self, dask_client: Client, *, owns_cluster: bool = False):
        if dask_client.asynchronous:
            raise TypeError("daskserve needs a synchronous distributed.Client; "
                            "use handles (sync=False) for asyncio code")
        self.dask_client = dask_client
        self.scheduler_address: str = dask_client.scheduler.address
        self._owns_cluster = owns_cluster
        self._version = 0  # newest routing table our own changes produced
        register_home(self.scheduler_address, dask_client.rpc, dask_client.loop.asyncio_loop)
        if self._call("info") is None:
            raise RuntimeError(f"no daskserve instance runs on the scheduler at "
                               f"{self.scheduler_address}; call serve.start(dask_client)")

    def _call(self, op: str, **kwargs: Any) -> Any:
        handler = getattr(self.dask_client.scheduler, CONTROLLER_PREFIX + op)
        return self.dask_client.sync(handler, **kwargs)

    def _change(self, op: str, **kwargs: Any) -> None:
        version = self._call(op, **kwargs)
        if isinstance(version, int):
            self._version = max(self._version, version)

    # -- backends ---------------------------------------------------------------
    def create_backend(self, backend_tag: str, func_or_class: Callable | type | str,
                       *init_args: Any, config: BackendConfig | Mapping | None = None,
                       replica_options: Mapping[str, Any] | None = None) -> None:
        """Start a backend: a function, a class (built with ``init_args``) or an import path."""
        if not isinstance(func_or_class, str) and not callable(func_or_class):
            raise TypeError(f"backend must be a function, a class or an import path "
                            f"string, got {type(func_or_class).__name__}")
        if init_args and not (isinstance(func_or_class, str) or inspect.isclass(func_or_class)):
            raise TypeError("init_args are only accepted for class backends")
        backend_config = BackendConfig.coerce(config)
        options = ReplicaOptions.coerce(replica_options)
        spec = cloudpickle.dumps((func_or_class, init_args))
        self._change("create_backend", tag=backend_tag, spec=spec,
                     config=backend_config.to_wire(), replica_options=options.to_dict())

    def list_backends(self) -> dict[str, dict[str, Any]]:
        backends = self._call("list_backends")
        for entry in backends.values():
            entry["user_config"] = cloudpickle.loads(entry["user_config"])
        return backends

    def get_backend_config(self, backend_tag: str) -> BackendConfig:
        return BackendConfig.from_wire(self._call("get_backend_config", tag=backend_tag))

    def update_backend_config(self, backend_tag: str,
                              config: BackendConfig | Mapping[str, Any]) -> None:
        """Apply a full ``BackendConfig`` or a dict of the fields to change."""
        new = self.get_backend_config(backend_tag).updated(config)
        self._change("update_backend_config", tag=backend_tag, config=new.to_wire())

    def delete_backend(self, backend_tag: str) -> None:
        self._change("delete_backend", tag=backend_tag)

    # -- endpoints --------------------------------------------------------------------
    def create_endpoint(self, endpoint_name: str, backend: str | None = None,
                        route: str | None = None, methods: Sequence[str] = ("GET",)) -> None:
        self._change("create_endpoint", name=endpoint_name, backend=backend, route=route,
                     methods=normalize_methods(methods))

    def delete_endpoint(self, endpoint_name: str) -> None:
        self._change("delete_endpoint", name=endpoint_name)

    def list_endpoints(self) -> dict[str, dict[str, Any]]:
        endpoints = self._call("list_endpoints")
        for entry in endpoints.values():
            entry["methods"] = list(entry["methods"])  # msgpack hands back tuples
        return endpoints

    def set_traffic(self, endpoint_name: str, traffic_policy_dictionary: Mapping[str, float]
                    ) -> None:
        if not isinstance(traffic_policy_dictionary, Mapping):
            raise TypeError(f"traffic must be a dict {{backend: weight}}, "
                            f"got {type(traffic_policy_dictionary).__name__}")
        self._change("set_traffic", endpoint=endpoint_name,
                     traffic=dict(traffic_policy_dictionary))

    def shadow_traffic(self, endpoint_name: str, backend_tag: str, proportion: float) -> None:
        self._change("shadow_traffic", endpoint=endpoint_name, backend=backend_tag,
                     proportion=proportion)

    # -- handles and lifecycle ------------------------------------------------------
    def get_handle(self, endpoint_name: str, sync: bool = True
                   ) -> ServeHandle | AsyncServeHandle:
        if endpoint_name not in self.list_endpoints():
            raise KeyError(f"endpoint {endpoint_name!r} does not exist")
        cls = ServeHandle if sync else AsyncServeHandle
        return cls(self.scheduler_address, endpoint_name, min_version=self._version)

    def info(self) -> dict[str, Any]:
        """Proxy URLs, HTTP options and worker resources as the controller sees them."""
        return self._call("info")

    def shutdown(self) -> None:
        """Remove every endpoint, backend, replica and proxy; the cluster keeps running."""
        self._call("shutdown")
        if self._owns_cluster:
            cluster = getattr(self.dask_client, "cluster", None)
            self.dask_client.close()
            if cluster is not None:
                cluster.close()
