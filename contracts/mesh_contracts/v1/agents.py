"""A tenant's agent profiles (issue 48): named agents a team defines as data, not as a fork.

A profile is what a step of that agent runs with: instructions (added to the worker's system
prompt), a model tier or a named route of the model gateway, the tools it may call (built-ins,
the tenant's tool servers' tools, external A2A agents), whether it may search the tenant's
documents, and a cap on its model calls per step. The planner may dispatch a plan step to a
profile, a workflow's agent node names one, a task may be submitted to one (``agent`` on
``task.submitted``: the goal is one step of that agent), and a profile marked ``exposed`` is
published as an A2A agent card by the ``a2a`` gateway. A profile that names a ``pool`` runs on
the workers of that pool only: a dedicated deployment with its own consumer, scaling and identity.

A person changes profiles with ``agent.change`` (``put`` and ``remove``: an author's right),
handed in at the tenant's door; the planner keeps them (KV ``workflows``, beside the tenant's
workflows), records every change (refused ones too) on the tenant's audit chain and answers with
``agent.changed`` on the change's id. A version is the digest of the profile's canonical JSON:
immutable, so a task's steps run the version they were planned with to their end, a newer one
put meanwhile or not.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mesh_contracts.base import AUTHOR, CLIENT, POOL_PATTERN, Contract, ContractSpec
from mesh_contracts.decode import KB
from mesh_contracts.v1.records import Record

AGENT_NAME = r"^[a-z0-9][a-z0-9_-]{0,47}$"
"""A profile's name: what plans, workflows, tasks and A2A cards call it by."""
MAX_TOOLS = 64


