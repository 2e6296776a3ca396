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
from .errors import EndpointNotFoundError, ReplicaConfigError
from .handle import AsyncServeHandle, ServeHandle, register_home
from .protocol import ControllerOp


class ServeClient:
    """Manage backends, endpoints and traffic of the serve instance on a Dask cluster."""

    def __init__(self, dask_client: Client, *, owns_cluster: bool = False):
        if dask_client.asynchronous:
            raise TypeError("daskserve needs a synchronous distributed.Client; "
                            "use handles (sync=False) for asyncio code")
        self.dask_client = dask_client
        self.scheduler_address: str = dask_client.scheduler.address
        self._owns_cluster = owns_cluster
        register_home(self.scheduler_address, dask_client.rpc, dask_client.loop.asyncio_loop)
        info = self._call(ControllerOp.INFO)
        if info is None:
            raise RuntimeError(f"no daskserve instance runs on the scheduler at "
                               f"{self.scheduler_address}; call serve.start(dask_client)")
        # The newest routing table our own changes produced (protocol.TableVersion).
        self._epoch: str = info["epoch"]
        self._version = 0

    def _call(self, op: str, **kwargs: Any) -> Any:
        return self.dask_client.sync(getattr(self.dask_client.scheduler, op), **kwargs)

    def _change(self, op: str, **kwargs: Any) -> None:
        stamp = self._call(op, **kwargs)
        if stamp["epoch"] != self._epoch:  # the scheduler restarted since we connected
            self._epoch, self._version = stamp["epoch"], stamp["version"]
        else:
            self._version = max(self._version, stamp["version"])

    # -- backends ---------------------------------------------------------------
    def create_backend(self, backend_tag: str, func_or_class: Callable | type | str,
                       *init_args: Any, config: BackendConfig | Mapping | None = None,
                       replica_options: Mapping[str, Any] | None = None) -> None:
        """Start a backend: a function, a class (built with ``init_args``) or an import path.

        Returns once its replicas run, or raises the first replica's start error. A
        replica that fits on no worker yet stays pending (see ``list_backends``).
        With ``replica_options={"env": serve.PackedEnv(...)}`` the archive is first
        shipped into the cluster, unless it is there already.
        """
        if not isinstance(func_or_class, str) and not callable(func_or_class):
            raise TypeError(f"backend must be a function, a class or an import path "
                            f"string, got {type(func_or_class).__name__}")
        if init_args and not (isinstance(func_or_class, str) or inspect.isclass(func_or_class)):
            raise TypeError("init_args are only accepted for class backends")
        backend_config = BackendConfig.coerce(config)
        options = ReplicaOptions.coerce(replica_options)
        spec = cloudpickle.dumps((func_or_class, init_args))
        if options.env is not None and hasattr(options.env, "upload"):
            options.env.upload(self.dask_client)  # only chunks the cluster lacks
        self._change(ControllerOp.CREATE_BACKEND, tag=backend_tag, spec=spec,
                     config=backend_config.to_wire(), replica_options=options.to_dict())

    def list_backends(self) -> dict[str, dict[str, Any]]:
        """Each backend's full config, replica options, replica counts by status,
        overall ``status`` and, when replicas wait or failed, why."""
        backends = self._call(ControllerOp.LIST_BACKENDS)
        for entry in backends.values():
            entry["user_config"] = cloudpickle.loads(entry["user_config"])
        return backends

    def get_backend_config(self, backend_tag: str) -> BackendConfig:
        """The backend's current ``BackendConfig``."""
        return BackendConfig.from_wire(
            self._call(ControllerOp.GET_BACKEND_CONFIG, tag=backend_tag))

    def update_backend_config(self, backend_tag: str,
                              config: BackendConfig | Mapping[str, Any]) -> None:
        """Apply a full ``BackendConfig`` or a dict of the fields to change.

        Only the fields given travel; the controller merges them into the current
        config, so concurrent updates of different fields all take effect. Scaling
        down drains replicas; a changed ``user_config`` reaches every running
        replica's ``reconfigure`` before this returns. If a ``reconfigure`` raises,
        the config is left as it was and that exception is raised here, with a note
        naming the backend and replica.
        """
        if isinstance(config, BackendConfig):
            changes, replace = BackendConfig.coerce(config).to_wire(), True
        else:
            changes, replace = BackendConfig.changes_to_wire(config), False
        try:
            self._change(ControllerOp.UPDATE_BACKEND_CONFIG, tag=backend_tag,
                         changes=changes, replace=replace)
        except ReplicaConfigError as exc:
            raise exc.user_error() from None

    def delete_backend(self, backend_tag: str) -> None:
        """Drain and remove a backend; refused while an endpoint routes or shadows to it."""
        self._change(ControllerOp.DELETE_BACKEND, tag=backend_tag)

    # -- endpoints --------------------------------------------------------------------
    def create_endpoint(self, endpoint_name: str, backend: str | None = None,
                        route: str | None = None, methods: Sequence[str] = ("GET",)) -> None:
        """Name an endpoint, optionally at an HTTP ``route``, optionally sending all its
        traffic to ``backend``; it is routed by every proxy when this returns."""
        self._change(ControllerOp.CREATE_ENDPOINT, name=endpoint_name, backend=backend,
                     route=route, methods=normalize_methods(methods))

    def delete_endpoint(self, endpoint_name: str) -> None:
        """Remove an endpoint and its route; its backends keep running."""
        self._change(ControllerOp.DELETE_ENDPOINT, name=endpoint_name)

    def list_endpoints(self) -> dict[str, dict[str, Any]]:
        """Each endpoint's route, methods, traffic weights and shadows."""
        endpoints = self._call(ControllerOp.LIST_ENDPOINTS)
        for entry in endpoints.values():
            entry["methods"] = list(entry["methods"])  # msgpack hands back tuples
        return endpoints

    def set_traffic(self, endpoint_name: str, traffic_policy_dictionary: Mapping[str, float]
                    ) -> None:
        """Split an endpoint's traffic between backends; weights must sum to 1."""
        if not isinstance(traffic_policy_dictionary, Mapping):
            raise TypeError(f"traffic must be a dict {{backend: weight}}, "
                            f"got {type(traffic_policy_dictionary).__name__}")
        self._change(ControllerOp.SET_TRAFFIC, endpoint=endpoint_name,
                     traffic=dict(traffic_policy_dictionary))

    def shadow_traffic(self, endpoint_name: str, backend_tag: str, proportion: float) -> None:
        """Duplicate ``proportion`` of an endpoint's requests to a backend whose
        answers nobody sees; 0 stops shadowing."""
        self._change(ControllerOp.SHADOW_TRAFFIC, endpoint=endpoint_name,
                     backend=backend_tag, proportion=proportion)

    # -- handles and lifecycle ------------------------------------------------------
    def get_handle(self, endpoint_name: str, sync: bool = True
                   ) -> ServeHandle | AsyncServeHandle:
        """A handle calling the endpoint from Python; raises ``EndpointNotFoundError``
        (a ``KeyError``) if it does not exist."""
        if endpoint_name not in self.list_endpoints():
            raise EndpointNotFoundError(f"endpoint {endpoint_name!r} does not exist")
        cls = ServeHandle if sync else AsyncServeHandle
        return cls(self.scheduler_address, endpoint_name, min_version=self._version,
                   epoch=self._epoch)

    def info(self) -> dict[str, Any]:
        """Proxy URLs, HTTP options and worker resources as the controller sees them."""
        return self._call(ControllerOp.INFO)

    def shutdown(self) -> None:
        """Remove every endpoint, backend, replica and proxy; the cluster keeps running
        unless ``serve.start`` started it."""
        self._call(ControllerOp.SHUTDOWN)
        if self._owns_cluster:
            cluster = getattr(self.dask_client, "cluster", None)
            self.dask_client.close()
            if cluster is not None:
                cluster.close()
