"""Stopping a background task for good.

A single ``task.cancel()`` followed by ``await task`` can wait forever: nats-py turns a
cancellation that meets a closed connection into ``ConnectionClosedError`` (and Python 3.11's
``asyncio.wait_for`` can drop a cancellation that meets its inner future's completion), so a
polling loop that treats errors as a broker hiccup catches it, sleeps and polls again. A service
stops its broker connection before its own stop hooks run, which is exactly when its loops are
cancelled: one such loop hung a budget's shutdown in CI. ``stop`` cancels until the task ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

log = logging.getLogger("mesh.tasks")


async def stop(task: asyncio.Task[Any] | None, *, every_s: float = 0.2, give_up_s: float = 30.0) -> bool:
    """Cancel ``task`` again every ``every_s`` until it has ended, and collect its outcome (a
    failure is logged at debug, never raised). True once it ended; False if it still runs after
    ``give_up_s`` (logged: left behind rather than hanging the caller's stop for good)."""
    if task is None:
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_s
    while not task.done():
        if loop.time() >= deadline:
            log.warning(
                "task %s did not stop within %.0f s of being cancelled: left behind", task.get_name(), give_up_s
            )
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=every_s)
    with contextlib.suppress(asyncio.CancelledError):
        exc = task.exception()
        if exc is not None:
            log.debug("task %s ended with %r", task.get_name(), exc)
    return True
