"""Progress events for clients following a task (the EVENTS stream)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict

from mesh_contracts.base import CLIENT, SERVICES, Contract, ContractSpec


class ProgressEvent(Contract):
    """Something happened to a task that a person following it wants to see."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "tenant": "acme",
                    "task_id": "t-7f3a",
                    "type": "event.progress",
                    "source": "worker",
                    "stage": "step.started",
                    "message": "s1: Find how duplicates are avoided",
                    "step_id": "s1",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "event", "progress", producers=SERVICES, consumers=(CLIENT,), summary="Live progress for clients."
    )

    type: Literal["event.progress"] = "event.progress"
    source: str
    """Service that emitted the event."""
    stage: str
    """Machine-readable stage, e.g. ``plan.created``, ``step.started``, ``tool.called``."""
    message: str = ""
    """Human-readable one-liner."""
    step_id: str = ""
    detail: dict[str, Any] = {}
