"""Who is calling, and for which tenant and agent: the caller's JWT verified as the edge verifies a
person's (``mesh_edge.users``), its tenant the one in the path, the tenant one the gateway holds an
identity for (``mesh_edge.tenants``), the agent one the tenant exposes (``mesh_a2a.exposed``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from a2a.auth.user import User as A2aUser
from a2a.server.context import ServerCallContext
from a2a.server.routes import DefaultServerCallContextBuilder
from starlette.requests import Request

from mesh_a2a.errors import NotExposed
from mesh_a2a.exposed import Agent, find
from mesh_edge.tenants import Tenants
from mesh_edge.users import Forbidden, User, Users
from meshctl.client import TenantClient

SCOPE = "mesh.caller"
"""Where the signed-in caller waits in the request's scope for the A2A call context."""


@dataclass(frozen=True)
class Caller:
    """A signed-in person of a tenant, speaking to one of its agents, through the tenant's client."""

    user: User
    agent: Agent
    client: TenantClient

    @property
    def tenant(self) -> str:
        return self.user.tenant

    @property
    def subject(self) -> str:
        return self.user.subject

    @property
    def owner(self) -> str:
        """Whose push notification configs these are (a person's, within their tenant)."""
        return f"{self.tenant}/{self.subject}"


class SignedIn(A2aUser):
    """The caller as the A2A server sees them."""

    def __init__(self, caller: Caller) -> None:
        self.caller = caller

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def user_name(self) -> str:
        return self.caller.owner


class Gate:
    """Signs callers in: ``Unauthorized`` (401) without a valid token, ``Forbidden`` (403) for a
    tenant that is not the token's or that the gateway does not serve, ``NotExposed`` (404) for
    an agent the tenant does not expose."""

    def __init__(self, users: Users, tenants: Tenants) -> None:
        self.users, self.tenants = users, tenants

    async def caller(self, authorization: str | None, tenant: str, agent: str) -> Caller:
        user = self.users.verify(authorization)
        if user.tenant != tenant:
            raise Forbidden(
                f"{user.subject} acts for tenant {user.tenant!r}, not {tenant!r}: its agents are not theirs"
            )
        client = self.tenants.client(tenant)
        found = await find(client, agent)
        if found is None:
            raise NotExposed(f"tenant {tenant!r} exposes no agent {agent!r}")
        return Caller(user, found, client)


class Contexts(DefaultServerCallContextBuilder):
    """The A2A call context of a request the gate let in: the caller in its state and as its user."""

    def build(self, request: Request) -> ServerCallContext:
        context = super().build(request)
        context.state["caller"] = request.scope[SCOPE]
        # the SDK keeps the request's headers in the context (and logs the context at debug level):
        # not the caller's token
        context.state.get("headers", {}).pop("authorization", None)
        return context

    def build_user(self, request: Request) -> A2aUser:
        return SignedIn(request.scope[SCOPE])


def caller_of(context: ServerCallContext | None) -> Caller:
    """The caller a call context belongs to (every context the gateway makes has one)."""
    found: Any = context.state.get("caller") if context is not None else None
    if not isinstance(found, Caller):
        raise RuntimeError("an A2A call context without a signed-in caller")  # a bug: the gate makes every one
    return found
