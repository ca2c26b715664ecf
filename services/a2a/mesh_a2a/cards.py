"""The agent card of an agent a tenant exposes: who it is, what it does, where and how to call it
(JSON-RPC at ``{base}/a2a/{tenant}/{agent}``, a bearer JWT), what it can do (streaming, push
notifications)."""

from __future__ import annotations

import json

from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentProvider,
    AgentSkill,
    HTTPAuthSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
    StringList,
)
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, TransportProtocol

from mesh_a2a.exposed import Agent, mesh_agent

BEARER = "bearer"


def endpoint(base: str, tenant: str, agent: str) -> str:
    """Where an agent's JSON-RPC endpoint is (its card is under ``/.well-known/agent-card.json`` there)."""
    return f"{base.rstrip('/')}/a2a/{tenant}/{agent}"


def skill(tenant: str, agent: Agent) -> AgentSkill:
    if agent.kind == "workflow":
        takes = (f" Its inputs: a data part, a JSON object matching {json.dumps(agent.inputs, sort_keys=True)}."
                 if agent.inputs else "")  # fmt: skip
        return AgentSkill(id=agent.name, name=agent.name, description=agent.description + takes,
                          tags=["workflow", tenant], input_modes=["text/plain", "application/json"],
                          output_modes=["text/plain"])  # fmt: skip
    if agent.kind == "profile":
        return AgentSkill(id=agent.name, name=agent.name, description=agent.description, tags=["agent", tenant],
                          input_modes=["text/plain"], output_modes=["text/plain"])  # fmt: skip
    return AgentSkill(
        id=agent.name, name="answer a goal", description=agent.description, tags=["planner", "retrieval", "tools"],
        examples=["How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."],
        input_modes=["text/plain"], output_modes=["text/plain"],
    )  # fmt: skip


def card(base: str, tenant: str, agent: Agent) -> AgentCard:
    """The card of ``agent`` of ``tenant``, its endpoint under ``base``."""
    return AgentCard(
        name=f"{tenant}/{agent.name}",
        description=agent.description,
        version=agent.version,
        supported_interfaces=[
            AgentInterface(
                url=endpoint(base, tenant, agent.name),
                protocol_binding=TransportProtocol.JSONRPC.value,
                protocol_version=PROTOCOL_VERSION_CURRENT,
            )
        ],
        provider=AgentProvider(organization="AgentMesh", url=base),
        capabilities=AgentCapabilities(streaming=True, push_notifications=True),
        security_schemes={
            BEARER: SecurityScheme(
                http_auth_security_scheme=HTTPAuthSecurityScheme(
                    scheme="Bearer",
                    bearer_format="JWT",
                    description=f"A token of your identity provider naming tenant {tenant!r} in its tenant claim.",
                )
            )
        },
        security_requirements=[SecurityRequirement(schemes={BEARER: StringList(list=[])})],
        default_input_modes=["text/plain", "application/json"],
        default_output_modes=["text/plain"],
        skills=[skill(tenant, agent)],
    )


def template(base: str) -> AgentCard:
    """The card the request handler holds: what every agent of the gateway can do (streaming,
    push notifications); each agent's own card is served at its path."""
    return card(base, "tenant", mesh_agent())
