"""The mesh's sample task as a Temporal workflow, for bench/peers/temporal_bench.py.

Shape: ``plan``; two branches in parallel, each ``model`` -> ``tool`` (or ``retrieve``) ->
``model``; ``answer``; ``judge``. 9 activities, 6 on the critical path. The bodies do nothing
but return payloads of the sizes the mesh's messages carry (a few hundred bytes), so what is
measured is the orchestration: the server's durable history, task dispatch, the worker's
workflow and activity tasks, and the client.

Kept in its own module (not the script run as ``__main__``) so that the workflow sandbox can
import it, as it imports any workflow module in a real deployment.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import activity, workflow

TASK_QUEUE = "agentmesh-bench"
FILLER = "lorem ipsum dolor sit amet " * 8  # ~220 bytes of text, like a step's model output


# Async activities: they run on the worker's event loop, no thread pool hop per activity; what a
# well-configured deployment does for I/O-bound steps such as model, tool and retrieval calls.
@activity.defn
async def plan(goal: str) -> dict:
    return {
        "goal": goal,
        "steps": [
            {"id": "s1", "kind": "tool", "instruction": "compute 17 * 23"},
            {"id": "s2", "kind": "retrieve", "instruction": "how duplicate side effects are avoided"},
        ],
        "note": FILLER[:120],
    }


@activity.defn
async def model(prompt: dict) -> dict:
    return {"step": prompt.get("id"), "text": FILLER, "tokens_in": 180, "tokens_out": 64}


@activity.defn
async def tool(call: dict) -> dict:
    return {"step": call.get("step"), "tool": "calculator", "args": {"expression": "17 * 23"}, "result": "391"}


@activity.defn
async def retrieve(query: dict) -> dict:
    return {
        "step": query.get("step"),
        "chunks": [{"doc": "README.md", "score": 0.82, "text": FILLER[:160]} for _ in range(2)],
    }


@activity.defn
async def answer(parts: list[dict]) -> dict:
    return {"text": FILLER, "citations": ["README.md#1", "README.md#2"], "parts": len(parts)}


@activity.defn
async def judge(result: dict) -> dict:
    return {"verdict": "pass", "score": 0.9, "reason": FILLER[:100], "checked": len(result.get("text", ""))}


ACTIVITIES = [plan, model, tool, retrieve, answer, judge]
STEP = {"start_to_close_timeout": timedelta(seconds=30)}


@workflow.defn
class AgentTask:
    @workflow.run
    async def run(self, goal: str) -> dict:
        p = await workflow.execute_activity(plan, goal, **STEP)

        async def branch(step: dict) -> dict:
            thought = await workflow.execute_activity(model, step, **STEP)
            call = {"step": step["id"], "input": thought["text"][:80]}
            seen = await workflow.execute_activity(tool if step["kind"] == "tool" else retrieve, call, **STEP)
            return await workflow.execute_activity(model, {"id": step["id"], "seen": seen}, **STEP)

        parts = await asyncio.gather(*(branch(s) for s in p["steps"]))
        result = await workflow.execute_activity(answer, list(parts), **STEP)
        verdict = await workflow.execute_activity(judge, result, **STEP)
        return {"answer": result["text"][:64], "verdict": verdict["verdict"]}
