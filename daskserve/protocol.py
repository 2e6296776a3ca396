"""The wire protocol between routers, replicas and the controller, in one place.

Every message is a plain msgpack-native value (dicts, lists, str, bytes, numbers), so
it crosses Dask's comms without pickling and nothing from an HTTP client is ever
unpickled. The types below are ``TypedDict``s: they document the shape and let type
checkers follow it, and cost nothing at run time because they *are* dicts.

Handlers are Dask server handlers, named here and nowhere else:

- ``ControllerOp``: on the scheduler, installed by the controller
  (``scheduler_plugin.controller.ServeController.handlers``);
- ``WorkerOp``: on each worker, installed by the worker plugin
  (``daskserve.worker_plugin.ServeWorkerPlugin.handlers``).
"""
from __future__ import annotations

from typing import Any, TypedDict


class ControllerOp:
    """Scheduler handlers: the client API and the routers' long-poll.

    Calls that change state answer with the ``TableVersion`` that includes the change.
    """

    LISTEN = "daskserve_listen"                  # router: wait for a newer RoutingTable
    #   (version, listener, epoch): answered at once when ``epoch`` is not the running
    #   controller's, so a router never keeps a table of an instance that is gone.
    INFO = "daskserve_info"
    SHUTDOWN = "daskserve_shutdown"
    CREATE_BACKEND = "daskserve_create_backend"
    LIST_BACKENDS = "daskserve_list_backends"
    GET_BACKEND_CONFIG = "daskserve_get_backend_config"
    UPDATE_BACKEND_CONFIG = "daskserve_update_backend_config"  # (tag, changes, replace):
    #   changes holds only the fields to change, in wire form; replace: all of them
    DELETE_BACKEND = "daskserve_delete_backend"
    CREATE_ENDPOINT = "daskserve_create_endpoint"
    DELETE_ENDPOINT = "daskserve_delete_endpoint"
    LIST_ENDPOINTS = "daskserve_list_endpoints"
    SET_TRAFFIC = "daskserve_set_traffic"
    SHADOW_TRAFFIC = "daskserve_shadow_traffic"
    # observability (scheduler_plugin/dashboard.py)
    METRICS = "daskserve_metrics"  # the instance's metrics, Prometheus text (bytes)
    ENV_PREPARE = "daskserve_env_prepare"        # client: which chunks of an archive to send
    ENV_HOLD = "daskserve_env_hold"              # client: keep these scattered chunks
    REPLICA_EXITED = "daskserve_replica_exited"  # worker: a replica's own process died
    REPORT_LOAD = "daskserve_report_load"        # router: (listener, loads: LoadReport),
    #   sent once per interval while a backend's load is nonzero or has just changed,
    #   never per request; no answer is needed


class WorkerOp:
    """Worker handlers: the request fast path and the controller's replica commands.

    ``CALL``, ``COLLECT`` and ``CANCEL`` travel over the worker's request channel
    (``daskserve.channel``), not over Dask comms; the others are Dask handlers.
    """

    CALL = "daskserve_call"                # router: run a CallMessage, get a CallReply
    COLLECT = "daskserve_collect"          # router: the rest of a message, by ticket
    CANCEL = "daskserve_cancel"            # router: a CancelMessage; no reply needed
    CHANNEL = "daskserve_channel"          # router: where the request channel and the
    #   thread lane listen (ChannelAddresses)
    UPDATE = "daskserve_update"            # controller: apply a new BackendConfig (UpdateReply)
    DRAIN = "daskserve_drain"              # controller: finish in-flight work, take no more
    LOCATE = "daskserve_locate"            # controller: where a replica answers CALL
    HEALTH = "daskserve_health"            # controller: probe a replica (HealthReply)
    ABORT = "daskserve_abort"              # controller: fail a wedged replica's work and
    #   forget it; no reply needed
    START_PROXY = "daskserve_start_proxy"  # controller: run an EveryNode proxy here
    STOP_PROXY = "daskserve_stop_proxy"
    # observability: (names=None) -> {"process", "families", "gpus"}, see metrics.snapshot
    METRICS = "daskserve_worker_metrics"


# -- HTTP requests and responses ------------------------------------------------------
class WireRequest(TypedDict):
    """An HTTP request as the proxy read it; the replica rebuilds a Starlette Request."""

    method: str
    path: str                    # percent-decoded, as routes are matched
    raw_path: str | None         # as sent, one char per byte; None if path needed no decoding
    query: str                   # as sent, one char per byte
    headers: list[tuple[str, str]]
    body: bytes
    client: list | None          # [host, port] of the HTTP client


# A response: [status, [[name, value], ...], body]. A list, not a dict, because one
# travels per HTTP request and msgpack packs a three-element array tighter.
WireResponse = list


# -- routing table: controller -> routers ---------------------------------------------
class EndpointRoute(TypedDict):
    route: str | None            # None: reachable by handle only
    methods: list[str]
    traffic: dict[str, float]    # backend tag -> weight, summing to 1
    shadows: dict[str, float]    # backend tag -> share of requests duplicated to it


