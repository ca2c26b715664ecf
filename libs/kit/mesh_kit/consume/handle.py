"""Stage 3: handle. The handler runs with the message's cause and release in context (what it
publishes is stamped with them); while the broker is unavailable, or a stream it writes to is
full, it runs again in place rather than spend one of the message's attempts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from mesh_contracts import Contract
from mesh_kit import envelope as env
from mesh_kit import faults
from mesh_kit import telemetry as tel
from mesh_kit.delivery import Delivery, Handler
from mesh_kit.settings import BROKER_UNAVAILABLE, StreamFull

log = logging.getLogger("mesh.bus")
FULL_PAUSE_S = 5.0
"""Longest wait between tries of a handler whose output a full stream refused."""


async def handle(
    handler: Handler, model: Contract, delivery: Delivery, *, infra_retry_s: float, count: Callable[[str], None]
) -> None:
    """Run ``handler`` on the message, in its context (cause, release), re-run in place while the
    infrastructure is away (``rerun``). Its exceptions are the settle stage's to judge."""
    faults.poison_point(model)
    cause = env.CAUSE.set(delivery.msg_id)
    release = env.RELEASE.set((model.tenant, model.task_id, model.release) if model.release else None)
    try:
        await rerun(handler, model, delivery, infra_retry_s=infra_retry_s, count=count)
    finally:
        env.RELEASE.reset(release)
        env.CAUSE.reset(cause)


async def rerun(
    handler: Handler, model: Contract, delivery: Delivery, *, infra_retry_s: float, count: Callable[[str], None]
) -> None:
    """Run ``handler``; while the broker is unavailable, run it again in place rather than
    spend one of the message's attempts (those are for failures of the message itself: a
    failover must not dead-letter good work). Handlers are idempotent (compare-and-set
    records, ledger-guarded effects), so a re-run is what a redelivery would be. The
    message is kept alive with heartbeats meanwhile; after ``infra_retry_s`` the failure
    counts as an attempt after all."""
    deadline = time.monotonic() + infra_retry_s
    pause, beating, full_logged = 0.1, False, False
    async with contextlib.AsyncExitStack() as stack:
        while True:
            try:
                await handler(model, delivery)
                return
            except StreamFull as exc:
                # Backpressure: a stream this handler writes to is at its cap. The message
                # waits here, alive and not spending attempts, for as long as that lasts
                # (a bounded store refuses new work; it must not fail work in hand), and this
                # handler slot with it, so the service takes no more until there is room.
                if not beating:
                    await stack.enter_async_context(delivery.keepalive())
                    beating = True
                if pause >= 2.0 or not full_logged:
                    log.warning("%s: %s; holding it until there is room", delivery.subject, exc)
                    full_logged = True
                await asyncio.sleep(pause)
                pause = min(pause * 2, FULL_PAUSE_S)
                deadline = time.monotonic() + infra_retry_s  # time held is not an outage
            except BROKER_UNAVAILABLE as exc:
                if time.monotonic() + pause > deadline:
                    raise
                if not beating:
                    await stack.enter_async_context(delivery.keepalive())
                    beating = True
                count(tel.M_INFRA_RETRIED)
                log.info("%s: broker unavailable (%s); re-running in %.1fs", delivery.subject, exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
