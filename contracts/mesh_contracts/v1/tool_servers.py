"""A tenant's own tool servers (issue 44): remote MCP servers it registers, whose tools it
approves one definition at a time; and external A2A agents (issue 48), registered the same way
(``protocol: a2a``), whose skills become its tools under the same approvals and policy.

A person changes them with ``tools.change`` (``add`` and ``remove`` are an author's right,
``approve`` an approver's), handed in at the tenant's door; the tool-executor keeps the registry
(KV ``toolservers``), records every change (refused ones too) on the tenant's audit chain and
answers with ``tools.changed`` on the change's id.

A tool is offered to the tenant's tasks only once a person has approved its definition: its name,
description and input schema, pinned by hash (``definition_hash``). A server that later lists a
different definition has that tool suspended until someone approves the new one: the pin is what
was reviewed, so a description rewritten after review (a "rug pull" that carries an injection past
the reviewer) never reaches a model.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mesh_contracts.base import APPROVER, AUTHOR, CLIENT, Contract, ContractSpec
from mesh_contracts.decode import KB
from mesh_contracts.v1.records import Record, ToolCatalogue

SERVER_NAME = r"^[a-z0-9_]{1,32}$"
"""A server's name: its tools are offered as ``<server>__<tool>``."""
SECRET_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"  # noqa: S105 - a file name's pattern, no secret
"""A file name in the tenant's mounted secrets (``MESH_TOOL_SECRETS_DIR/<tenant>/<name>``): a
record names a secret, it never holds one."""
SHA256 = r"^[0-9a-f]{64}$"
MAX_ENDPOINTS = 8
Risk = Literal["read", "write", "external"]
ServerProtocol = Literal["mcp", "a2a"]
ACTIONS: dict[str, str] = {"add": AUTHOR, "remove": AUTHOR, "approve": APPROVER}
"""Who may make each change: an author (``author.<tenant>.<person>``) registers and removes a
server; an approver (``approver.<tenant>.<person>``) approves what its tools say they do."""


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def field_hash(value: Any) -> str:
    """SHA-256 of a value's canonical JSON."""
    return hashlib.sha256(_canonical(value)).hexdigest()


def definition_hash(name: str, description: str, input_schema: dict[str, Any]) -> str:
    """What an approval pins: the tool's name, description and input schema, as the server lists them."""
    return field_hash({"name": name, "description": description, "input_schema": input_schema})


class ServerAuth(BaseModel):
    """How the tool-executor signs in to the server. Only names of mounted secrets, never a secret."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["none", "bearer", "oauth"] = "none"
    """``bearer``: the secret file holds the token. ``oauth``: the client-credentials grant at
    ``token_url`` with ``client_id`` and the secret file's client secret (HTTP Basic)."""
    secret: str = Field("", pattern=r"^(" + SECRET_NAME[1:-1] + r")?$")
    token_url: str = Field("", max_length=500)
    client_id: str = Field("", max_length=200)
    scope: str = Field("", max_length=500)

    @model_validator(mode="after")
    def _complete(self) -> ServerAuth:
        if self.kind != "none" and not self.secret:
            raise ValueError(f"auth {self.kind} needs a secret (the name of a mounted secret file)")
        if self.kind == "oauth":
            if not self.client_id or not self.token_url:
                raise ValueError("auth oauth needs token_url and client_id")
            _check_url(self.token_url, "token_url")
        return self


class ToolRules(BaseModel):
    """The tenant's policy for one of the server's tools. The server's own hints
    (``readOnlyHint`` ...) never decide a risk: the server describing itself is not a review."""

    model_config = ConfigDict(extra="forbid")

    risk: Risk | None = None
    needs_approval: bool = False
    on_untrusted: Literal["approve", "allow", "deny"] | None = None
    rate_per_min: int = Field(0, ge=0, le=100_000)
    timeout_s: float | None = Field(None, gt=0, le=600)