class AgentProfile(BaseModel):
    """One named agent of a tenant, as its author defines it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=AGENT_NAME)
    description: str = Field(min_length=1, max_length=1000)
    """What it is for: the planner chooses a profile by it, and its A2A card shows it."""
    instructions: str = Field("", max_length=8000)
    """Added to the worker's system prompt for the agent's steps (trusted: an author wrote it)."""
    tier: Literal["", "easy", "normal", "hard"] = ""
    """The model tier its steps run on ('' : the step's own)."""
    route: str = Field("", max_length=64, pattern=r"^[A-Za-z0-9_:.-]*$")
    """A named route of the model gateway (its routes file) its calls take ('' : tiered as usual)."""
    tools: tuple[str, ...] = Field((), max_length=MAX_TOOLS)
    """The tools its steps may call, and no others; a plan's step of the agent is narrowed to them
    (``search_docs`` is retrieval). Empty: no tools (it answers from its instructions and inputs)."""
    documents: tuple[str, ...] = Field((), max_length=32)
    """Its retrieval scope: only the tenant's documents whose id starts with one of these (the ids
    ``meshctl ingest`` gave them); empty: every document. Retrieval itself is the ``search_docs`` tool."""
    max_iterations: int = Field(6, ge=1, le=50)
    """Model calls one step of the agent may make (the task's own cap applies too)."""
    exposed: bool = False
    """Published by the A2A gateway as an agent card of the tenant (``/a2a/<tenant>/<name>``)."""
    pool: str = Field("", pattern=POOL_PATTERN)
    """The worker pool that runs its steps ('' : the shared workers). A pool is a worker deployment
    started with ``MESH_WORKER_POOL=<pool>``: its own consumer, scaling and identity."""
    labels: dict[str, str] = Field({}, max_length=20)

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for tool in value:
            if not tool or len(tool) > 100 or any(c in tool for c in " \t\n*>"):
                raise ValueError(f"tool {tool!r}: a tool's name (letters, digits, '_', '-', '.')")
        if len(set(value)) != len(value):
            raise ValueError("a tool is listed twice")
        return value

    def canonical(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        """The version: SHA-256 of the canonical JSON, its first 16 hex digits."""
        return hashlib.sha256(self.canonical()).hexdigest()[:16]


def parse_agent_ref(ref: str) -> tuple[str, str]:
    """(name, version or '') of ``name`` or ``name@<version>``; ValueError if malformed."""
    name, _, version = ref.strip().partition("@")
    if not re.fullmatch(AGENT_NAME, name) or (version and not re.fullmatch(r"[0-9a-f]{16}", version)):
        raise ValueError(f"agent {ref!r}: expected NAME or NAME@<16 hex digits>")
    return name, version


_EX = {"tenant": "acme", "task_id": "agent-5c1d9e"}


class AgentChange(Contract):
    """An author puts (adds, or changes: a new version) or removes one of the tenant's agent profiles."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "agent.change",
                    "action": "put",
                    "name": "sql-analyst",
                    "profile": {
                        "name": "sql-analyst",
                        "description": "Answers questions about the orders database with read-only SQL.",
                        "instructions": "Write one SELECT at a time; never guess a column.",
                        "tier": "hard",
                        "tools": ["sql_query"],
                    },
                    "by": "author.acme.alice",
                    "reason": "the analytics team's agent",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "task",
        "agent",
        producers=(AUTHOR,),
        consumers=("planner",),
        summary="An author puts or removes one of the tenant's agent profiles.",
        max_bytes=64 * KB,
    )

    type: Literal["agent.change"] = "agent.change"
    action: Literal["put", "remove"]
    name: str = Field(pattern=AGENT_NAME)
    profile: AgentProfile | None = None
    """``put``: the profile (its ``name`` is the change's)."""
    by: str = Field(min_length=1, max_length=200)
    reason: str = Field("", max_length=2000)


class AgentChanged(Contract):
    """What became of an ``agent.change``: applied (or already so), or refused with why."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "agent.changed",
                    "action": "put",
                    "name": "sql-analyst",
                    "accepted": True,
                    "version": "3f9a0c2b7d41e685",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "task",
        "agent-changed",
        producers=("planner",),
        consumers=(CLIENT,),
        summary="An agent profile change applied or refused.",
        max_bytes=16 * KB,
    )

    type: Literal["agent.changed"] = "agent.changed"
    action: str
    name: str
    accepted: bool
    changed: bool = False
    """False when the registry already said so (the same profile put again): nothing was written."""
    version: str = ""
    """The profile's current version ('' once removed)."""
    reason: str = ""


class AgentEvent(BaseModel):
    """One change of a profile, as the registry applied it."""

    model_config = ConfigDict(extra="allow")

    action: str
    by: str
    at: float
    version: str = ""
    reason: str = ""
    change_id: str = ""


class AgentVersion(Record):
    """One version of a tenant's agent profile (immutable: the version is its digest). Written by
    the planner (create-only); read by the planner when a plan names the agent, by the worker that
    runs its steps, and by the tenant's ``meshctl agent`` and A2A gateway."""

    bucket: ClassVar[str] = "workflows"
    name: ClassVar[str] = "agent"
    key_format: ClassVar[str] = "<tenant>.agent.<name>.<version>"

    tenant: str
    agent: str
    version: str
    profile: AgentProfile
    put_by: str = ""
    put_at: float = 0.0

    @staticmethod
    def key(tenant: str, name: str, version: str) -> str:
        return f"{tenant}.agent.{name}.{version}"


class AgentEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    version: str = ""
    """The current version ('' : removed)."""
    description: str = ""
    exposed: bool = False
    pool: str = ""
    history: list[AgentEvent] = []
    """Every change, oldest first (the last 50)."""


class AgentCatalog(Record):
    """A tenant's agent profiles: each one's current version and its changes (one key per tenant,
    compare-and-set)."""

    bucket: ClassVar[str] = "workflows"
    name: ClassVar[str] = "agent-catalog"
    key_format: ClassVar[str] = "<tenant>.agents"

    agents: dict[str, AgentEntry] = {}

    @staticmethod
    def key(tenant: str) -> str:
        return f"{tenant}.agents"

    def current(self) -> dict[str, AgentEntry]:
        """The profiles not removed, by name."""
        return {n: e for n, e in sorted(self.agents.items()) if e.version}


AGENT_RECORDS: tuple[type[Record], ...] = (AgentVersion, AgentCatalog)


def agent_ref(name: str, version: str) -> str:
    return f"{name}@{version}"


__all__ = [
    "AGENT_NAME",
    "AGENT_RECORDS",
    "AgentCatalog",
    "AgentChange",
    "AgentChanged",
    "AgentEntry",
    "AgentEvent",
    "AgentProfile",
    "AgentVersion",
    "agent_ref",
    "parse_agent_ref",
]
