"""Whether a submission becomes a task, and on what terms: refused, waiting, or admitted.

A submission is refused (a ``task.rejected`` with a code and, when waiting helps, a retry-after)
when its tenant may run registered workflows only and names none, when the workflow it names
cannot run, when the mesh's streams are nearly full, or when its tenant is over its admission
limits; it waits, parked, while its tenant is at its share of the run slots; otherwise it is
admitted with the workflow version it pins, its nodes' budget shares and the release it runs.

A redelivered submission of a task that already started is never refused: it goes on with what
it was admitted with. Whether the task started is its record, read at most once per submission
and only when a refusal hangs on it (a new task costs no read).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mesh_contracts.v1 import TaskRejected, TaskSubmitted
from mesh_contracts.v1.records import TERMINAL, TaskRecord
from mesh_contracts.v1.workflow_runs import not_runnable
from mesh_durable import records
from mesh_host import Mesh
from mesh_kit import Delivery, Park
from mesh_planner import metrics as planner_metrics
from mesh_planner import releases as rel
from mesh_planner.admission import Admission, StoreLevel, Wait
from mesh_planner.workflows import Refused, Registry

log = logging.getLogger("mesh.planner")


@dataclass
class Admitted:
    """What an admitted submission runs: the workflow version it pins ('' for a plan of the
    model's) and its nodes' budget shares, the release it runs and why that one."""

    workflow: str = ""
    shares: dict[str, float] = field(default_factory=dict)
    release: str = ""
    how: str = ""


class Started:
    """Whether the submission's task has a record (it started), read once, when first asked."""

    def __init__(self, kv: Any, m: TaskSubmitted) -> None:
        self._kv, self._m = kv, m
        self._read = False
        self._rec: TaskRecord | None = None

    async def record(self) -> TaskRecord | None:
        if not self._read:
            self._rec, self._read = await records.task_record(self._kv, self._m.tenant, self._m.task_id), True
        return self._rec


class Intake:
    """The planner's door policy. Its parts are the planner's, made at its start (getters)."""

    def __init__(
        self,
        mesh: Mesh,
        *,
        records: Callable[[], Any],
        fixed: Callable[[str], bool],
        admission: Callable[[], Admission | None],
        store: Callable[[], StoreLevel | None],
        workflows: Callable[[], Registry | None],
        releases: Callable[[], rel.Releases | None],
        ended: Callable[[TaskRecord], Awaitable[None]],
    ) -> None:
        self.mesh, self._records, self._fixed = mesh, records, fixed
        self._admission, self._store, self._workflows, self._releases = admission, store, workflows, releases
        self._ended = ended
        self.waited: set[tuple[str, str]] = set()
        """Tasks this replica set to wait for a run slot (asked again, they may have been cancelled meanwhile)."""

    async def admit(self, m: TaskSubmitted, d: Delivery) -> Admitted | None:
        """The terms the submission is admitted on, or None when it was refused (and told so) or
        has ended meanwhile; ``Park`` while it waits for a run slot."""
        started = Started(self._records(), m)
        if (m.tenant, m.task_id) in self.waited:
            # Back from waiting for a run slot: it may have been cancelled meanwhile (a queue
            # limit, an operator), and then it has a record and must not count again. Released
            # again: a replica that took the submission over after the cancel admitted it anew.
            self.waited.discard((m.tenant, m.task_id))
            rec = await started.record()
            if rec is not None and rec.status in TERMINAL:
                await self._ended(rec)
                return None
        terms = Admitted()
        if m.workflow is None and self._fixed(m.tenant) and await started.record() is None:
            await self.refuse(m, d, f"tenant {m.tenant} runs registered workflows only (MESH_PLAN_FIXED): "
                                    "name one (meshctl submit --workflow NAME)")  # fmt: skip
            return None
        if m.workflow is not None:
            try:
                terms.workflow, terms.shares = await self._resolve(m)
            except Refused as exc:
                if await started.record() is None:
                    await self.refuse(m, d, str(exc))
                    return None
                # a redelivered submission of a task that started it: it runs on with its version
        if not await self._admitted(m, d, started):
            return None
        releases = self._releases()
        if releases is not None:  # (a redelivery's record keeps the version it was admitted with)
            try:
                terms.release, terms.how = await releases.choose(m.tenant, m.task_id, m.release)
            except rel.Refused as exc:
                await self.refuse(m, d, str(exc))
                return None
        return terms

    async def _admitted(self, m: TaskSubmitted, d: Delivery, started: Started) -> bool:
        """Past the store's high-water mark and the tenant's admission limits (``Park`` while it
        waits for a run slot); a refusal is published here."""
        admission, store = self._admission(), self._store()
        refusal = await store.over() if store is not None else None
        if refusal is not None and await started.record() is not None:
            refusal = None  # a redelivered submission of a task already in flight: it goes on
        elif refusal is not None and admission is not None:
            admission.refused(m.tenant, refusal.code)
        if refusal is None and admission is not None:
            decision = await admission.admit(m.tenant, m.task_id, m.limits.deadline_s, priority=m.priority)
            if isinstance(decision, Wait):
                # Admitted; its tenant is at its share of the run slots: the submission waits,
                # not taken up (queued, as the budget sees it), until one is free for it.
                if (m.tenant, m.task_id) not in self.waited:
                    self.mesh.count(planner_metrics.M_SLOT_WAITS, {"tenant": m.tenant})
                self.waited.add((m.tenant, m.task_id))
                raise Park(decision.until, f"{TaskRecord.key(m.tenant, m.task_id)} waits for a run slot")
            refusal = decision
        if refusal is None:
            return True
        self.mesh.count(planner_metrics.M_REFUSED, {"tenant": m.tenant, "code": refusal.code})
        key = TaskRecord.key(m.tenant, m.task_id)
        log.info("refused %s: %s (retry after %.2fs)", key, refusal.reason, refusal.retry_after_s)
        await self.mesh.publish(
            TaskRejected(
                tenant=m.tenant, task_id=m.task_id, reason=refusal.reason, source_subject=d.subject,
                code=refusal.code, retry_after_s=refusal.retry_after_s,
            ),
            key=f"refused:{d.msg_id}", causation=d.msg_id,
        )  # fmt: skip
        return False

    async def _resolve(self, m: TaskSubmitted) -> tuple[str, dict[str, float]]:
        """``name@version`` of the workflow the submission names, and its nodes' budget shares
        (``Refused``: why it cannot run)."""
        workflows = self._workflows()
        assert workflows is not None and m.workflow is not None
        found = await workflows.resolve(m.tenant, m.workflow, m.inputs)
        gaps = not_runnable(found.definition)
        if gaps:
            raise Refused(f"workflow {found.ref} cannot run on this planner yet: {'; '.join(gaps)}")
        if len(found.definition.nodes) > m.limits.max_steps:
            raise Refused(
                f"workflow {found.ref} has {len(found.definition.nodes)} nodes, over the task's max_steps "
                f"({m.limits.max_steps}): submit it with a higher limit"
            )
        return found.ref, {n.id: n.budget_share for n in found.definition.nodes if n.budget_share is not None}

    async def refuse(self, m: TaskSubmitted, d: Delivery, reason: str) -> None:
        """A submission that cannot run as submitted: refused, nothing ran. Usually before
        admission; but one that waited for a run slot was admitted, and its version may have been
        withdrawn meanwhile: it no longer counts in flight."""
        admission = self._admission()
        if admission is not None:
            admission.refused(m.tenant, "invalid")
            await admission.release(m.tenant, m.task_id, None)  # if it was admitted (as on_rejected)
        self.mesh.count(planner_metrics.M_REFUSED, {"tenant": m.tenant, "code": "invalid"})
        await self.mesh.publish(
            TaskRejected(tenant=m.tenant, task_id=m.task_id, reason=reason, source_subject=d.subject, code="invalid"),
            key=f"refused:{d.msg_id}", causation=d.msg_id,
        )  # fmt: skip
