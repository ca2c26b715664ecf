"""The expiry horizon: a time before which every stored usage message has been accounted.

A reservation left unsettled is released only once its expiry is behind the horizon
(``mesh_budget.ledger``): expiry on the wall clock alone would let a budget that fell behind
forget a call that was made and not yet counted. The horizon is read from the broker: the usage
durable's ack floor against the last message the USAGE stream holds.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mesh_contracts import topology as topo
from mesh_durable.tail import Reader
from mesh_host import Mesh
from mesh_kit import tasks

log = logging.getLogger("mesh.budget")
USAGE_DURABLE = "budget--usage-recorded"


class Horizon:
    """``at``: the horizon, kept by polling every ``poll_s`` once started (0 until the first
    look at the accounting backlog: nothing expires before it)."""

    def __init__(self, mesh: Mesh, poll_s: float) -> None:
        self.mesh = mesh
        self.poll_s = poll_s
        self.at = 0.0
        self._samples: list[tuple[float, int]] = []
        self._poller: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._poller = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        await tasks.stop(self._poller)  # the poll catches what a cancellation becomes in nats-py

    async def _poll(self) -> None:
        """Keep ``at``.

        Each poll notes (time, last stored usage sequence). Once the consumer's ack floor has
        passed that sequence, everything stored before that time is counted, so reservations
        that expired before it and are still unsettled were abandoned. With no backlog at all
        the horizon is the poll time itself."""
        js = self.mesh.nc.jetstream()
        usage = Reader(self.mesh.nc, topo.STREAMS["usage"])
        while True:
            sent = time.time()
            try:
                last = await usage.last("usage.>")  # the last stored usage message (a direct get)
                info = await js.consumer_info(topo.STREAMS["usage"], USAGE_DURABLE, timeout=2.0)
            except Exception as exc:  # noqa: BLE001 - broker away: the horizon just stands still
                log.debug("horizon poll failed: %s", exc)
            else:
                if not info.num_pending and not info.num_ack_pending:
                    self.at, self._samples = sent, []
                else:
                    self._samples.append((sent, last.seq if last is not None else 0))
                    floor = info.ack_floor.stream_seq if info.ack_floor else 0
                    passed = [t for t, seq in self._samples if seq <= (floor or 0)]
                    if passed:
                        self.at = max(self.at, max(passed))
                        self._samples = [(t, s) for t, s in self._samples if t > self.at]
                    self._samples = self._samples[-600:]
            await asyncio.sleep(self.poll_s)
