"""How a mesh task reads in A2A: its events as A2A status and artifact updates, and a whole task
rebuilt from what the mesh stored. Pure functions: no I/O.

    progress (task.accepted, plan.created, step...)   -> status working, with the line as a message
    token deltas of one model call                    -> chunks of artifact ``draft-<call>`` (append)
    a held call the task waits for (on_held=wait)     -> input-required (the caller may decide) or
                                                         auth-required (an approver must, elsewhere)
    a decision on it                                  -> status working
    task.completed                                    -> artifact ``answer`` (the answer), completed
    task.failed / task.rejected                       -> failed (canceled: a cancel) / rejected, why
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from a2a.helpers import new_data_part, new_text_part
from a2a.types import (
    Artifact,
    Message,
    Part,
    Role,
    Task,
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from google.protobuf.struct_pb2 import Struct  # type: ignore[import-untyped]  # protobuf ships no stubs

from mesh_edge.follow import Event

ANSWER = "answer"
"""The artifact that holds a completed task's answer (whole, one text part)."""
DRAFT = "draft-"
"""Artifacts ``draft-<call id>``: one model call's streamed text, chunk by chunk."""
TERMINAL = frozenset(
    {TaskState.TASK_STATE_COMPLETED, TaskState.TASK_STATE_FAILED, TaskState.TASK_STATE_CANCELED,
     TaskState.TASK_STATE_REJECTED}
)  # fmt: skip
INTERRUPTED = frozenset({TaskState.TASK_STATE_INPUT_REQUIRED, TaskState.TASK_STATE_AUTH_REQUIRED})
CANCELLED = "cancelled by "
"""How the planner begins the reason of a task it cancelled (``control.cancel``)."""
M_AFTER, M_APPROVAL, M_AGENT, M_ON_HELD = "mesh.after", "mesh.approval", "mesh.agent", "mesh.on_held"
"""Task metadata: the event a waiting task's follower resumes after, the call it waits on, the
agent it was sent to, whether its held calls wait (``TaskPolicy.on_held``)."""

A2aEvent = TaskStatusUpdateEvent | TaskArtifactUpdateEvent


def struct(values: dict[str, Any]) -> Struct:
    out = Struct()
    out.update(values)
    return out


def meta(task: Task, key: str) -> str:
    """A string the task's metadata holds ('' when it holds none)."""
    value = task.metadata.fields.get(key)
    return value.string_value if value is not None else ""


def agent_message(task_id: str, context_id: str, text: str, data: dict[str, Any] | None = None) -> Message:
    parts = [new_text_part(text)] + ([new_data_part(data)] if data is not None else [])
    return Message(role=Role.ROLE_AGENT, message_id=uuid.uuid4().hex, task_id=task_id, context_id=context_id,
                   parts=parts)  # fmt: skip


