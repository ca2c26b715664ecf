"""Durable human approvals: a tool call that needs a person waits in the ``approvals`` bucket.

The wait is a record, not a coroutine: the ``tool.requested`` message is acknowledged once
the record exists, so a restart (or a different replica) loses nothing. The record moves
``pending -> approved | denied | expired`` by compare-and-set, so one decision wins even if a
decision and the timeout race, and ``done`` marks that the outcome has been acted on (the
tool ran under the ledger, or the denial was sent), so a crash between the two is repaired
by whichever delivery or sweep comes next.

Every replica follows the bucket (direct gets, no consumer) and expires overdue records; the compare-and-set makes sure
only one of them acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from mesh_contracts.v1 import ToolRequested
from mesh_kit import state as st
from mesh_kit.tail import Stored, Tail

log = logging.getLogger("mesh.tool-executor.approvals")
BUCKET = "approvals"

REPAIR_GRACE_S = 30.0
"""A decided approval whose outcome nobody has acted on after this long is acted on by the sweep."""

Status = Literal["pending", "approved", "denied", "expired"]


def approval_id(tenant: str, task_id: str, call_id: str) -> str:
    """Deterministic (a redelivered request finds its own record) and opaque (it reveals
    neither tenant nor task to whoever sees the id)."""
    return "ap-" + hashlib.sha256(f"{tenant}.{task_id}.{call_id}".encode()).hexdigest()[:20]


class ApprovalRecord(BaseModel):
    """The ``approvals`` bucket's value, key: the approval id."""

    model_config = ConfigDict(extra="allow")

    approval_id: str
    tenant: str
    task_id: str
    step_id: str
    call_id: str
    tool: str
    request: ToolRequested
    reasons: list[str] = []
    status: Status = "pending"
    requested_at: float = 0.0
    deadline: float = 0.0
    decided_by: str = ""
    comment: str = ""
    decided_at: float = 0.0
    done: bool = False


class Approvals:
    """The approvals bucket, and the expiry of overdue waits."""

    def __init__(self, kv: Any, on_settled: Callable[[ApprovalRecord], Awaitable[None]], *, nc: Any = None) -> None:
        self.kv = kv
        self.nc = nc
        self.on_settled = on_settled
        self._deadlines: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def get(self, aid: str) -> ApprovalRecord | None:
        rec, _ = await st.load(self.kv, aid, ApprovalRecord)
        return rec

    async def open(self, rec: ApprovalRecord) -> tuple[ApprovalRecord, bool]:
        """Create the record unless it exists; returns (the stored record, created)."""

        def create(cur: ApprovalRecord | None) -> ApprovalRecord | None:
            return rec if cur is None else None

        stored, created = await st.update(self.kv, rec.approval_id, ApprovalRecord, create)
        assert stored is not None
        if stored.status == "pending":
            self._deadlines[stored.approval_id] = stored.deadline
        return stored, created

    async def decide(self, aid: str, status: Status, by: str, comment: str = "") -> tuple[ApprovalRecord | None, bool]:
        """Move a pending record to ``status``; (record, changed). A decided record is left as it is."""

        def apply(cur: ApprovalRecord | None) -> ApprovalRecord | None:
            if cur is None or cur.status != "pending":
                return None
            cur.status, cur.decided_by, cur.comment, cur.decided_at = status, by, comment[:500], time.time()
            return cur

        rec, changed = await st.update(self.kv, aid, ApprovalRecord, apply)
        if rec is not None and rec.status != "pending":
            self._deadlines.pop(aid, None)
        return rec, changed

    async def mark_done(self, aid: str) -> None:
        def apply(cur: ApprovalRecord | None) -> ApprovalRecord | None:
            if cur is None or cur.done:
                return None
            cur.done = True
            return cur

        await st.update(self.kv, aid, ApprovalRecord, apply)

    # --- expiry -------------------------------------------------------------------------------

    def start(self, tick_s: float = 0.5) -> None:
        self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._expire(tick_s))]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []

    async def _watch(self) -> None:
        """Learn every pending deadline, including those opened by other replicas and those
        opened before this process started: the bucket read in order from its first entry with
        direct gets (no consumer), then followed."""
        if self.nc is None:
            return  # in-memory bucket (unit tests): only this process's records have deadlines
        # Every write of the bucket rings on a core subscription; the tail then reads what changed
        # (and reads anyway after 2 s of silence).
        tail = Tail(self.nc, f"KV_{BUCKET}", self._seen, feed=f"$KV.{BUCKET}.>", poll_s=2.0)
        try:
            await tail.run()
        finally:
            await tail.stop()

    async def _seen(self, entry: Stored) -> None:
        if entry.operation is not None or not entry.data:
            return
        try:
            rec = ApprovalRecord.model_validate_json(entry.data)
        except ValueError:
            return
        if rec.status == "pending":
            self._deadlines[rec.approval_id] = rec.deadline
        else:
            self._deadlines.pop(rec.approval_id, None)
            if not rec.done:
                # decided but not acted on: repair it if nobody has within a grace period
                self._deadlines[rec.approval_id] = time.time() + REPAIR_GRACE_S

    async def _expire(self, tick_s: float) -> None:
        while True:
            await asyncio.sleep(tick_s)
            now = time.time()
            for aid, deadline in list(self._deadlines.items()):
                if deadline > now:
                    continue
                self._deadlines.pop(aid, None)
                try:
                    rec, _ = await self.decide(aid, "expired", "policy:timeout", "no decision before the deadline")
                    if rec is not None and not rec.done:
                        await self.on_settled(rec)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - retried on the next tick
                    log.warning("approval %s: expiry not applied yet (%s)", aid, exc)
                    self._deadlines[aid] = now + 1.0
