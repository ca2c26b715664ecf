"""Backing services a process uses besides NATS (today: Redis), and what their loss means.

A ``Dependency`` is probed in the background and marked down the moment a call to it fails, so
a caller can skip it without paying a connect timeout on every message:

- **required** (the budget's shared reservations): while it is down the service is not ready
  (``/readyz`` 503 with the reason), so Kubernetes takes the pod out and an operator sees why;
- **optional** (rag's retrieval cache, the tool-executor's shared rate-limit window): the
  service stays ready and says it is degraded; the caller falls back (a cache miss, a window
  kept in the process) instead of failing the call.

A Redis client that fails fast is ``mesh_durable.redis.redis_client``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mesh_kit import tasks

log = logging.getLogger("mesh.deps")
PROBE_TIMEOUT_S = 3.0
"""A probe that has not answered by then counts as down, unless the dependency says otherwise
(a Redis client's: ``mesh_durable.redis.dependency``)."""


class Dependency:
    """One backing service: its state (up or down, since when, why) and a background probe."""

    def __init__(
        self,
        name: str,
        probe: Callable[[], Awaitable[Any]],
        *,
        required: bool,
        purpose: str,
        interval_s: float = 5.0,
        timeout_s: float = PROBE_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.required = required
        self.purpose = purpose
        """What the service loses without it, e.g. "retrieval cache (misses while down)"."""
        self.interval_s = interval_s
        self._probe = probe
        self._clock = clock
        self.up = True
        self.reason = ""
        self.since = clock()
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        self.on_change: Callable[[Dependency], None] | None = None

    def down(self, exc: BaseException | str) -> None:
        """Mark it down (a call failed or the probe did)."""
        self.failures += 1
        why = exc if isinstance(exc, str) else (f"{type(exc).__name__}: {exc}".rstrip(": ") or type(exc).__name__)
        self.reason = why[:200]
        if self.up:
            self.up, self.since = False, self._clock()
            log.warning("%s unreachable (%s): %s", self.name, why[:200], self._consequence())
            if self.on_change:
                self.on_change(self)

    def ok(self) -> None:
        if not self.up:
            self.up, self.since, self.reason = True, self._clock(), ""
            log.info("%s reachable again", self.name)
            if self.on_change:
                self.on_change(self)

    def _consequence(self) -> str:
        return "not ready until it is back" if self.required else f"degraded: {self.purpose}"

    async def check(self) -> bool:
        """Probe once; the state follows the outcome."""
        try:
            await asyncio.wait_for(self._probe(), self.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the probe means it is down
            self.down(exc)
            return False
        self.ok()
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"probe-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            await tasks.stop(self._task)
            self._task = None

    async def _loop(self) -> None:
        while True:
            await self.check()
            # While down, look again sooner: a service out of rotation wants back in quickly.
            await asyncio.sleep(self.interval_s if self.up else min(1.0, self.interval_s))

    def describe(self) -> dict[str, Any]:
        return {
            "up": self.up,
            "required": self.required,
            "purpose": self.purpose,
            "since": round(self.since, 3),
            "reason": self.reason,
            "failures": self.failures,
        }


def readiness(deps: dict[str, Dependency]) -> tuple[bool, str]:
    """(ready, reason) from the dependencies alone: a required one down makes the service not
    ready; an optional one down leaves it ready and says what is degraded."""
    required = [d for d in deps.values() if d.required and not d.up]
    if required:
        return False, "; ".join(f"{d.name} unreachable ({d.reason}): needed for {d.purpose}" for d in required)
    degraded = [d for d in deps.values() if not d.up]
    if degraded:
        return True, "degraded: " + "; ".join(f"{d.name} unreachable, {d.purpose}" for d in degraded)
    return True, "ok"
