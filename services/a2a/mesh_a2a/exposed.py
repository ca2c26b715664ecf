"""What a tenant exposes over A2A: one place, so a new kind of agent is added here and nowhere else.

A tenant exposes ``mesh`` (the planner plans from the goal: any goal), each workflow it registered
that has an active version (``meshctl workflow publish``; a task runs it with
``TaskSubmitted.workflow``) and each of its agent profiles marked ``exposed`` (``meshctl agent add
--exposed``; a task hands its goal to the profile with ``TaskSubmitted.agent``, pinned to the
version the card showed). A profile and a workflow of the same name: the profile is exposed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from mesh_contracts.base import ID_PATTERN
from mesh_contracts.v1.agents import AgentCatalog
from mesh_contracts.v1.records import WorkflowCatalog
from meshctl.client import TenantClient

_ID = re.compile(ID_PATTERN)
MESH = "mesh"
"""The planner's agent, which every tenant exposes (a workflow of that name is not exposed: it
would be ambiguous)."""
MESH_DESCRIPTION = (
    "AgentMesh: give it a goal in words; the mesh plans steps (research with retrieval, tools, "
    "computation), runs them, checks the answer and returns it with its citations."
)


@dataclass(frozen=True)
class Agent:
    """One agent a tenant exposes: its card's name, description and version, and what a task
    submitted to it names."""

    name: str
    kind: Literal["mesh", "workflow", "profile"]
    description: str
    version: str
    inputs: dict[str, Any] | None = None
    """The JSON Schema of the inputs it takes (a workflow's): sent as a data part of the message."""
    submission: dict[str, Any] = field(default_factory=dict)
    """The fields of ``TenantClient.submit`` that pick this agent (``{"workflow": name}``)."""


def mesh_agent() -> Agent:
    return Agent(MESH, "mesh", MESH_DESCRIPTION, "1")


async def workflows(client: TenantClient) -> dict[str, str]:
    """The tenant's workflows that a task may start now, each with its latest active version."""
    raw = await client.registry("catalog")
    if raw is None:
        return {}
    catalog = WorkflowCatalog.model_validate(raw)
    return {name: v for name in catalog.workflows if (v := catalog.latest(name)) and name != MESH}


async def profiles(client: TenantClient) -> dict[str, str]:
    """The tenant's agent profiles marked ``exposed``, each with its current version."""
    raw = await client.registry("agents")
    if raw is None:
        return {}
    current = AgentCatalog.model_validate(raw).current()
    return {name: e.version for name, e in current.items() if e.exposed and name != MESH}


async def exposed(client: TenantClient) -> dict[str, Agent]:
    """Every agent the tenant of ``client`` exposes, by name (its cards' list; ``find`` for one)."""
    found = {MESH: mesh_agent()}
    for name in {*await workflows(client), *await profiles(client)}:
        agent = await find(client, name)
        if agent is not None:
            found[name] = agent
    return dict(sorted(found.items()))


async def profile(client: TenantClient, name: str) -> Agent | None:
    """The exposed profile ``name`` of the tenant of ``client`` as an agent, or None."""
    version = (await profiles(client)).get(name)
    record = await client.registry(f"agent.{name}.{version}") if version else None
    if not record:
        return None
    p = record.get("profile") or {}
    return Agent(name, "profile", str(p.get("description") or name), version or "", None,
                 {"agent": f"{name}@{version}"})  # fmt: skip


async def find(client: TenantClient, name: str) -> Agent | None:
    """The agent ``name`` of the tenant of ``client``, or None when it exposes none of that name."""
    if name == MESH:
        return mesh_agent()
    if not _ID.match(name):
        return None
    as_profile = await profile(client, name)
    if as_profile is not None:
        return as_profile
    version = (await workflows(client)).get(name)
    if not version:
        return None
    record = await client.registry(f"wf.{name}.{version}") or {}
    definition = record.get("definition") or {}
    description = str(definition.get("description") or f"The {name} workflow of {client.tenant}.")
    inputs = definition.get("inputs")
    return Agent(name, "workflow", description, version, inputs if isinstance(inputs, dict) else None,
                 {"workflow": f"{name}@{version}"})  # fmt: skip