class ReplicaRoute(TypedDict):
    tag: str                     # the replica's name, unique in the instance
    address: str                 # the Dask server whose channel answers WorkerOp.CALL


class BackendRoute(TypedDict):
    max_concurrent_queries: int
    max_queued_requests: int      # -1: unbounded (BackendConfig.queue_limits)
    queue_timeout_s: float | None  # None: wait without bound
    max_batch_size: int | None    # a full batch travels in one message (router.py)
    replicas: list[ReplicaRoute]  # running replicas only


class TableVersion(TypedDict):
    """Names one routing table: which controller instance made it, and when.

    ``version`` counts from 0 in every controller instance (a restarted scheduler
    starts a new one), so versions compare only within one ``epoch``: a random id
    each instance makes when it starts.
    """

    epoch: str
    version: int


class RoutingTable(TypedDict, total=False):
    """Everything a router needs, replaced whole on every change.

    A table with ``shutdown`` set carries only its epoch and version: the instance is
    gone and routers stop polling.
    """

    epoch: str                   # see TableVersion
    version: int
    endpoints: dict[str, EndpointRoute]
    backends: dict[str, BackendRoute]
    shutdown: bool


# A router's load per backend: queries sent and unanswered plus those waiting for a
# free replica ({backend tag: count}). Backends it omits count as 0 for it.
LoadReport = dict


# -- router -> replica ----------------------------------------------------------------
class CallMessage(TypedDict, total=False):
    """Queries one router sent one replica in one loop tick (WorkerOp.CALL), at most
    ``router.MESSAGE_REQUESTS`` per message (a batched backend's ``max_batch_size``).

    ``replica`` and ``ticket`` are always there; ``http`` and ``calls`` only when
    non-empty. The router picks the ticket (random start, then counting, so tickets
    of different routers do not meet), which lets it name the message's work in a
    COLLECT or CANCEL before, or without, any reply.
    """

    replica: str                 # ReplicaRoute.tag
    ticket: int
    http: list[WireRequest]
    calls: bytes                 # cloudpickled [(method, args, kwargs), ...]: one blob


class CallReply(TypedDict, total=False):
    """What finished first; indices refer to the message's ``http`` and ``calls``.

    Handle-call results travel as one blob of pickles laid end to end, one per
    result, so that one the caller cannot unpickle fails only its own call.
    ``retry`` says the replica took none of it (gone or draining), so the router may
    send everything elsewhere; ``undecodable`` that the replica could not unpickle
    ``calls`` and ran nothing; ``lost`` (collect only) that the ticket's work is gone.
    """

    http: list[list]             # [[index, WireResponse], ...]
    calls: list[list]            # [[index, ok, end], ...]: result ``index`` is
                                 # values[previous end:end]; a failed call (ok false)
                                 # adds a text summary of its exception
    values: bytes
    ticket: int                  # more results are coming: COLLECT this ticket
    retry: bool
    undecodable: str             # why unpickling ``calls`` failed
    lost: bool
    error: Any                   # why the rest was lost (router side only)
    lane: bool                   # the lone request ran on handler threads: the next
                                 # ones to its method may take the thread lane
    closing: bool                # (lane) the connection closes after this reply


class ChannelAddresses(TypedDict):
    """Where a replica process takes requests (WorkerOp.CHANNEL); None for none."""

    channel: str | None          # daskserve.channel
    lane: str | None             # daskserve.lane


class CancelMessage(TypedDict):
    """Work whose callers stopped waiting (WorkerOp.CANCEL): cancel it if it has not
    finished (async handlers are cancelled, sync ones run on in their thread), and
    never report it. A cancel may overtake its CALL; the replica remembers it."""

    replica: str
    cancels: list[list]          # [[ticket, [http index, ...], [call index, ...]], ...]


# -- controller -> replica ------------------------------------------------------------
class UpdateReply(TypedDict, total=False):
    """A replica's answer to WorkerOp.UPDATE.

    ``error`` is what applying the config raised (the user's ``reconfigure``, mostly),
    cloudpickled in the replica's process: the controller passes it on unopened and
    only the Python client that asked for the update unpickles it.
    """

    applied: bool                # False: not applied (no such replica here, or error)
    error: bytes
    message: str                 # the error as text, for logs and messages


class HealthReply(TypedDict, total=False):
    """A replica's answer to WorkerOp.HEALTH ``(replica, timeout)``.

    Facts only; the controller decides what is unhealthy (``scheduler_plugin.health``).
    """

    running: int                 # calls in the replica's handlers now
    stalled_s: float             # how long those have run with none of them ending
                                 # (0 when none runs)
    error: str                   # check_health raised: the replica answers, broken
    hung: str                    # check_health did not return within ``timeout``
    missing: bool                # no such replica here
