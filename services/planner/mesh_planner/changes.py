"""People's changes to what a tenant runs: its workflows (``mesh_planner.workflows``), its agent
profiles (``mesh_planner.agents``) and its releases (``mesh_planner.releases``). Each change is checked against the signer's rights, applied or
refused, put on the tenant's audit chain either way, and answered on the change's id; a
canary's decision (by its sequential test, or by a person) is announced the same way."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mesh_contracts import Contract
from mesh_contracts.v1 import (
    AgentChange,
    AgentChanged,
    ReleaseChange,
    ReleaseChanged,
    ReleaseDecided,
    WorkflowChange,
    WorkflowChanged,
)
from mesh_contracts.v1.records import TaskRecord
from mesh_durable import chain
from mesh_host import Mesh
from mesh_kit import Delivery
from mesh_kit.delivery import Reject
from mesh_planner import metrics as planner_metrics
from mesh_planner import releases as rel
from mesh_planner.agents import Agents
from mesh_planner.releases import Releases
from mesh_planner.workflows import Refused, Registry, may_change

log = logging.getLogger("mesh.planner")


class Changes:
    """The planner's door for changes to the tenant's workflows and releases (bound by ``start``)."""

    def __init__(
        self,
        mesh: Mesh,
        workflows: Callable[[], Registry | None],
        releases: Callable[[], Releases | None],
        agents: Callable[[], Agents | None],
    ) -> None:
        """``workflows``, ``releases``, ``agents``: the planner's registries, as they are once it started."""
        self.mesh = mesh
        self.audit = chain.of(mesh)
        self._workflows, self._releases, self._agents = workflows, releases, agents

    async def on_workflow(self, m: WorkflowChange, d: Delivery) -> None:
        """An author's change to the tenant's workflows (``mesh_planner.workflows``): applied or
        refused, on the tenant's audit chain either way, and answered on the change's id."""
        workflows = self._workflows()
        assert workflows is not None
        if m.author != d.sender.name:
            raise Reject(f"author {m.author!r} is not the signer {d.sender.name!r}")
        why = may_change(await self.mesh.newest_trust(), d.sender, m.tenant)
        answer: WorkflowChanged | None = None
        if why is None:
            try:
                answer = await workflows.apply(m, m.task_id)
            except Refused as exc:
                why = str(exc)
        detail: dict[str, Any] = {"action": m.action, "name": m.name, "version": m.version, "reason": m.reason}
        if answer is None:
            answer = WorkflowChanged(
                tenant=m.tenant, task_id=m.task_id, action=m.action, name=m.name, version=m.version, accepted=False,
                reason=why or "",
            )  # fmt: skip
        else:
            detail.update(version=answer.version, status=answer.status, latest=answer.latest, changed=answer.changed)
        await self._answer("workflow", m, d, answer, detail)

    async def on_agent(self, m: AgentChange, d: Delivery) -> None:
        """An author's change to the tenant's agent profiles (``mesh_planner.agents``; the right of
        a workflow's author): applied or refused, on the tenant's audit chain either way, and
        answered on the change's id."""
        agents = self._agents()
        assert agents is not None
        if m.by != d.sender.name:
            raise Reject(f"{m.by!r} is not the signer {d.sender.name!r}")
        why = may_change(await self.mesh.newest_trust(), d.sender, m.tenant)
        answer: AgentChanged | None = None
        if why is None:
            try:
                answer = await agents.apply(m, m.task_id)
            except Refused as exc:
                why = str(exc)
        detail: dict[str, Any] = {"action": m.action, "name": m.name, "reason": m.reason}
        if m.profile is not None:
            p = m.profile
            detail["profile"] = {"digest": p.digest(), "tier": p.tier, "route": p.route, "tools": list(p.tools),
                                 "max_iterations": p.max_iterations, "exposed": p.exposed, "pool": p.pool}  # fmt: skip
        if answer is None:
            answer = AgentChanged(tenant=m.tenant, task_id=m.task_id, action=m.action, name=m.name, accepted=False,
                                  reason=why or "")  # fmt: skip
        else:
            detail.update(version=answer.version, changed=answer.changed)
        await self._answer("agent", m, d, answer, detail)

    async def _answer(self, what: str, m: Contract, d: Delivery, answer: Any, detail: dict[str, Any]) -> None:
        """A person's change to the tenant's workflows or releases, on its audit chain
        (``<what>.<action>``, or ``<what>.change-refused`` with why), then answered on its id."""
        action = str(getattr(m, "action", ""))
        if answer.accepted:
            kind, key = f"{what}.{action}", f"{m.task_id}:{action}"
        else:
            kind, key, detail = f"{what}.change-refused", f"{m.task_id}:refused", {**detail, "refused": answer.reason}
        await self.audit.append(m.tenant, m.task_id, kind, key, actor=d.sender.name, source=d.msg_id, detail=detail)
        await self.mesh.publish(answer, key="changed", causation=d.msg_id)

    async def on_release(self, m: ReleaseChange, d: Delivery) -> None:
        """A person's change to the tenant's releases (``mesh_planner.releases``): applied or
        refused, on the tenant's audit chain either way, and answered on the change's id."""
        releases = self._releases()
        assert releases is not None
        if m.by != d.sender.name:
            raise Reject(f"{m.by!r} is not the signer {d.sender.name!r}")
        why = rel.may_change(await self.mesh.newest_trust(), d.sender, m.tenant, m.action)
        answer: ReleaseChanged | None = None
        decided: list[Any] = []
        if why is None:
            try:
                answer, decided = await releases.apply(m, m.task_id)
            except rel.Refused as exc:
                why = str(exc)
        detail = {"action": m.action, "version": m.version, "share": m.share, "forced": m.force, "reason": m.reason}
        if m.evaluation is not None:
            detail["evaluation"] = {
                "verdict": m.evaluation.verdict,
                "cases": m.evaluation.cases,
                "passed": m.evaluation.passed,
                "regressions": list(m.evaluation.regressions),
            }
        if answer is None:
            answer = ReleaseChanged(tenant=m.tenant, task_id=m.task_id, action=m.action, version=m.version,
                                    accepted=False, reason=why or "")  # fmt: skip
        else:
            detail.update(version=answer.version, current=answer.current, canary=answer.canary, changed=answer.changed)
        await self._answer("release", m, d, answer, detail)
        if decided:
            await self.announce(m.tenant, decided)

    async def observe(self, rec: TaskRecord) -> None:
        """An ended task counts in its tenant's canary; a decision it brings is announced."""
        releases = self._releases()
        if releases is None:
            return
        try:
            decided = await releases.observe(rec)
        except Exception:
            log.exception("release observation of %s/%s failed", rec.tenant, rec.task_id)
            return
        if decided:
            await self.announce(rec.tenant, decided)

    async def announce(self, tenant: str, decided: list[Any]) -> None:
        """Each decision on the tenant's audit chain and as ``release.decided`` (idempotent: keyed
        by the decision), then cleared from the channel's unannounced list."""
        releases = self._releases()
        assert releases is not None
        for e in decided:
            self.mesh.count(planner_metrics.M_RELEASE_DECISIONS, {"tenant": tenant, "decision": e.action})
            log.warning("release %s of tenant %s %s by %s: %s", e.version, tenant, e.action, e.by, e.reason)
            detail = {"version": e.version, "current": e.current, "tasks": e.tasks, "bad": e.bad, "llr": e.llr,
                      "lower": e.lower, "upper": e.upper, "reason": e.reason}  # fmt: skip
            await self.audit.append(tenant, e.change_id, f"release.{e.action}", e.change_id, actor=e.by, detail=detail)
            await self.mesh.publish(
                ReleaseDecided(tenant=tenant, task_id=e.change_id, decision=e.action, version=e.version,
                               current=e.current, by=e.by, tasks=e.tasks, bad=e.bad, llr=e.llr, lower=e.lower,
                               upper=e.upper, reason=e.reason[:2000]),
                key="decided",
            )  # fmt: skip
        await releases.announced(tenant, decided)
