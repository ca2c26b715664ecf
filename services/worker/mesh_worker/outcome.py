"""A step's outcome, built from its checkpoint: ``step.failed`` with the reason, or ``step.completed``.

A completed step's message says what the step ran with and read, for the planner, the checker and
the steps that take its output: the citations its answer references, the tools it called, the
models that answered, the system prompt's version, its taint, the calls held for a person and the
retrieval records handed on to the checker.
"""

from __future__ import annotations

import logging
import re

from mesh_agent.prompts import Prompt
from mesh_contracts.v1 import SignedRecord, StepCompleted, StepFailed
from mesh_worker.checkpoint import StepRun

log = logging.getLogger("mesh.worker")

FORWARD_MAX_BYTES = 256 * 1024
"""Retrieval records a step hands on to the checker, at most (a step's few searches take a
few KB each); past it the newest are left out, and citations of theirs fail to resolve."""


def outcome(
    run: StepRun, system: Prompt, *, output: str = "", failed: str = "", halted: bool = False
) -> StepCompleted | StepFailed:
    """The step's outcome message from its checkpoint: the answer ``output``, or ``failed``.
    ``system``: the worker's system prompt (the version of a checkpoint that recorded none)."""
    req = run.request
    sid = req.step.step_id
    if failed:
        return StepFailed(
            tenant=req.tenant,
            task_id=req.task_id,
            step_id=sid,
            attempt=run.attempt,
            reason=failed,
            usage=run.usage,
            halted=halted,
        )
    cited = set(re.findall(r"\[([^\[\]#]+)#([^\[\]]+)\]", output))
    citations = [c for c in run.citations if (c.doc_id, c.chunk_id) in cited] or run.citations
    return StepCompleted(
        tenant=req.tenant,
        task_id=req.task_id,
        step_id=sid,
        attempt=run.attempt,
        output=output,
        citations=tuple(citations),
        usage=run.usage,
        iterations=run.iteration,
        tools=tools_called(run),
        models=tuple(run.models),
        prompt_version=prompt_version(run, system),
        taint=run.taint,
        tool_denials=run.tool_denials,
        held=tuple(run.held),
        retrievals=forwarded(run.retrievals),
    )


def tools_called(run: StepRun) -> tuple[str, ...]:
    """The tools the step called, in order: the worker's own retrieval before the first turn (its
    answer is a context message that names the tool) and the checkpointed assistant turns'
    calls, less a tool the step does not offer (refused as an observation, never dispatched)."""
    offered = set(run.request.step.tools)
    calls = []
    for m in run.messages:
        if m.get("role") == "user" and m.get("tool_call_id") and m.get("name"):
            calls.append(m["name"])
        elif m.get("role") == "assistant":
            calls += [c.get("name", "") for c in m.get("tool_calls") or ()]
    return tuple(name for name in calls if name in offered)


def forwarded(records: list[SignedRecord]) -> tuple[SignedRecord, ...]:
    """The step's retrieval records for the checker, oldest first, up to ``FORWARD_MAX_BYTES``
    and the contract's 64 (a loop that searched more is told so in the log)."""
    out: list[SignedRecord] = []
    size = 0
    for r in records:
        size += len(r.body) + len(r.token)
        if size > FORWARD_MAX_BYTES or len(out) == 64:
            log.warning("%d retrieval record(s) not handed on to the checker (over %d bytes or 64)",
                        len(records) - len(out), FORWARD_MAX_BYTES)  # fmt: skip
            break
        out.append(r)
    return tuple(out)


def prompt_version(run: StepRun, system: Prompt) -> str:
    """The system prompt the step's context was built with. A checkpoint from before prompts were
    versioned has none recorded: the current prompt's (``system``) ref if its text is what the
    context holds, else unknown ('')."""
    if run.prompt_version:
        return run.prompt_version
    first = run.messages[0] if run.messages else {}
    same = first.get("role") == "system" and first.get("content") == system.text
    return system.ref if same else ""
