"""daskserve: scalable, programmable model serving on Dask distributed."""
from .api import (connect, create_backend, create_endpoint, delete_backend,
                  delete_endpoint, get_backend_config, get_handle, list_backends,
                  list_endpoints, set_traffic, shadow_traffic, shutdown, start,
                  update_backend_config)
from . import metrics  # serve.metrics.Counter/Gauge/Histogram
from .batching import accept_batch
from .client import ServeClient
from .config import BackendConfig
from .context import get_replica_context
from .envs import EnvError, PackedEnv
from .errors import (BackPressureError, EndpointNotFoundError, QueueTimeoutError,
                     SerializationError, ServeError)
from .handle import AsyncServeHandle, ServeHandle
from .event_loop import prefer_uvloop

prefer_uvloop()  # before the user's cluster exists, so that it starts on uvloop

__version__ = "0.1.0"

__all__ = [
    "AsyncServeHandle", "BackPressureError", "BackendConfig", "EndpointNotFoundError",
    "EnvError", "PackedEnv", "QueueTimeoutError", "SerializationError", "ServeClient",
    "ServeError", "ServeHandle", "accept_batch",
    "connect", "create_backend", "create_endpoint", "delete_backend", "delete_endpoint",
    "get_backend_config", "get_handle", "get_replica_context", "list_backends",
    "list_endpoints", "set_traffic", "shadow_traffic", "shutdown", "start",
    "update_backend_config",
]
