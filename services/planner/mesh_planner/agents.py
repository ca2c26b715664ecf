"""The tenant's agent profiles (issue 48, ``mesh_contracts.v1.agents``): put, removed, pinned.

An author signs an ``agent.change`` and hands it in at the tenant's door; the planner applies it
here (its right judged by ``workflows.may_change``: the same right as a workflow's author):

- ``put``: the profile is validated, its version is its digest; the version's record is created
  (never overwritten) and the tenant's catalogue names it current. Putting the current version
  again changes nothing and says so.
- ``remove``: the catalogue no longer names a version; no new plan may use the profile (steps
  planned with it run on with their pinned version, which stays for them and for the audit).

A plan's step, a workflow's agent node and a task submitted to a profile name the agent; the
planner pins its current version (``name@version``) on the step when the task is planned, and the
worker reads that version (immutable) when it runs the step.

Writes are ordered so that a crash anywhere is finished by the redelivery: the version's record
(create-only), then the catalogue (compare-and-set, idempotent by the change's id), then the audit
link (stored once under the change's id), then the answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from mesh_contracts.v1.agents import (
    AgentCatalog,
    AgentChange,
    AgentChanged,
    AgentEntry,
    AgentEvent,
    AgentProfile,
    AgentVersion,
    agent_ref,
    parse_agent_ref,
)
from mesh_contracts.v1.common import PlanStep
from mesh_contracts.v1.workflow import AgentNode, WorkflowDefinition
from mesh_kit import state as st
from mesh_planner.workflows import Refused

__all__ = ["Agents", "Refused", "fitted", "listing", "one_step", "take_agents", "with_agents", "workflow_agents"]

MAX_AGENTS = 100
"""Profiles one tenant may define."""
KEPT_HISTORY = 50


class Agents:
    def __init__(self, kv: Any) -> None:
        self.kv = kv

    async def catalog(self, tenant: str) -> AgentCatalog:
        rec, _ = await st.load(self.kv, AgentCatalog.key(tenant), AgentCatalog)
        return rec or AgentCatalog()

    async def version(self, tenant: str, name: str, version: str) -> AgentVersion | None:
        rec, _ = await st.load(self.kv, AgentVersion.key(tenant, name, version), AgentVersion)
        return rec

    # --- changes ------------------------------------------------------------------------------

    async def apply(self, m: AgentChange, change_id: str) -> AgentChanged:
        """Apply an author's change (their right already judged); ``Refused`` says why not."""
        if m.action == "remove":
            return await self._remove(m, change_id)
        if m.profile is None:
            raise Refused("put needs a profile")
        if m.profile.name != m.name:
            raise Refused(f"the profile is named {m.profile.name!r}, the change puts {m.name!r}")
        profile, version, now = m.profile, m.profile.digest(), time.time()

        def create(rec: AgentVersion | None) -> AgentVersion | None:
            if rec is not None:
                return None  # the same profile, put before: a version cannot change
            return AgentVersion(tenant=m.tenant, agent=m.name, version=version, profile=profile, put_by=m.by,
                                put_at=now)  # fmt: skip

        await st.update(self.kv, AgentVersion.key(m.tenant, m.name, version), AgentVersion, create)
        event = AgentEvent(action="put", by=m.by, at=now, version=version, reason=m.reason, change_id=change_id)

        def name_it(cat: AgentCatalog | None) -> AgentCatalog | None:
            cat = cat or AgentCatalog()
            entry = cat.agents.get(m.name)
            if entry is not None and (entry.version == version or change_id in {e.change_id for e in entry.history}):
                return None  # already so, or this very change applied before a crash
            if entry is None and len(cat.current()) >= MAX_AGENTS:
                raise Refused(f"tenant {m.tenant} has {MAX_AGENTS} agent profiles, the most it may (remove one)")
            entry = entry or AgentEntry()
            entry.version, entry.description, entry.exposed, entry.pool = (
                version, profile.description, profile.exposed, profile.pool,
            )  # fmt: skip
            entry.history = [*entry.history, event][-KEPT_HISTORY:]
            cat.agents[m.name] = entry
            return cat

        _, changed = await st.update(self.kv, AgentCatalog.key(m.tenant), AgentCatalog, name_it)
        return AgentChanged(tenant=m.tenant, task_id=m.task_id, action=m.action, name=m.name, accepted=True,
                            changed=changed, version=version)  # fmt: skip

    async def _remove(self, m: AgentChange, change_id: str) -> AgentChanged:
        event = AgentEvent(action="remove", by=m.by, at=time.time(), reason=m.reason, change_id=change_id)

        def drop(cat: AgentCatalog | None) -> AgentCatalog | None:
            entry = (cat or AgentCatalog()).agents.get(m.name)
            if cat is None or entry is None:
                raise Refused(f"tenant {m.tenant} has no agent profile {m.name!r}")
            if not entry.version:
                return None  # removed already
            entry.version = ""
            entry.history = [*entry.history, event][-KEPT_HISTORY:]
            return cat

        _, changed = await st.update(self.kv, AgentCatalog.key(m.tenant), AgentCatalog, drop)
        return AgentChanged(tenant=m.tenant, task_id=m.task_id, action=m.action, name=m.name, accepted=True,
                            changed=changed)  # fmt: skip

    # --- tasks --------------------------------------------------------------------------------

    async def resolve(self, tenant: str, ref: str) -> AgentVersion:
        """The version of ``ref`` (``name``: the current one; ``name@version``: that one, if the
        tenant still has the profile) a new plan pins; ``Refused`` says why there is none."""
        try:
            name, version = parse_agent_ref(ref)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        entry = (await self.catalog(tenant)).agents.get(name)
        if entry is None or not entry.version:
            raise Refused(f"tenant {tenant} has no agent profile {name!r} (define it: meshctl agent add)")
        rec = await self.version(tenant, name, version or entry.version)
        if rec is None:
            raise Refused(f"tenant {tenant} has no version {version} of agent profile {name!r}")
        return rec

    async def fitter(self, tenant: str, named: dict[str, str]) -> Callable[[list[PlanStep]], list[PlanStep]]:
        """What pins steps to profiles: each step that ``named`` gives a profile (step id ->
        profile name) to that profile's current version, narrowed to what it may do. The versions
        are read now (``Refused`` if one is unknown); the function itself reads nothing (a record's
        transition runs it)."""
        found = {ref: await self.resolve(tenant, ref) for ref in sorted(set(named.values()))}

        def fit(steps: list[PlanStep]) -> list[PlanStep]:
            return [fitted(s, found[named[s.step_id]]) if s.step_id in named else s for s in steps]

        return fit


