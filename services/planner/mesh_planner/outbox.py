"""A task record's outbox. A transition writes the messages it decides (``out``, ``event``, a wait's
wake-up) into the record in the same compare-and-set as the decision; ``Outbox`` publishes them
with deterministic ids, then removes them from the record: in the task's next transition's write
when one comes within ``CLEAR_AFTER_S``, else in a write of its own. A crash anywhere leaves
either nothing done or an outbox that the next delivery flushes: no decision is lost, and the
streams' dedup window absorbs republishing."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from mesh_contracts import Contract
from mesh_contracts.registry import BY_TYPE
from mesh_contracts.v1 import CheckRequested, ProgressEvent, SignedRecord
from mesh_contracts.v1.records import OutboxItem, TaskRecord
from mesh_durable import records
from mesh_host import Mesh
from mesh_kit import envelope as env
from mesh_kit import state as st
from mesh_planner.timers import Timers

WAKE = "timer.wake"
"""Outbox items that are wake-ups to schedule (not messages): key the wait id, body its ``due_at``."""
CHECK_RETRIEVALS_MAX_BYTES = 3 * 1024 * 1024
"""Retrieval records one check request carries at most (under the contract's 4 MB); they are
added when the request is published (``Outbox.with_evidence``)."""


def out(rec: TaskRecord, msg: Contract, key: str, causation: str = "") -> None:
    rec.outbox.append(OutboxItem(type=msg.type, key=key, body=msg.model_dump(mode="json"), causation=causation))


def event(rec: TaskRecord, stage: str, message: str, step_id: str = "", key: str = "") -> None:
    out(
        rec,
        ProgressEvent(
            tenant=rec.tenant, task_id=rec.task_id, source="planner", stage=stage, message=message, step_id=step_id
        ),
        key=f"planner:{stage}:{step_id}:{key}",
    )


log = logging.getLogger("mesh.planner.outbox")

CLEAR_AFTER_S = 2.0
"""How long a published outbox stays in its record before a write of its own clears it. The task's
next transition within that time clears it in the write it makes anyway (``drop_sent``): a sample
task's transitions come a few hundred milliseconds apart, and its record writes went from 12 to 7.
Meanwhile a crash of this process leaves the published items for whoever handles the task next to
publish again, as a crash between publishing and clearing always did: the streams' dedup window
(10 minutes) drops the copies, and a tenant's client drops live copies by message id."""

SENDING, SENT = "sending", "sent"
SENT_KEPT = 20_000
"""Outbox items a planner remembers publishing (the oldest are forgotten first; a forgotten one
still in a record is only published again, and the stream drops the copy)."""


class Outbox:
    def __init__(
        self,
        mesh: Mesh,
        records: Callable[[], Any],
        evidence: Callable[[], Any],
        timers: Callable[[], Timers | None],
    ) -> None:
        """``records``, ``evidence``, ``timers``: the planner's buckets (``tasks``, ``evidence``:
        the retrieval records a check request carries) and timers, as they are once started."""
        self.mesh = mesh
        self._records, self._evidence, self._timers = records, evidence, timers
        self._sent: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        """Outbox items (task, type, key) this process is publishing (SENDING) or has published (SENT)."""
        self._clears: dict[str, asyncio.Task[None]] = {}
        """Per task record: the write of its own that clears what was published, waiting ``CLEAR_AFTER_S``."""

    def drop_sent(self, rec: TaskRecord) -> None:
        """Take out of ``rec`` (about to be written anyway) the items this process has published."""
        task = TaskRecord.key(rec.tenant, rec.task_id)
        rec.outbox = [i for i in rec.outbox if self._sent.get((task, i.type, i.key)) != SENT]

    async def drain(self) -> None:
        """Clear now what is published and waiting to be cleared (the service is stopping)."""
        pending, self._clears = self._clears, {}
        for t in pending.values():
            t.cancel()
        await asyncio.gather(*(self._clear(task) for task in pending), return_exceptions=True)

    def _clear_later(self, task: str) -> None:
        if task not in self._clears:  # one clear per record takes whatever is published by then
            self._clears[task] = asyncio.create_task(self._clear(task, CLEAR_AFTER_S))

    async def _clear(self, task: str, after_s: float = 0.0) -> None:
        if after_s:
            await asyncio.sleep(after_s)
            self._clears.pop(task, None)  # published from now on: cleared by the next one

        def clear(r: TaskRecord | None) -> TaskRecord | None:
            if r is None:
                return None
            kept = [i for i in r.outbox if self._sent.get((task, i.type, i.key)) != SENT]
            if len(kept) == len(r.outbox):
                return None  # cleared already (by a transition's write), or nothing published yet
            r.outbox = kept
            return r

        try:
            await st.update(self._records(), task, TaskRecord, clear)
        except Exception as exc:  # noqa: BLE001 - left in the record: the task's next handler publishes it again
            log.warning("%s: outbox not cleared (%s: %s); its messages will be published again", task,
                        type(exc).__name__, exc)  # fmt: skip

    async def flush(self, rec: TaskRecord) -> None:
        """Publish the record's outbox, then have what was published removed from the stored
        record (by the next transition, or by a write of its own after ``CLEAR_AFTER_S``).

        Items this process has already published (or is publishing right now, in another
        handler) are not sent again: two transitions of one task in a row, the second written
        before the first's outbox was cleared, used to publish the first's messages twice (the
        stream dropped the copies; a client following the task saw its events twice). Items of
        unknown fate (written by a process that died) are published again: that is the repair."""
        if not rec.outbox:
            return
        task = TaskRecord.key(rec.tenant, rec.task_id)
        done = set()
        for item in rec.outbox:
            mark = (task, item.type, item.key)
            state = self._sent.get(mark)
            if state == SENT:
                done.add((item.type, item.key))
                continue
            if state == SENDING:
                continue  # another handler of this process has it: it clears it once sent
            self._sent[mark] = SENDING
            try:
                if item.type == WAKE:
                    timers = self._timers()
                    assert timers is not None
                    await timers.schedule(rec.tenant, rec.task_id, item.key, float(item.body["due_at"]))
                    self._sent[mark] = SENT
                    done.add((item.type, item.key))
                    continue
                cls = BY_TYPE[(item.type, 1)]
                msg = cls.model_validate(item.body)
                if isinstance(msg, CheckRequested):
                    msg = await self.with_evidence(msg, rec)
                with env.releasing(rec.tenant, rec.task_id, rec.release):
                    await self.mesh.publish(msg, key=item.key, causation=item.causation or None,
                                            priority=rec.priority)  # fmt: skip
            except BaseException:
                self._sent.pop(mark, None)
                raise
            self._sent[mark] = SENT
            self._sent.move_to_end(mark)
            while len(self._sent) > SENT_KEPT:
                self._sent.popitem(last=False)
            done.add((item.type, item.key))
        if done:
            self._clear_later(task)

    async def with_evidence(self, m: CheckRequested, rec: TaskRecord) -> CheckRequested:
        """The check request with each step's retrieval records, as the worker handed them on (kept
        in the planner's own ``evidence`` bucket, not in the task record, which other services
        read). Deterministic: a re-flush sends the same body."""
        evidence = self._evidence()
        if evidence is None:
            return m
        room = CHECK_RETRIEVALS_MAX_BYTES
        steps = []
        for s in m.steps:
            state = rec.steps.get(s.step_id)
            read: tuple[SignedRecord, ...] = ()
            if state is not None:
                found = await records.evidence(evidence, m.tenant, m.task_id, s.step_id, state.attempt)
                if found is not None:
                    kept = []
                    for r in found.records:
                        room -= len(r.body) + len(r.token)
                        if room < 0:
                            break
                        kept.append(r)
                    read = tuple(kept)
            steps.append(s.model_copy(update={"retrievals": read}))
        return m.model_copy(update={"steps": tuple(steps)})
