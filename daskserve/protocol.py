"""Names of the operations routers, replicas and the controller exchange.

Each is a Dask server handler: the controller's live on the scheduler, the rest on
the workers that host replicas.
"""
CONTROLLER_PREFIX = "daskserve_"   # scheduler handlers: daskserve_<client API op>

CALL = "daskserve_call"          # router -> worker: run a coalesced message
COLLECT = "daskserve_collect"    # router -> worker: results still running under a ticket
UPDATE = "daskserve_update"      # controller -> worker: apply a new BackendConfig
DRAIN = "daskserve_drain"        # controller -> worker: finish in-flight work, take no more
LISTEN = CONTROLLER_PREFIX + "listen"  # router -> scheduler: long-poll for a newer table
