"""The agent profile a step runs as (issue 48, ``mesh_contracts.v1.agents``).

A step the planner handed to one of the tenant's profiles names its pinned version
(``PlanStep.agent``: ``name@version``). The worker reads that version (immutable, so read once per
process) and runs the step with it: the profile's instructions after the system prompt, its tier,
its named model route, its tools only (whatever the step lists besides is not offered, and a call
to it is refused as to any tool not offered) and at most its iterations.
"""

from __future__ import annotations

from typing import Any

from mesh_agent.prompts import Prompt
from mesh_contracts.v1 import StepRequested
from mesh_contracts.v1.agents import AgentProfile, AgentVersion, parse_agent_ref
from mesh_kit import state as st
from mesh_worker.errors import WorkerError

KEPT = 512


class ProfileMissing(WorkerError):
    """The step names a profile version the registry does not hold (the message says which)."""


class Profiles:
    """Profile versions by ``(tenant, name@version)``, read from KV ``workflows`` once each."""

    def __init__(self, kv: Any = None) -> None:
        self.kv = kv
        self._read: dict[tuple[str, str], AgentProfile] = {}

    async def get(self, tenant: str, ref: str) -> AgentProfile | None:
        """The profile a step of ``tenant`` names (None when it names none)."""
        if not ref:
            return None
        known = self._read.get((tenant, ref))
        if known is not None:
            return known
        name, version = parse_agent_ref(ref)
        rec, _ = await st.load(self.kv, AgentVersion.key(tenant, name, version), AgentVersion) if self.kv else (None, 0)
        if rec is None or rec.tenant != tenant or rec.profile.digest() != version:
            raise ProfileMissing(f"agent profile {ref} of tenant {tenant} is not in the registry")
        if len(self._read) >= KEPT:
            self._read.pop(next(iter(self._read)))
        self._read[(tenant, ref)] = rec.profile
        return rec.profile


def applied(m: StepRequested, p: AgentProfile) -> StepRequested:
    """The step as the profile runs it: its tools narrowed to the profile's, its tier, its cap."""
    step = m.step.model_copy(
        update={"tools": tuple(t for t in m.step.tools if t in p.tools), "difficulty": p.tier or m.step.difficulty}
    )
    return m.model_copy(update={"step": step, "max_iterations": min(m.max_iterations, p.max_iterations)})


def with_profile(system: Prompt, p: AgentProfile, ref: str) -> Prompt:
    """The system prompt with the profile's instructions after it (its ref names the profile)."""
    text = f"{system.text}\n\nYou are {p.name}: {p.description}"
    if p.instructions:
        text += f"\n\n{p.instructions}"
    name, _, version = ref.partition("@")
    return Prompt(system.id, f"{system.version}-agent-{name}-{version}", text, system.source, system.description)
