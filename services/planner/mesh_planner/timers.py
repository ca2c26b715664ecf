"""Durable wake-ups for workflow tasks, kept by the broker (``topology.TIMERS``, issue 40).

A wait with a time (a ``timer`` node, the backoff before a node's next try, a try's or a
signal's timeout) is a wake-up the planner asks the broker for: it stores a message schedule
(``Nats-Schedule: @at <time>``) on ``timer.v1.<tenant>.<task>.<wait>.at``, and at that time the
broker stores the wake-up on ``...<wait>.due``, which this module takes from the planner's durable
and hands to the planner. No process keeps a clock: a planner restarted, replaced or scaled out
finds the fired wake-ups waiting in its durable, and the broker keeps the schedules across its
own restarts.

A wake-up is only a prompt to look: the planner acts on the wait its task record holds, if it is
due by then. A wake-up for a wait that is over (the step completed before its timeout, the task
was cancelled) is acknowledged and changes nothing, and scheduling the same wake-up twice (an
outbox flushed again after a crash) replaces the schedule with itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from mesh_contracts import topology as topo
from mesh_kit.fair import FairConsumer, Fetched
from mesh_planner.errors import PlannerError

log = logging.getLogger("mesh.planner.timers")

WORKERS = 4
RETRY_S = 1.0
"""How soon a wake-up whose handling failed (the broker away a moment) is delivered again."""


class Early(PlannerError):
    """The wake-up came before its wait is due (the broker's clock ahead of this one): look again
    in ``delay_s``."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(f"due in {delay_s:.3f} s")
        self.delay_s = delay_s


def schedule_headers(tenant: str, task_id: str, wait_id: str, due_at: float) -> dict[str, str]:
    at = datetime.fromtimestamp(due_at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {
        "Nats-Schedule": f"@at {at}",
        "Nats-Schedule-Target": topo.timer_subject(tenant, task_id, wait_id, "due"),
    }


def parse_due(subject: str) -> tuple[str, str, str] | None:
    """(tenant, task, wait) of a fired wake-up's subject, or None for any other subject."""
    parts = subject.split(".")
    if len(parts) != 6 or parts[:2] != ["timer", "v1"] or parts[5] != "due":
        return None
    return parts[2], parts[3], parts[4]


class Timers:
    """Schedules wake-ups and takes the fired ones (``on_due(tenant, task, wait)``)."""

    def __init__(
        self, mesh: Any, on_due: Callable[[str, str, str], Awaitable[None]], *, ack_wait_s: float, graceful_s: float
    ) -> None:
        self.mesh, self.on_due = mesh, on_due
        self.fired = 0
        self._consumer = FairConsumer(
            lambda: mesh.nc, topo.TIMERS, topo.TIMER_DURABLE, mesh.settings.inbox_prefix + ".", self._handle,
            workers=WORKERS, window=WORKERS * 4, ack_wait_s=ack_wait_s, graceful_s=graceful_s,
            journal=getattr(mesh, "handoff", None),
        )  # fmt: skip

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def schedule(self, tenant: str, task_id: str, wait_id: str, due_at: float) -> None:
        """Ask the broker to wake ``wait_id`` of the task at ``due_at`` (unix seconds; a time past
        fires at once). The same wait scheduled again replaces its schedule."""
        body = json.dumps({"due_at": due_at}).encode()
        headers = schedule_headers(tenant, task_id, wait_id, due_at)
        await self.mesh.nc.jetstream().publish(
            topo.timer_subject(tenant, task_id, wait_id, "at"), body, headers=headers, stream=topo.TIMERS
        )

    async def _handle(self, msg: Fetched) -> None:
        raw = msg.raw_message
        found = parse_due(raw.subject)
        if found is None:  # nothing else is stored there (only the broker fires onto .due)
            log.warning("a wake-up on %s is of no known shape: dropped", raw.subject)
            await msg.ack()
            return
        try:
            await self.on_due(*found)
        except asyncio.CancelledError:
            raise
        except Early as exc:
            await msg.nack(delay=max(0.01, exc.delay_s))
            return
        except Exception as exc:  # noqa: BLE001 - a timer must not be lost: look again shortly
            log.warning("wake-up %s: %s; again in %.0f s", raw.subject, exc, RETRY_S)
            with contextlib.suppress(Exception):
                await msg.nack(delay=RETRY_S)
            return
        self.fired += 1
        await msg.ack()


def due_in(due_at: float | None, now: float | None = None) -> float:
    return 0.0 if due_at is None else due_at - (time.time() if now is None else now)