def status(
    task_id: str, context_id: str, state: TaskState, text: str = "", *, data: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> TaskStatusUpdateEvent:  # fmt: skip
    """A status update (with a message when there is something to say; ``metadata`` is merged
    into the task's)."""
    st = TaskStatus(state=state)
    st.timestamp.FromDatetime(datetime.now(UTC))
    if text:
        st.message.CopyFrom(agent_message(task_id, context_id, text, data))
    event = TaskStatusUpdateEvent(task_id=task_id, context_id=context_id, status=st)
    if metadata:
        event.metadata.CopyFrom(struct(metadata))
    return event


def answer_artifact(outcome: dict[str, Any]) -> Artifact:
    """A completed task's answer, with what the mesh says of it (citations, workflow, steps)."""
    meta = {k: outcome[k] for k in ("citations", "workflow", "steps", "judge_score", "tools") if outcome.get(k)}
    artifact = Artifact(artifact_id=ANSWER, name=ANSWER, parts=[new_text_part(str(outcome.get("answer", "")))])
    if meta:
        artifact.metadata.CopyFrom(struct(json.loads(json.dumps(meta))))
    return artifact


def outcome_state(outcome: dict[str, Any]) -> tuple[TaskState, str]:
    """The A2A state of a mesh outcome, and the line that says why when it is not an answer."""
    kind = outcome.get("type")
    if kind == "task.completed":
        return TaskState.TASK_STATE_COMPLETED, ""
    reason = str(outcome.get("reason", ""))
    if kind == "task.rejected":
        code, after = outcome.get("code", "invalid"), outcome.get("retry_after_s")
        return TaskState.TASK_STATE_REJECTED, f"{reason} ({code}" + (f"; retry after {after:g} s)" if after else ")")
    if reason.startswith(CANCELLED):
        return TaskState.TASK_STATE_CANCELED, reason
    return TaskState.TASK_STATE_FAILED, reason


def question(approval: dict[str, Any], can_decide: bool) -> tuple[TaskState, str]:
    """What a task waiting for a decision on a held call says: ``input-required`` when the caller
    may decide it (reply approve or deny), ``auth-required`` when only an approver may (the gateway
    keeps following and the task goes on once one decides: ``meshctl approvals``, the edge)."""
    call = f"{approval.get('tool', '?')}({json.dumps(approval.get('arguments') or {}, sort_keys=True)})"
    why = f": {approval['reason']}" if approval.get("reason") else ""
    if can_decide:
        return TaskState.TASK_STATE_INPUT_REQUIRED, (
            f"The call {call} waits for your decision{why}. Reply 'approve' or 'deny' (a comment may "
            f'follow), or send a data part {{"approve": true|false, "comment": "..."}}.'
        )
    return TaskState.TASK_STATE_AUTH_REQUIRED, (
        f"The call {call} waits for an approver of this tenant{why} (meshctl approvals, or the edge); "
        "the task goes on once one decides."
    )


class Translator:
    """One task's mesh events as A2A events, in order (it remembers which model calls' drafts it
    has started)."""

    def __init__(self, task_id: str, context_id: str, *, waits: bool, can_decide: bool) -> None:
        self.task_id, self.context_id = task_id, context_id
        self.waits, self.can_decide = waits, can_decide
        self.drafts: set[str] = set()

    def status(self, state: TaskState, text: str = "", **kw: Any) -> TaskStatusUpdateEvent:
        return status(self.task_id, self.context_id, state, text, **kw)

    def translate(self, event: Event) -> tuple[list[A2aEvent], bool]:
        """The A2A events one mesh event makes, and whether following ends with it (an outcome,
        or a question the caller answers with a new message)."""
        d, working = event.data, TaskState.TASK_STATE_WORKING
        if event.kind == "progress":
            line = f"{d.get('stage', '')}: {d['message']}" if d.get("message") else str(d.get("stage", ""))
            meta = {
                "mesh.stage": d.get("stage", ""),
                "mesh.source": d.get("source", ""),
                "mesh.step": d.get("step_id", ""),
            }
            return [self.status(working, line, metadata=meta)], False
        if event.kind == "token":
            return self._token(d), False
        if event.kind == "approval":
            if not self.waits:  # on_held=continue: the step goes on without the call; the outcome names it
                return [self.status(working, f"held for approval, the task goes on: {d.get('tool', '?')}")], False
            state, text = question(d, self.can_decide)
            meta = {M_AFTER: event.id, M_APPROVAL: str(d.get("approval_id", ""))}
            return [self.status(state, text, data={"approval": d}, metadata=meta)], self.can_decide
        if event.kind == "decision":
            verb = "approved" if d.get("approved") else "denied"
            comment = f": {d['comment']}" if d.get("comment") else ""
            return [self.status(working, f"{verb} by {d.get('decided_by', '?')}{comment}")], False
        if event.kind == "outcome":
            state, why = outcome_state(d)
            out: list[A2aEvent] = []
            if state == TaskState.TASK_STATE_COMPLETED:
                out.append(TaskArtifactUpdateEvent(task_id=self.task_id, context_id=self.context_id,
                                                   artifact=answer_artifact(d), append=False, last_chunk=True))  # fmt: skip
            out.append(self.status(state, why or "done"))
            return out, True
        return [], False

    def _token(self, d: dict[str, Any]) -> list[A2aEvent]:
        kind, call = d.get("kind", "delta"), str(d.get("call_id", ""))
        if kind == "end" or (kind == "delta" and not d.get("text")):
            return []
        started = call in self.drafts
        self.drafts.add(call)
        # a reset (a retry, a fallback model takes over) starts the call's draft again, empty
        text = "" if kind == "reset" else str(d.get("text", ""))
        artifact = Artifact(artifact_id=f"{DRAFT}{call}", name="draft", parts=[Part(text=text)],
                            metadata=struct({"mesh.step": d.get("step_id", ""), "mesh.call": call}))  # fmt: skip
        return [TaskArtifactUpdateEvent(task_id=self.task_id, context_id=self.context_id, artifact=artifact,
                                        append=started and kind == "delta")]  # fmt: skip


def rebuilt(
    task_id: str, submitted: dict[str, Any], outcome: dict[str, Any] | None, waiting: Event | None, can_decide: bool
) -> Task:
    """An A2A task as the mesh stored it: the submission (its goal and inputs the caller's
    message, its labels the context and agent), then the outcome, or the call it waits on, or
    working. What ``GetTask`` answers on a replica that did not run it, or after a restart."""
    labels = submitted.get("labels") or {}
    context_id = str(labels.get("a2a.context", ""))
    on_held = str((submitted.get("policy") or {}).get("on_held", "continue"))
    parts = [new_text_part(str(submitted.get("goal", "")))]
    if submitted.get("inputs"):
        parts.append(new_data_part(submitted["inputs"]))
    asked = Message(role=Role.ROLE_USER, message_id=f"{task_id}-asked", task_id=task_id, context_id=context_id,
                    parts=parts)  # fmt: skip
    task = Task(id=task_id, context_id=context_id, history=[asked],
                metadata=struct({M_AGENT: str(labels.get("a2a.agent", "")), M_ON_HELD: on_held}))  # fmt: skip
    if outcome is not None:
        state, why = outcome_state(outcome)
        if state == TaskState.TASK_STATE_COMPLETED:
            task.artifacts.append(answer_artifact(outcome))
        event = status(task_id, context_id, state, why or "done")
    elif waiting is not None and on_held == "wait":
        state, text = question(waiting.data, can_decide)
        meta = {M_AFTER: waiting.id, M_APPROVAL: str(waiting.data.get("approval_id", ""))}
        event = status(task_id, context_id, state, text, data={"approval": waiting.data}, metadata=meta)
        task.metadata.update(meta)
    else:
        event = status(task_id, context_id, TaskState.TASK_STATE_WORKING, "the mesh works on it")
    task.status.CopyFrom(event.status)
    return task
