"""The tamper-evident audit chain: one hash-chained record per decision that matters.

Every policy decision on a tool call, approval outcome, budget trip and control action is
appended to its tenant's chain in the AUDIT stream (``audit.v1.<tenant>.<task>.recorded``).
Record ``n`` names the SHA-256 of record ``n - 1``'s stored body (``prev``) and is signed like
every mesh message, so a record removed, altered or inserted breaks the chain at that point
(``meshctl audit verify``). Appends are compare-and-set on the tenant's last record
(``mesh_durable.chain``): one linear chain per tenant however many replicas write to it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from mesh_contracts.base import Contract, ContractSpec
from mesh_contracts.decode import KB

MESH_WIDE = "_mesh"
"""The chain of actions that are not one tenant's (a global kill switch)."""
TENANT_WIDE = "_tenant"
"""The ``task_id`` of a record about a whole tenant (its kill switch, an anchor)."""
ANCHOR = "audit-anchor"
"""The kind of the budget's signed statement of a chain's length and head (KV ``anchors``)."""
ANCHOR_TTL_S = 10 * 365 * 24 * 3600.0
"""An anchor vouches for the past: it does not expire (the key that signed it may retire)."""
GENESIS = "0" * 64
"""``prev`` of a chain's first record."""

AUDIT_KINDS: dict[str, tuple[str, ...]] = {
    "tool-executor": ("tool.",),
    "budget": ("budget.",),
    # control actions; a task's pinned workflow and signals; authors' workflow changes; plan drafts
    # and reviewers' decisions; approval nodes' decisions; release changes and canary decisions
    "planner": (
        "control.",
        "task.workflow",
        "task.signal",
        "workflow.",
        "plan.",
        "approval.approved",
        "approval.denied",
        "release.",
    ),
    # control actions; a tenant's erasure (issue 42)
    "admin": ("control.", "tenant."),
    # what the keeper removed of a tenant's data, by class, at a pass (issue 42)
    "keeper": ("retention.",),
}
"""Which kinds of record each role may write (a prefix, or a whole kind): a record of another
kind, even validly signed, is a break (a compromised service cannot speak for another)."""


SEALED_DETAIL: dict[str, str] = {
    "arguments": "a tool call's arguments: the tenant's data (addresses, bodies, queries)",
    "reasons": "why a tool call was held or refused: a reason may quote an argument",
    "error": "a failed effect's error text: it may quote what the tool was given or returned",
    "comment": "a reviewer's words on a plan",
    "reason": "a stated reason (a cancellation, a kill switch, a refused decision): a person's words",
}
"""Fields of ``detail`` that hold the tenant's content, each sealed to the tenant's auditor key
(X25519, its public half in the trust bundle) by whoever appends the link: stored as
``{"sealed": "<base64 sealed box>"}``, so the chain's hashes cover the sealed bytes. Whoever
holds the tenant's auditor key opens them (``meshctl audit chain``); once a tenant is erased its
key is destroyed, its links stay whole and verifiable, and these fields stay unreadable (a link
written after the erasure withholds them: ``{"sealed": ""}``). Every other field is a fact of the
mesh in clear: ids, tool names, risks, decisions, digests, counts, workflow names and versions."""


def kind_allowed(role: str, kind: str) -> bool:
    return any(kind == k or (k.endswith(".") and kind.startswith(k)) for k in AUDIT_KINDS.get(role, ()))


class AuditRecorded(Contract):
    """One link of a tenant's audit chain: a decision, who made it, and the hash of the record
    before it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "tenant": "acme",
                    "task_id": "t-7f3a",
                    "type": "audit.recorded",
                    "n": 42,
                    "prev": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                    "kind": "tool.approved",
                    "actor": "approver:alice",
                    "at": 1795000000.0,
                    "source": "tool.audited:acme:t-7f3a:s3-a1-i1-c0:approved",
                    "detail": {"tool": "send_email", "reasons": ["approved by approver:alice"]},
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "audit",
        "recorded",
        producers=tuple(AUDIT_KINDS),
        consumers=(),
        summary="A link of a tenant's hash-chained audit log.",
        max_bytes=64 * KB,
    )
    type: Literal["audit.recorded"] = "audit.recorded"
    n: int = Field(ge=1)
    """Position in the tenant's chain (1, 2, 3...)."""
    prev: str = Field(pattern=r"^[0-9a-f]{64}$")
    """SHA-256 (hex) of record ``n - 1``'s stored body; ``GENESIS`` for the first."""
    kind: str = Field(min_length=1, max_length=64)
    """What was decided: ``tool.<decision>``, ``budget.<trip>``, ``control.<action>``, ``anchor``."""
    actor: str = Field(default="", max_length=200)
    """Who decided: a service, ``policy``, an approver, a client, an operator."""
    at: float
    """When the writer appended it (seconds since the epoch)."""
    source: str = Field(default="", max_length=300)
    """The message or action it records (its message id), when there is one."""
    detail: dict[str, Any] = {}
    """The facts, already redacted where the source was (tool arguments are)."""
