"""Live output: a model call's text streamed to clients while the provider produces it.

One ``Live`` per model call: the loop hands it the provider's tokens as they come, a reset when
the call failed mid-stream and a retry or a fallback takes over, and the end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal

from mesh_contracts.v1 import TokenDelta
from mesh_host import Mesh
from mesh_worker import metrics as worker_metrics

log = logging.getLogger("mesh.worker")


class Live:
    """Streams one model call's text to clients as it arrives (core NATS ``live.v1.<tenant>.<task>.token``).

    The first delta goes out at once (time to first token is the provider's). What arrives within
    ``window_s`` of the last delta sent is joined into the next one, sent when the window closes:
    a provider handing over one token at a time would otherwise cost a signed message per token
    (one signature here, one verification in every watching client). A lost delta (no one
    listening, a broker hiccup) never affects the step: the durable result is the
    ``step.completed`` that follows."""

    def __init__(
        self, mesh: Mesh, tenant: str, task_id: str, step_id: str, call_id: str, window_s: float = 0.0
    ) -> None:
        self.mesh, self.tenant, self.task_id, self.step_id, self.call_id = mesh, tenant, task_id, step_id, call_id
        self.window_s = window_s
        self.seq = 0
        self._held: list[str] = []
        self._last = -1e9  # monotonic time the last delta was sent
        self._flusher: asyncio.Task[None] | None = None

    async def _emit(self, kind: Literal["delta", "reset", "end"], text: str = "", model: str = "") -> None:
        delta = TokenDelta(
            tenant=self.tenant,
            task_id=self.task_id,
            step_id=self.step_id,
            call_id=self.call_id,
            seq=self.seq,
            text=text,
            kind=kind,
            model=model,
        )
        self.seq += 1
        try:
            await self.mesh.emit(delta)
        except Exception as exc:  # noqa: BLE001 - live output is best effort by design
            log.debug("token delta not sent: %s", exc)

    async def token(self, text: str) -> None:
        self.mesh.count(worker_metrics.M_TOKENS_STREAMED)
        now = time.monotonic()
        if not self._held and now - self._last >= self.window_s:
            self._last = now
            await self._emit("delta", text)
            return
        self._held.append(text)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_after(self._last + self.window_s - now))

    async def _flush_after(self, delay_s: float) -> None:
        await asyncio.sleep(max(0.0, delay_s))
        self._flusher = None
        await self._flush()

    async def _flush(self) -> None:
        if self._held:
            text = "".join(self._held)
            self._held.clear()
            self._last = time.monotonic()
            await self._emit("delta", text)

    def _stop_flusher(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None

    async def reset(self, reason: str) -> None:
        self._stop_flusher()
        self._held.clear()  # the failed attempt's text: the client drops what it has of it anyway
        await self._emit("reset", reason[:200])

    async def end(self, model: str) -> None:
        self._stop_flusher()
        await self._flush()
        if self.seq:
            await self._emit("end", model=model)
