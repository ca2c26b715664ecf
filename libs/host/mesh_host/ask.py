"""A request asked again within its deadline (``Mesh.request``).

A responder killed while it holds a request never answers: waiting the whole timeout for it was
what a kill of the budget cost the failover bench's slowest tasks. So a try waits a quarter of
the timeout (at least ``FIRST_TRY_S``), each next one twice as long, all within the timeout; and
while nobody listens (the server says so at once: a responder restarting) it asks again after a
short pause, reaching the restarted one as soon as it subscribes. Requests must be idempotent
to be asked twice: a reservation is (the same call id is the same hold).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats

T = TypeVar("T")

FIRST_TRY_S = 0.25
"""A request's first try waits a quarter of its timeout, at least this; each next one twice as long."""
NO_RESPONDER_PAUSE_S = (0.02, 0.05, 0.1, 0.2)
"""Pauses before asking again while nobody listens, then 0.2 s each."""


async def ask(once: Callable[[float], Awaitable[T]], timeout: float) -> T:
    """``once(wait)`` (one try, waiting at most ``wait`` s) until it answers or ``timeout`` has
    passed; the last failure is raised."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    wait, pauses = max(FIRST_TRY_S, timeout / 4), 0
    while True:
        left = deadline - loop.time()
        try:
            return await once(max(0.001, min(wait, left)))
        except nats.errors.NoRespondersError:
            pause = NO_RESPONDER_PAUSE_S[min(pauses, len(NO_RESPONDER_PAUSE_S) - 1)]
            pauses += 1
            if loop.time() + pause >= deadline:
                raise
            await asyncio.sleep(pause)
        except nats.errors.TimeoutError:
            if deadline - loop.time() < 0.01:
                raise
            wait *= 2
