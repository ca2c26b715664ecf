"""Progress events for clients following a task (the EVENTS stream)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

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
        "event",
        "progress",
        producers=SERVICES,
        consumers=(CLIENT,),
        summary="Live progress for clients.",
        acked=False,  # stored for history, but no publisher waits on one (about 18 a sample task)
        sealed=("message", "detail"),
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


class TokenDelta(Contract):
    """Model output as it is generated, for a client watching a task live.

    Core NATS, never stored: the durable result is still ``step.completed`` / ``task.completed``.
    Deltas of one model call share ``call_id`` and count up in ``seq``; a ``reset`` means the
    call failed after part of its text was sent and is being retried or handed to a fallback
    model, so the client discards the text of that call seen so far; ``end`` closes the call.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "tenant": "acme",
                    "task_id": "t-7f3a",
                    "type": "live.token",
                    "step_id": "s3",
                    "call_id": "s3-a1-i0",
                    "seq": 4,
                    "text": "duplicates ",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "live", "token", producers=("worker",), consumers=(CLIENT,), transport="core", summary="Streamed tokens."
    )

    type: Literal["live.token"] = "live.token"
    step_id: str = ""
    call_id: str = ""
    seq: int = Field(0, ge=0)
    """Position of this delta within its call (0, 1, 2, ...)."""
    text: str = ""
    kind: Literal["delta", "reset", "end"] = "delta"
    model: str = ""
    """``provider/model`` that produced the text (set on ``end`` and ``reset``)."""
