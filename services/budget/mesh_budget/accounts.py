"""Spend per task and per tenant-day: folds of the usage stream, checkpointed to KV ``budget``.

The ``usage.recorded`` stream is the record of what was spent (DESIGN, section 5). Every budget
replica's monitor reads all of it in stream order, and folds each verified message into its
task's and its tenant-day's totals here, each call id once. Every ``checkpoint_s`` the totals
that changed are written to KV ``budget`` with the stream sequence they are complete to
(``through``), and then the mark (key ``accounts``): every record is complete to it. A record is
written only over an older one (compare-and-set on ``through``); replicas fold the same stream to
the same totals, so none overwrites a newer record with an older one. A replica that starts reads
the stream from the mark on, and a record it loads counts only the messages after its own
``through``: a crash anywhere (between two records of a round, before the mark) neither loses a
call nor counts one twice (a task's record keeps the stream sequence of each call's first
message, so the tenant-day can tell the message that first brought a call from a copy of it).

Before, the usage consumer wrote both records per usage message (compare-and-set on hot keys: a
task's record, the tenant-day's): 13 stored writes per sample task, and two budget replicas
accounted 0.89x what one did, contending on the same keys. The records are now up to
``checkpoint_s`` behind the stream; the Redis view that reservations are decided on is settled
per message, as before, by the usage consumer.

``read_usage`` reads the stream itself for a rebuild of that view (``mesh_budget.reserve.rebuild``): a
checkpoint and the messages after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from mesh_budget.ledger import OTHER_LABELS, DayUsage, TaskUsage, today
from mesh_budget.partition import Partition, mark_keys
from mesh_contracts import ContractError, parse_message
from mesh_contracts import topology as topo
from mesh_contracts.v1 import TokenUsage, UsageRecorded
from mesh_durable.tail import MAX_BATCH, Reader
from mesh_identity import IdentityError, Verifier
from mesh_kit import envelope as env
from mesh_kit import faults
from mesh_kit import state as st

log = logging.getLogger("mesh.budget.accounts")

MAX_DAY_LABELS = 256
"""Distinct ``label=value`` keys a tenant-day record keeps; the rest are summed under ``(other)``."""
TASKS_KEPT = 20_000
"""Task folds a replica keeps in memory (the least recently used clean ones go first; a task
whose usage comes back is loaded from its record again)."""


class Mark(BaseModel):
    """``budget`` bucket, key ``accounts`` (``accounts.<i>-of-<n>`` for partition i of n): every spend
    record (of the partition's tenants) is complete to this usage sequence."""

    through: int = 0
    at: float = 0.0


@dataclass
class _Fold:
    rec: Any  # TaskUsage | DayUsage
    through: int
    """Usage messages up to this sequence are in ``rec`` (its checkpoint, or the mark)."""
    dirty: bool = False
    ended: bool = False


def add_call(rec: TaskUsage, m: UsageRecorded, seq: int, labels: dict[str, str]) -> None:
    """Fold one call into a task's record (the caller has checked it is not counted yet)."""
    call = _tokens(m)
    agent, model = f"{m.agent}/{m.role or m.agent}", f"{m.provider}/{m.model}"
    rec.call_seqs[m.call_id] = seq
    rec.call_ids.append(m.call_id)
    if m.reservation_id and m.reservation_id != m.call_id:
        rec.reservation_ids.append(m.reservation_id)
    rec.total = rec.total + call
    rec.by_agent[agent] = rec.by_agent.get(agent, TokenUsage()) + call
    rec.by_step[m.step_id or "-"] = rec.by_step.get(m.step_id or "-", TokenUsage()) + call
    rec.by_model[model] = rec.by_model.get(model, TokenUsage()) + call
    rec.errors += 1 if m.error else 0
    rec.updated_at = time.time()
    rec.labels = rec.labels or labels


def add_to_day(rec: DayUsage, m: UsageRecorded, labels: dict[str, str], first_of_task: bool) -> None:
    call = _tokens(m)
    agent, model = f"{m.agent}/{m.role or m.agent}", f"{m.provider}/{m.model}"
    rec.total = rec.total + call
    rec.by_agent[agent] = rec.by_agent.get(agent, TokenUsage()) + call
    rec.by_model[model] = rec.by_model.get(model, TokenUsage()) + call
    for k, v in sorted(labels.items()):
        name = f"{k}={v}"
        if name not in rec.by_label and len(rec.by_label) >= MAX_DAY_LABELS:
            name = OTHER_LABELS  # a day record stays bounded however many users a tenant has
        rec.by_label[name] = rec.by_label.get(name, TokenUsage()) + call
    rec.tasks += 1 if first_of_task else 0


def _tokens(m: UsageRecorded) -> TokenUsage:
    return TokenUsage(input_tokens=m.input_tokens, output_tokens=m.output_tokens,
                      cached_input_tokens=m.cached_input_tokens, cost_usd=m.cost_usd, calls=1)  # fmt: skip


class Accounts:
    def __init__(
        self,
        kv: Any,
        labels: Callable[[str, str], Awaitable[dict[str, str]]],
        *,
        retry_s: float = 0.5,
        partition: Partition | None = None,
    ) -> None:
        self.kv, self._labels, self.retry_s = kv, labels, retry_s
        self.partition = partition or Partition()
        """Whose records this replica writes: its partition's tenants' (``mesh_budget.partition``)."""
        self.mark = 0
        """The mark this replica started from: the stream is folded from the message after it."""
        self.position = 0
        """The last usage sequence folded (or seen and left out: ``seen``)."""
        self.tasks: OrderedDict[tuple[str, str], _Fold] = OrderedDict()
        self.days: dict[tuple[str, str], _Fold] = {}
        self.written = 0
        """Records written by checkpoints (for /status)."""
        self._marked = 0

    async def start(self, last_seq: Callable[[], Awaitable[int]]) -> int:
        """Read the mark (the stream is folded from the message after it) and return it. The first
        budget to start on a mesh puts the mark at the end of what is stored (nothing was accounted
        into records yet that they would not already hold), before any reservation is granted."""
        key = self.partition.mark_key
        mark, _ = await st.load(self.kv, key, Mark)
        if mark is None:
            # A partition's first start (or the partitions were changed): from the earliest mark
            # any partitioning left, which every record is complete to; none at all is a new mesh.
            # A record loaded later counts only what came after its own ``through``: starting
            # early folds again what is already in, and counts none of it twice.
            others = [m for k in mark_keys() if k != key and (m := (await st.load(self.kv, k, Mark))[0]) is not None]
            first = (
                Mark(through=min(m.through for m in others), at=time.time())
                if others
                else Mark(through=await last_seq(), at=time.time())
            )

            def create(cur: Mark | None) -> Mark | None:
                return None if cur is not None else first

            mark, _ = await st.update(self.kv, key, Mark, create)
        assert mark is not None
        self.mark = self.position = self._marked = mark.through
        return mark.through

    async def _load(self, key: str, model: type[Any]) -> Any:
        """A record, read until the broker answers (the fold must not skip a message: a record
        folded on top of nothing would be written over the real one)."""
        while True:
            try:
                rec, _ = await st.load(self.kv, key, model)
                return rec
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - broker away: the usage tail waits for it
                log.debug("reading %s failed (%s); again", key, exc)
                await asyncio.sleep(self.retry_s)

    async def _task(self, tenant: str, task_id: str) -> _Fold:
        key = (tenant, task_id)
        f = self.tasks.get(key)
        if f is not None:
            self.tasks.move_to_end(key)
            return f
        rec = await self._load(TaskUsage.key(tenant, task_id), TaskUsage) or TaskUsage(tenant=tenant, task_id=task_id)
        f = self.tasks[key] = _Fold(rec, max(rec.through, self.mark))
        while len(self.tasks) > TASKS_KEPT:
            oldest = next((k for k, v in self.tasks.items() if not v.dirty), None)
            if oldest is None:
                break
            del self.tasks[oldest]
        return f

    async def _day(self, tenant: str, day: str) -> _Fold:
        key = (tenant, day)
        f = self.days.get(key)
        if f is None:
            rec = await self._load(DayUsage.key(tenant, day), DayUsage) or DayUsage(tenant=tenant, day=day)
            f = self.days[key] = _Fold(rec, max(rec.through, self.mark))
        return f

    async def fold(self, m: UsageRecorded, seq: int, stored_at: float) -> None:
        """Fold one verified usage message (the stream's ``seq``-th, stored at ``stored_at``)."""
        if seq <= self.mark:
            return  # in every record already
        if not self.partition.owns(m.tenant):
            self.seen(seq)  # another partition's records
            return
        # The position moves only once the message is in (a checkpoint taken while this one
        # waits for a record says it is complete to the message before). A record whose totals
        # already hold it then (the task's, between its update and the day's) is written as
        # complete to less than it holds: folded again from there, its call is known by its
        # sequence and not counted twice.
        tf = await self._task(m.tenant, m.task_id)
        rec: TaskUsage = tf.rec
        known = rec.call_seqs.get(m.call_id)
        if (known is not None and known != seq) or (known is None and m.call_id in rec.call_ids):
            self.seen(seq)
            return  # the same call recorded again (a later copy, or counted by a record of before)
        if known is None:
            labels = rec.labels or await self._labels(m.tenant, m.task_id)
            add_call(rec, m, seq, labels)
            tf.dirty = True
        first_of_task = rec.call_ids[0] == m.call_id
        df = await self._day(m.tenant, today(stored_at))
        if seq > df.through:
            add_to_day(df.rec, m, rec.labels, first_of_task)
            df.dirty = True
        self.seen(seq)  # no await since the day's update: a checkpoint sees both or neither

    def seen(self, seq: int) -> None:
        """A usage message that is not folded (it does not verify, or is not a usage record): the
        records are complete past it all the same."""
        self.position = max(self.position, seq)

    def ended(self, tenant: str, task_id: str) -> None:
        """The task ended: its fold is dropped once its record is written (late usage reloads it)."""
        f = self.tasks.get((tenant, task_id))
        if f is not None:
            f.ended = True

    async def checkpoint(self) -> int:
        """Write every record that changed, then the mark; returns how many records were written.
        All are taken at one position first (no fold runs in between): a record must never say it
        is complete to a sequence its totals are not. A failed write leaves its record to the next
        round and the mark where it was."""
        at = self.position
        todo: list[tuple[str, Any, _Fold]] = []
        for (tenant, task_id), f in self.tasks.items():
            if f.dirty:
                todo.append((TaskUsage.key(tenant, task_id), f.rec.model_copy(deep=True), f))
        for (tenant, day), f in self.days.items():
            if f.dirty:
                todo.append((DayUsage.key(tenant, day), f.rec.model_copy(deep=True), f))
        for _, snapshot, f in todo:
            snapshot.through = max(f.through, at)
            f.dirty = False
        written = 0
        try:
            for key, snapshot, _ in todo:
                await self._write(key, snapshot)
                written += 1
                faults.crash_point("budget_mid_checkpoint")  # chaos: die between two records
        except BaseException:
            for _, _, f in todo[written:]:
                f.dirty = True
            raise
        self.written += written
        if at > self._marked:
            await self._write(self.partition.mark_key, Mark(through=at, at=time.time()))
            self._marked = at
        for task_key in [k for k, f in self.tasks.items() if f.ended and not f.dirty]:
            del self.tasks[task_key]
        for day_key in [k for k, f in self.days.items() if not f.dirty and k[1] != today()]:
            del self.days[day_key]  # an earlier day: late usage reloads it
        return written

    async def _write(self, key: str, new: Any) -> None:
        def newer(cur: Any) -> Any:
            return None if cur is not None and cur.through >= new.through else new

        await st.update(self.kv, key, type(new), newer)


async def read_usage(
    nc: Any, verifier: Verifier, subject: str, *, seq: int | None = None, since: float | None = None
) -> list[tuple[int, float, UsageRecorded]]:
    """Every verified usage message on ``subject`` (a filter) from ``seq`` (or stored since
    ``since``), oldest first, as (sequence, stored at, message); what does not verify is left out,
    as its consumer left it out."""
    reader = Reader(nc, topo.STREAMS["usage"], batch=MAX_BATCH)
    out: list[tuple[int, float, UsageRecorded]] = []
    next_seq = seq
    try:
        while True:
            if next_seq is None:
                batch = await reader.read(start_time=since or 0.0, subject=subject)
            else:
                batch = await reader.read(seq=next_seq, subject=subject)
            for s in batch.messages:
                try:
                    model = parse_message(s.subject, s.data)
                    verifier.verify(s.headers.get(env.IDENTITY), s.data, model, at=s.time)
                except (ContractError, IdentityError):
                    continue
                if isinstance(model, UsageRecorded):
                    out.append((s.seq, s.time, model))
            if batch.messages:
                next_seq = batch.messages[-1].seq + 1
            if batch.complete and (not batch.pending or not batch.messages):
                return out
    finally:
        await reader.close()