def _check_url(url: str, what: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{what} {url!r}: must be an http(s) URL with a host")
    if parts.username or parts.password:
        raise ValueError(f"{what} {url!r}: credentials in a URL end up in logs; use auth with a mounted secret")
    return url


class ToolServerSpec(BaseModel):
    """A remote MCP server (streamable HTTP), or an A2A agent, as its tenant registers it."""

    model_config = ConfigDict(extra="forbid")

    protocol: ServerProtocol = "mcp"
    """``mcp``: each endpoint is an MCP server's streamable-HTTP URL. ``a2a``: each endpoint is an
    A2A agent's card URL (or its base URL: the card is then at ``/.well-known/agent-card.json``);
    its skills are the tools, and the whole card is pinned by the approvals. Default ``mcp``: records
    written before A2A agents existed."""
    endpoints: list[str] = Field(min_length=1, max_length=MAX_ENDPOINTS)
    """Replicas of one server, same tools: calls go to the least loaded healthy one. For ``a2a``:
    the card URLs of one agent's replicas."""
    auth: ServerAuth = ServerAuth()
    ca: str = Field("", pattern=r"^(" + SECRET_NAME[1:-1] + r")?$")
    """A mounted secret file holding the PEM CA bundle its TLS certificate is verified against
    ('': the system's). TLS is always verified."""
    timeout_s: float = Field(30.0, gt=0, le=600)
    """Per call, unless a tool's rules say otherwise."""
    max_response_bytes: int = Field(10 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    """Any one answer larger than this is cut off and the call fails."""
    default_risk: Risk = "external"
    """For tools without rules: a server nobody reviewed is assumed to reach out."""
    rate_per_min: int = Field(0, ge=0, le=100_000)
    """Calls per minute per tool for the tenant, unless a tool's rules say otherwise (0: none)."""
    tools: dict[str, ToolRules] = {}

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        for url in value:
            if len(url) > 500:
                raise ValueError("an endpoint URL is at most 500 characters")
            _check_url(url, "endpoint")
        if len(set(value)) != len(value):
            raise ValueError("an endpoint is listed twice")
        return value


_EX = {"tenant": "acme", "task_id": "tools-5c1d9e"}


class ToolsChange(Contract):
    """A person registers (``add``, again to change it) or removes a tenant's tool server, or
    approves the definitions of its tools (``approve``: the hashes the approver saw)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "tools.change",
                    "action": "add",
                    "server": "orders",
                    "definition": {
                        "endpoints": ["https://orders-1.acme.internal/mcp", "https://orders-2.acme.internal/mcp"],
                        "auth": {"kind": "bearer", "secret": "orders-token"},
                        "tools": {"refund_order": {"risk": "write"}},
                    },
                    "by": "author.acme.alice",
                    "reason": "refunds for the support agent",
                },
                {
                    **_EX,
                    "type": "tools.change",
                    "action": "add",
                    "server": "travel",
                    "definition": {
                        "protocol": "a2a",
                        "endpoints": ["https://travel.example.com/.well-known/agent-card.json"],
                        "auth": {"kind": "bearer", "secret": "travel-token"},
                        "tools": {"book_trip": {"risk": "external", "needs_approval": True}},
                    },
                    "by": "author.acme.alice",
                    "reason": "the travel agency's booking agent",
                },
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "task",
        "tools",
        producers=(AUTHOR, APPROVER),
        consumers=("tool-executor",),
        summary="A person adds, removes or approves the tools of one of the tenant's tool servers.",
        max_bytes=64 * KB,
    )

    type: Literal["tools.change"] = "tools.change"
    action: Literal["add", "remove", "approve"]
    server: str = Field(pattern=SERVER_NAME)
    definition: ToolServerSpec | None = None
    """``add``: the server."""
    pins: dict[str, str] = Field({}, max_length=500)
    """``approve``: tool name -> the ``definition_hash`` the approver read (``meshctl tools list``)."""
    force: bool = False
    """``approve``: also a definition whose description the injection detector flags (say why)."""
    by: str = Field(min_length=1, max_length=200)
    reason: str = Field("", max_length=2000)

    @field_validator("pins")
    @classmethod
    def _pins(cls, value: dict[str, str]) -> dict[str, str]:
        for tool, digest in value.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", tool) or not re.fullmatch(SHA256, digest):
                raise ValueError(f"pin {tool!r}: a tool name and the 64-hex-digit hash of its definition")
        return value


class ToolsChanged(Contract):
    """What became of a ``tools.change``: applied (or already so), or refused with why."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {**_EX, "type": "tools.changed", "action": "add", "server": "orders", "accepted": True, "version": 1}
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "task",
        "tools-changed",
        producers=("tool-executor",),
        consumers=(CLIENT,),
        summary="A change to a tenant's tool servers applied or refused.",
        max_bytes=16 * KB,
    )

    type: Literal["tools.changed"] = "tools.changed"
    action: str
    server: str
    accepted: bool
    changed: bool = False
    """False when the registry already said so: nothing was written."""
    version: int = 0
    """The server record's version now."""
    approved: list[str] = []
    """``approve``: the tools whose definitions are now pinned."""
    reason: str = ""


class Pin(BaseModel):
    """An approved definition: what a person read, by hash (and of each part, to say what changed)."""

    model_config = ConfigDict(extra="allow")

    sha256: str
    description_sha256: str = ""
    schema_sha256: str = ""
    approved_by: str = ""
    approved_at: float = 0.0


class ToolServerRecord(Record):
    """One tenant tool server (key ``<tenant>.server.<name>``): its definition, its version (one
    more per change) and the approved definitions of its tools. Written by the tool-executor
    (compare-and-set); every replica follows it; the tenant's ``meshctl tools`` reads it."""

    bucket: ClassVar[str] = "toolservers"
    name: ClassVar[str] = "tool-server"
    key_format: ClassVar[str] = "<tenant>.server.<name>"

    tenant: str
    server: str
    definition: ToolServerSpec
    version: int = 1
    pins: dict[str, Pin] = {}
    added_by: str = ""
    changed_by: str = ""
    changed_at: float = 0.0

    @property
    def protocol(self) -> ServerProtocol:
        """What the server speaks (its definition's ``protocol``): ``mcp`` or ``a2a``."""
        return self.definition.protocol

    @staticmethod
    def key(tenant: str, server: str) -> str:
        return f"{tenant}.server.{server}"


ToolStatus = Literal["pending", "approved", "suspended"]


class ListedTool(BaseModel):
    """One tool as the server lists it now, and whether it may be offered."""

    model_config = ConfigDict(extra="allow")

    name: str
    sha256: str
    description: str = ""
    input_schema: dict[str, Any] = {}
    status: ToolStatus = "pending"
    """``pending``: never approved; ``approved``: the listing matches its pin; ``suspended``:
    approved once, listed differently since (``changed`` says what)."""
    changed: list[str] = []
    """``description``, ``input_schema``: what differs from the approved definition."""
    injection_score: float = 0.0
    """The injection detector's score of its description (a flagged one is shown, never hidden)."""
    signals: list[str] = []


class EndpointHealth(BaseModel):
    """One replica of a server as the tool-executor sees it."""

    model_config = ConfigDict(extra="allow")

    url: str
    healthy: bool = False
    breaker: Literal["closed", "open", "half-open"] = "closed"
    in_flight: int = 0
    calls: int = 0
    failures: int = 0
    failovers: int = 0
    """Calls that failed here and were sent to another replica."""
    latency_ms: float = 0.0
    """Moving average of its calls' and health checks' round trips."""
    last_error: str = ""
    checked_at: float = 0.0


class ToolServerState(Record):
    """What a tenant's server lists and how its replicas are (key ``<tenant>.state.<name>``),
    written by the tool-executor after each listing and health check: what ``meshctl tools list``,
    ``meshctl top`` and the dashboard show."""

    bucket: ClassVar[str] = "toolservers"
    name: ClassVar[str] = "tool-server-state"
    key_format: ClassVar[str] = "<tenant>.state.<name>"

    tenant: str
    server: str
    version: int = 0
    """The server record's version this state is of."""
    checked_at: float = 0.0
    error: str = ""
    """Why the server could not be listed ('' when it was)."""
    tools: list[ListedTool] = []
    endpoints: list[EndpointHealth] = []

    @staticmethod
    def key(tenant: str, server: str) -> str:
        return f"{tenant}.state.{server}"


class TenantToolCatalogue(ToolCatalogue):
    """The tools of a tenant's own servers that its tasks may use (approved and not suspended),
    key ``<tenant>.catalogue``: the worker offers them and the planner lists them, for the
    tenant's tasks only, beside the mesh's catalogue (KV ``tools``)."""

    bucket: ClassVar[str] = "toolservers"
    name: ClassVar[str] = "tenant-tool-catalogue"
    key_format: ClassVar[str] = "<tenant>.catalogue"

    tenant: str = ""
    servers: list[str] = []
    """Every server the tenant registered, approved tools or not (what ``meshctl tools list`` reads)."""

    @staticmethod
    def key_of(tenant: str) -> str:
        return f"{tenant}.catalogue"


TOOL_SERVER_RECORDS: tuple[type[Record], ...] = (ToolServerRecord, ToolServerState, TenantToolCatalogue)
