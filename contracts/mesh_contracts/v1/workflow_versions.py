"""A tenant's workflow versions: how a task names one (``parse_ref``: ``name``, ``name@latest`` or
``name@<version>``) and the messages by which an author changes them (``workflow.change``,
answered with ``workflow.changed``). The planner keeps the registry (KV ``workflows``,
``mesh_planner.workflows``); a version is its definition's digest (``mesh_contracts.v1.workflow``).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from mesh_contracts.base import AUTHOR, CLIENT, ID_PATTERN, Contract, ContractSpec
from mesh_contracts.decode import KB

REF = re.compile(r"^(?P<name>[A-Za-z0-9_-]{1,64})(@(?P<version>latest|[0-9a-f]{16}))?$")
"""What a task names: ``name`` or ``name@latest`` (the version published last and not withdrawn,
resolved and pinned at submission) or ``name@<version>``."""


def parse_ref(ref: str) -> tuple[str, str]:
    """(name, version or ``latest``) of ``name[@latest|@<version>]``; ValueError if malformed."""
    m = REF.fullmatch(ref.strip())
    if m is None:
        raise ValueError(f"workflow {ref!r}: expected NAME, NAME@latest or NAME@<16 hex digits>")
    return m["name"], m["version"] or "latest"


_WF = {"tenant": "acme", "task_id": "wf-5c1d9e"}


class WorkflowChange(Contract):
    """A tenant's author publishes a workflow version, or deprecates, restores or deletes one.

    Signed by the author's own key (``author.<tenant>.<person>``) and handed in at the tenant's
    door; the planner keeps the registry (KV ``workflows``), judges the author's right under the
    newest trust bundle, records every change (refused ones too) on the tenant's audit chain and
    answers with ``workflow.changed`` on the same task id (a change id)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_WF,
                    "type": "workflow.change",
                    "action": "deprecate",
                    "name": "refund",
                    "version": "3f9a0c2b7d41e685",
                    "author": "author.acme.alice",
                    "reason": "sends the refund before the approval",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "task",
        "change",
        producers=(AUTHOR,),
        consumers=("planner",),
        summary="An author publishes, deprecates, restores or deletes a workflow version.",
        max_bytes=256 * KB,
    )

    type: Literal["workflow.change"] = "workflow.change"
    action: Literal["publish", "deprecate", "restore", "delete"]
    name: str = Field(pattern=ID_PATTERN)
    definition: dict[str, Any] | None = None
    """``publish``: the definition as written (the planner validates it: a refusal says why)."""
    version: str = Field("", pattern=r"^([0-9a-f]{16})?$")
    """The version changed (``publish``: the version the author computed, checked against the
    planner's own digest; empty to take the planner's)."""
    author: str = Field(min_length=1, max_length=200)
    """The identity that signed the change (checked against the message's signed identity)."""
    reason: str = Field("", max_length=2000)
    """Why; on the audit chain."""


class WorkflowChanged(Contract):
    """What became of a ``workflow.change``: applied (or already so), or refused with why."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_WF,
                    "type": "workflow.changed",
                    "action": "publish",
                    "name": "refund",
                    "version": "3f9a0c2b7d41e685",
                    "accepted": True,
                    "status": "active",
                    "latest": "3f9a0c2b7d41e685",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "task",
        "changed",
        producers=("planner",),
        consumers=(CLIENT,),
        summary="A workflow change applied or refused.",
        max_bytes=16 * KB,
    )

    type: Literal["workflow.changed"] = "workflow.changed"
    action: str
    name: str
    version: str = ""
    accepted: bool
    changed: bool = False
    """False when the registry already said so (the same version published again, a second
    deprecation): nothing was written."""
    status: str = ""
    """The version's status now: ``active``, ``deprecated`` or ``deleted``."""
    latest: str = ""
    """The version ``name@latest`` resolves to now ('' when none may start)."""
    reason: str = ""
    """Why it was refused."""