def fitted(step: PlanStep, rec: AgentVersion) -> PlanStep:
    """``step`` as ``rec``'s profile runs it: pinned to its version, its tools narrowed to the
    profile's (a step that named none gets all of them), its tier the profile's when it has one."""
    p: AgentProfile = rec.profile
    tools = tuple(t for t in step.tools if t in p.tools) if step.tools else p.tools
    return step.model_copy(
        update={
            "agent": agent_ref(rec.agent, rec.version),
            "tools": tools,
            "difficulty": p.tier or step.difficulty,
            "pool": p.pool,
        }
    )


async def one_step(agents: Agents, tenant: str, ref: str, goal: str) -> tuple[list[PlanStep], str]:
    """A task submitted to a profile (``task.submitted`` ``agent``): its goal as one step of that
    agent, or why it cannot run (no such profile)."""
    try:
        rec = await agents.resolve(tenant, ref)
    except Refused as exc:
        return [], str(exc)
    step = PlanStep(step_id="s1", kind="answer", instruction=goal[:4000])
    return [fitted(step, rec)], ""


async def listing(agents: Agents | None, tenant: str) -> tuple[str, list[str]]:
    """The tenant's profiles as the planning prompt lists them (after the tools), and their names
    (what a plan's ``agent`` may be); nothing when it has none."""
    if agents is None:
        return "", []
    current = (await agents.catalog(tenant)).current()
    if not current:
        return "", []
    named = ", ".join(f"{n} ({e.description.split('. ')[0].rstrip('.')[:100]})" for n, e in current.items())
    hint = f'. Agents (set a step\'s "agent" to one of these to hand it the step; it brings its own tools): {named}'
    return hint, list(current)


def take_agents(text: str) -> tuple[str, dict[str, str]]:
    """The model's plan without the ``agent`` of its steps (``PlanStep.agent`` holds a pinned
    version, which a model does not write), and step id -> the profile each step names."""
    try:
        raw = json.loads(text)
        steps = raw["steps"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return text, {}  # parse_plan says what is wrong with it
    if not isinstance(steps, list):
        return text, {}
    named: dict[str, str] = {}
    for s in steps:
        if isinstance(s, dict) and "agent" in s:
            agent = s.pop("agent")
            if isinstance(agent, str) and agent and isinstance(s.get("step_id"), str):
                named[s["step_id"]] = agent
    return json.dumps(raw), named


def with_agents(schema: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """``plan_schema``'s schema with an optional ``agent`` on each step, one of ``names``."""
    if not names:
        return schema
    for plan in schema["properties"]["steps"]["anyOf"]:
        for step in plan["prefixItems"]:
            step["properties"]["agent"] = {"enum": ["", *names]}
    return schema


def workflow_agents(wf: WorkflowDefinition) -> dict[str, str]:
    """Node id -> the profile each of ``wf``'s agent nodes names."""
    return {n.id: n.agent for n in wf.nodes if isinstance(n, AgentNode) and n.agent}
