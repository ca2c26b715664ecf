"""Version 1 of the AgentMesh message contracts.

Evolve by adding optional fields with defaults; a breaking change is ``v2/``.
"""

from mesh_contracts.v1.budget import BudgetDenied, BudgetGranted, BudgetReserve, UsageRecorded
from mesh_contracts.v1.check import CheckRequested, CheckVerdict
from mesh_contracts.v1.common import (
    CheckResult,
    Citation,
    Destination,
    HeldCall,
    PlanStep,
    RetrievalHit,
    SignedRecord,
    StepResult,
    Taint,
    TaskLimits,
    TaskPolicy,
    TokenUsage,
)
from mesh_contracts.v1.control import (
    ApprovalDecided,
    ApprovalRequested,
    ControlCancel,
    ControlHalt,
    ControlResume,
)
from mesh_contracts.v1.events import ProgressEvent, TokenDelta
from mesh_contracts.v1.task import (
    PlanCreated,
    TaskCompleted,
    TaskFailed,
    TaskRejected,
    TaskSubmitted,
)
from mesh_contracts.v1.work import (
    DOCUMENT_TYPES,
    IngestCompleted,
    IngestRequested,
    RetrievalCompleted,
    RetrievalRequested,
    StepCompleted,
    StepFailed,
    StepRequested,
    ToolAudited,
    ToolCompleted,
    ToolRequested,
)

ALL = (
    TaskSubmitted,
    TaskRejected,
    TaskCompleted,
    TaskFailed,
    PlanCreated,
    StepRequested,
    StepCompleted,
    StepFailed,
    ToolRequested,
    ToolCompleted,
    ToolAudited,
    RetrievalRequested,
    RetrievalCompleted,
    IngestRequested,
    IngestCompleted,
    CheckRequested,
    CheckVerdict,
    UsageRecorded,
    BudgetReserve,
    BudgetGranted,
    BudgetDenied,
    ControlHalt,
    ControlCancel,
    ControlResume,
    ApprovalRequested,
    ApprovalDecided,
    ProgressEvent,
    TokenDelta,
)

__all__ = [c.__name__ for c in ALL] + [
    "ALL",
    "DOCUMENT_TYPES",
    "CheckResult",
    "Citation",
    "Destination",
    "HeldCall",
    "PlanStep",
    "SignedRecord",
    "StepResult",
    "TaskPolicy",
    "RetrievalHit",
    "Taint",
    "TaskLimits",
    "TokenUsage",
]
