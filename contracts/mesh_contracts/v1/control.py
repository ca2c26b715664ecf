"""Control (halt / cancel / resume) and human approval messages."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from mesh_contracts.base import APPROVER, CLIENT, ID_PATTERN, Contract, ContractSpec
from mesh_contracts.decode import KB
from mesh_contracts.v1.common import Destination

_EX = {"tenant": "acme", "task_id": "t-7f3a"}
# Control is obeyed by the planner (task record) and checked by every service before
# its next model or tool call; the budget service issues it when a breaker trips.
_CONTROL_PRODUCERS = ("budget", "tool-executor", CLIENT, APPROVER)
# (the tool-executor halts a task whose tool server refused the tenant's credentials)


class _Control(Contract):
    reason: str = ""
    """Why; shown to the tenant and recorded in the audit trail."""


class ControlHalt(_Control):
    """Stop a task now; it can be resumed."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{**_EX, "type": "control.halt", "reason": "loop detected in step s1"}]}
    )
    spec: ClassVar = ContractSpec(
        "control",
        "halt",
        producers=_CONTROL_PRODUCERS,
        consumers=("planner",),
        summary="Pause a task.",
        max_bytes=16 * KB,
    )
    type: Literal["control.halt"] = "control.halt"


class ControlCancel(_Control):
    """Stop a task for good; it fails with the reason."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{**_EX, "type": "control.cancel", "reason": "user cancelled"}]}
    )
    spec: ClassVar = ContractSpec(
        "control",
        "cancel",
        producers=_CONTROL_PRODUCERS,
        consumers=("planner",),
        summary="Cancel a task.",
        max_bytes=16 * KB,
    )
    type: Literal["control.cancel"] = "control.cancel"


class ControlResume(_Control):
    """Continue a halted task."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{**_EX, "type": "control.resume", "reason": "operator resumed"}]}
    )
    spec: ClassVar = ContractSpec(
        "control",
        "resume",
        producers=_CONTROL_PRODUCERS,
        consumers=("planner",),
        summary="Resume a halted task.",
        max_bytes=16 * KB,
    )
    type: Literal["control.resume"] = "control.resume"


class ApprovalRequested(Contract):
    """A tool call waits for a human decision."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "approval.requested",
                    "approval_id": "a-s3-c0",
                    "step_id": "s3",
                    "tool": "send_email",
                    "arguments": {"to": "ops@acme.test"},
                    "reason": "external side effect",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "approval",
        "requested",
        producers=("tool-executor",),
        consumers=(APPROVER, "worker"),
        summary="A tool call needs a human decision.",
        sealed=("arguments", "reason"),
    )

    type: Literal["approval.requested"] = "approval.requested"
    approval_id: str = Field(pattern=ID_PATTERN)
    step_id: str = ""
    tool: str
    arguments: dict[str, Any] = {}
    reason: str = ""
    """Why approval is needed (risk class, untrusted context, policy)."""
    timeout_s: float = 3600.0
    """Seconds after which the request is treated as denied."""
    call_id: str = ""
    """The tool call waiting (the worker extends its wait for the call by ``timeout_s``)."""
    risk: str = ""
    """The tool's risk class."""
    injection_score: float = 0.0
    """Highest injection score in the step's context (what the approver should distrust)."""
    sources: tuple[str, ...] = ()
    """Untrusted content in the step's context, by origin."""
    destinations: tuple[Destination, ...] = ()
    """Where the effect would land (domain or host, a keyed hash, the value sealed to the
    tenant's auditor); the values themselves are in ``arguments`` for the approver."""


class ApprovalDecided(Contract):
    """A human's decision on an approval request."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "approval.decided",
                    "approval_id": "a-s3-c0",
                    "approved": False,
                    "decided_by": "approver",
                    "comment": "not during the freeze",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "approval",
        "decided",
        producers=(APPROVER,),
        consumers=("tool-executor",),
        summary="Approve or deny.",
        max_bytes=16 * KB,
        sealed=("comment",),
    )

    type: Literal["approval.decided"] = "approval.decided"
    approval_id: str = Field(pattern=ID_PATTERN)
    approved: bool
    decided_by: str
    """Identity that decided (checked against the message's signed identity)."""
    comment: str = ""
