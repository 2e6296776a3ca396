"""Routers tell the controller how busy each backend is, a couple of times a second.

The controller sizes autoscaling backends from the requests in flight and waiting in
every router. Counting them is already free (``Router.load``); telling the controller
per request would not be, so a router samples its counts once per interval and sends
them while something is in flight, plus once more when its load has just gone to
zero. An idle router sends nothing; the controller forgets reports that stop coming
(a router that went away), so their last count does not linger.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .protocol import ControllerOp, LoadReport

if TYPE_CHECKING:
    from .router import Router

logger = logging.getLogger(__name__)

REPORT_INTERVAL_S = 0.5


async def report_loads(router: "Router", interval: float = REPORT_INTERVAL_S) -> None:
    """Run for as long as the router: send its loads to the controller each interval."""
    send = getattr(router.controller_rpc(), ControllerOp.REPORT_LOAD)
    last: LoadReport = {}
    while not router.closed:
        await asyncio.sleep(interval)
        loads = router.loads()
        if not loads and not last:
            continue
        try:
            # Bounded: a controller that is gone must not stall the next report.
            await asyncio.wait_for(send(listener=router.listener_id, loads=loads),
                                   interval * 4)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the controller restarts or is gone: try next time
            logger.debug("load report failed: %r", exc)
            continue
        last = loads
