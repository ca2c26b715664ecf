"""Every path by which text reaches a model prompt, enumerated: untrusted text never arrives
undelimited, and every untrusted arrival taints the step.

The rule (``mesh_guardrails.provenance``): every byte that did not come from the tenant's goal or a
trusted service's own code is untrusted. The test does not list channels by hand and hope the
list is complete. It takes every message type the worker consumes (from the worker's own
registrations: a new consumer without a driver here fails), fills *every* string the message
carries with a unique canary (from the message's own fields, so a field added to a contract is
covered the day it is added), drives the worker with it, and reads the next prompt the model
gets. A canary may appear outside an untrusted block only where this file says why that text is
trusted (``TRUSTED``); the few fields the worker routes on (ids) keep real values.

The same is done for the checker's judge (the answer and all evidence are untrusted) and the
planner (its model sees the goal and nothing a step wrote), and a static check keeps the
worker's context growing through one function only.
"""

from __future__ import annotations

import ast
import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest

from mesh_contracts.v1 import (
    ApprovalRequested,
    CheckVerdict,
    Destination,
    PlanStep,
    RetrievalCompleted,
    RetrievalHit,
    StepCompleted,
    StepFailed,
    StepRequested,
    Taint,
    ToolCompleted,
    ToolRequested,
)
from mesh_durable.ledger import Ledger
from mesh_llm import ModelRequest, ScriptedModel
from mesh_testing.fakes import FakeDelivery, FakeMesh
from mesh_testing.memkv import MemoryKV
from mesh_tool_executor.tools import Registry

pytestmark = pytest.mark.unit

T = {"tenant": "acme", "task_id": "t1"}
ROUTING = {
    "type",
    "tenant",
    "task_id",
    "release",
    "step_id",
    "call_id",
    "tools",
    "kind",
    "difficulty",
    "on_held",
    "tool",
    "stopped",
    "agent",
    "pool",
}
"""Fields the worker finds its state by, or that pick its behaviour; they keep real values."""
TRUSTED: dict[tuple[str, str], str] = {
    ("step.requested", "step.instruction"): "the planner's instruction, written from the goal alone",
    ("approval.requested", "approval_id"): "an id the tool-executor made",
    ("step.requested", "inputs.s1"): "the output of a step that read nothing untrusted (its input_taint says so)",
}
"""Fields whose text may reach a prompt as it is, and why. Nothing else may."""
BLOCK = re.compile(r'<<untrusted source="[^"]*" nonce="(\w+)"[^\n]*>>\n.*?\n<<end untrusted nonce="\1">>', re.S)


_SERIAL = itertools.count()


class Canaries:
    """Marker strings unique in the whole test session, remembered with the field each was put in."""

    def __init__(self) -> None:
        self.where: dict[str, str] = {}

    def fill(self, msg_type: str, value: Any, path: str = "") -> Any:
        if isinstance(value, str):
            if path.rsplit(".", 1)[-1] in ROUTING or path in ROUTING:
                return value
            c = f"cnry{next(_SERIAL):04d}x"
            self.where[c] = path
            return c
        if isinstance(value, dict):
            return {k: self.fill(msg_type, v, f"{path}.{k}".lstrip(".")) for k, v in value.items()}
        if isinstance(value, list):
            return [self.fill(msg_type, v, path) for v in value]
        return value

    def of(self, model: Any) -> Any:
        """``model`` with every string it carries (every field, nested) replaced by a canary."""
        data = self.fill(model.type, model.model_dump(mode="json"))
        return type(model).model_validate(data)


class Recording(ScriptedModel):
    """The scripted model, remembering every request it was sent."""

    def __init__(self, scripts: dict) -> None:
        super().__init__("scripted-1", scripts)
        self.requests: list[ModelRequest] = []

    async def complete(self, request: ModelRequest):  # type: ignore[override]
        self.requests.append(request)
        return await super().complete(request)


def undelimited(request: ModelRequest, canaries: Canaries, msg_type: str) -> dict[str, str]:
    """Canaries that appear in the prompt outside every untrusted block, less those trusted by design."""
    found = {}
    for m in request.messages:
        if m.role == "assistant":
            continue  # the model's own turns: it wrote them from the context it was given
        outside = BLOCK.sub("", m.content)
        for c, path in canaries.where.items():
            if c in outside and (msg_type, path) not in TRUSTED:
                found[c] = f"{msg_type}:{path}"
    return found


def _worker(model: Recording, *, retrieve_first: bool = False):
    """A worker on a fake mesh. Its first retrieval is off unless asked for: the walk below
    drives one message per model call, as a model that searches itself is driven."""
    from mesh_worker.service import Worker
    from mesh_worker.settings import WorkerSettings

    mesh = FakeMesh()
    settings = WorkerSettings.defaults().model_copy(update={"retrieve_first": retrieve_first})
    worker = Worker(mesh, model, settings)  # type: ignore[arg-type]
    worker.steps, worker.ledger = MemoryKV(), Ledger(MemoryKV(), "worker")
    worker.calls.use_catalogue(Registry().catalogue())  # what the tool-executor publishes
    return mesh, worker


SCRIPT = {
    "worker": [
        {"tool_calls": [{"name": "search_docs", "arguments": {"query": "refunds"}}]},
        {"tool_calls": [{"name": "http_get", "arguments": {"url": "https://docs.acme.test/refunds"}}]},
        {"tool_calls": [{"name": "send_email", "arguments": {"to": "ops@acme.test", "subject": "s", "body": "b"}}]},
        {"tool_calls": [{"name": "calculator", "arguments": {"expression": "17 * 23"}}]},
        {"content": "Refunds take five days; 391."},
    ]
}
STEP = PlanStep(step_id="s2", kind="research", instruction="Find the refund policy",
                tools=("search_docs", "http_get", "send_email", "calculator"), depends_on=("s1",))  # fmt: skip


def _drivers(mesh: FakeMesh) -> dict[type, Any]:
    """One fully populated message of each type the worker consumes (routing fields real)."""
    hit = RetrievalHit(doc_id="a.md", version="v1", chunk_id="0", chunk_hash="h", score=0.9, text="t", title="x",
                       injection_signals=("sig",))  # fmt: skip
    dest = Destination(arg="to", kind="email", where="acme.test", digest="d", sealed="s")
    return {
        StepRequested: lambda: StepRequested(
            **T,
            step=STEP,
            inputs={"s1": "out", "s0": "out0"},
            input_taint={"s1": Taint(sources=("x",), signals=("y",))},
            feedback="redo",
            on_held="continue",
        ),
        RetrievalCompleted: lambda: RetrievalCompleted(
            **T, step_id="s2", call_id=mesh.last(RetrievalRequested_).call_id, hits=(hit,), index_version="iv"
        ),
        ToolCompleted: lambda: ToolCompleted(
            **T,
            step_id="s2",
            call_id=mesh.last(ToolRequested).call_id,
            tool="http_get",
            ok=False,
            result="r",
            error="e",
            untrusted=True,
            injection_signals=("sig",),
            approval_id="ap-1",
        ),
        ApprovalRequested: lambda: ApprovalRequested(
            **T,
            approval_id="ap-2",
            step_id="s2",
            call_id=mesh.last(ToolRequested).call_id,
            tool="send_email",
            arguments={"to": "ops@acme.test", "body": "b"},
            reason="why",
            risk="external",
            sources=("src",),
            destinations=(dest,),
        ),
    }


from mesh_contracts.v1 import RetrievalRequested as RetrievalRequested_  # noqa: E402


def test_the_worker_consumes_exactly_the_messages_this_test_drives():
    from mesh_worker.service import Worker

    consumed: list[type] = []

    class Registrar:
        def on_start(self, hook: Any) -> None: ...
        def consume(self, cls: type, handler: Any, **kw: Any) -> None:
            consumed.append(cls)

    Worker(Registrar(), Recording({})).register()  # type: ignore[arg-type]
    assert set(consumed) == set(_drivers(FakeMesh())), "a new way in for text: give it a driver here"


async def test_every_string_of_every_message_reaches_the_model_delimited_and_taints_the_step():
    from mesh_kit import state as st
    from mesh_worker.checkpoint import StepRun

    model = Recording(SCRIPT)
    mesh, worker = _worker(model)
    drivers = _drivers(mesh)
    handlers = {StepRequested: worker.on_step, RetrievalCompleted: worker.on_retrieval,
                ToolCompleted: worker.on_tool, ApprovalRequested: worker.on_approval}  # fmt: skip
    leaks: dict[str, str] = {}
    seen_sources: list[tuple[str, ...]] = []
    for cls in (StepRequested, RetrievalCompleted, ToolCompleted, ApprovalRequested):
        canaries = Canaries()
        msg = canaries.of(drivers[cls]())
        before = len(model.requests)
        await handlers[cls](msg, None)
        assert len(model.requests) == before + 1, f"{cls.__name__} did not lead to the next model call"
        prompt = model.requests[-1]
        leaks |= undelimited(prompt, canaries, msg.type)
        placed = [c for c in canaries.where if any(c in m.content for m in prompt.messages)]
        assert placed, f"no string of {cls.__name__} reached the prompt: the driver is not exercising it"
        run, _ = await st.load(worker.steps, StepRun.key("acme", "t1", "s2"), StepRun)
        seen_sources.append(run.taint.sources)
        assert run.taint.untrusted, f"{cls.__name__}: the step is not tainted by what it read"
    assert leaks == {}, f"text reached the model outside an untrusted block: {leaks}"

    # Inputs of unknown provenance, the checker's feedback, passages and a tool's error all taint.
    flat = {s for sources in seen_sources for s in sources}
    assert {"step:s0", "checker"} <= flat, flat
    assert any(s.startswith("search_docs:") for s in flat) and any(s.startswith("http_get:") for s in flat)
    assert mesh.last(ToolRequested).taint == run.taint, "every tool request declares the step's taint"

    # A result the tool-executor vouches for (its own code wrote it) goes in as it is.
    canaries = Canaries()
    trusted = canaries.of(ToolCompleted(**T, step_id="s2", call_id=mesh.last(ToolRequested).call_id,
                                        tool="calculator", ok=True, result="391"))  # fmt: skip
    await worker.on_tool(trusted, None)
    assert trusted.result in model.requests[-1].messages[-1].content and "<<untrusted" not in (
        model.requests[-1].messages[-1].content
    )
    done = mesh.last(StepCompleted)
    assert done.taint is not None and done.taint.untrusted, "the output carries what the step read"
    assert [(h.tool, len(h.destinations)) for h in done.held] == [("send_email", 1)], "named in the outcome"


async def test_passages_retrieved_before_the_first_turn_reach_the_model_delimited_and_cited():
    """Retrieve first: the step's instruction is the query; the passages enter the context under
    the grounding label, every string of the retrieval's answer inside an untrusted block; the
    step is tainted by them, and the model's answer cites them (the outcome carries the record)."""
    from mesh_llm.context import GROUNDING_LABEL

    model = Recording({})
    mesh, worker = _worker(model, retrieve_first=True)
    step = PlanStep(step_id="s2", kind="research", instruction="Find: refund policy", tools=("search_docs",))
    await worker.on_step(StepRequested(**T, step=step), None)
    assert model.requests == [], "the model is not asked before the passages are in"
    asked = mesh.last(RetrievalRequested_)
    assert (asked.query, asked.top_k) == ("Find: refund policy", 3)

    canaries = Canaries()
    hit = RetrievalHit(doc_id="a.md", version="v1", chunk_id="0", chunk_hash="h", score=0.9,
                       text="Refund policy: refunds take five days.", title="x")  # fmt: skip
    done = canaries.of(RetrievalCompleted(**T, step_id="s2", call_id=asked.call_id, hits=(hit,), index_version="iv"))
    await worker.on_retrieval(done, None)
    (prompt,) = model.requests
    assert undelimited(prompt, canaries, done.type) == {}
    (grounding,) = [m for m in prompt.messages if m.content.startswith(GROUNDING_LABEL)]
    ref = f"[{done.hits[0].doc_id}#{done.hits[0].chunk_id}]"
    assert grounding.role == "user" and ref in grounding.content
    assert not any(m.role in ("assistant", "tool") for m in prompt.messages), "no model turn is invented"
    out = mesh.last(StepCompleted)
    assert (
        out.taint is not None and out.taint.untrusted and any(s.startswith("search_docs:") for s in out.taint.sources)
    )
    assert [c.doc_id for c in out.citations] == [done.hits[0].doc_id] and ref in out.output


@pytest.mark.parametrize(
    ("declared", "delimited"),
    [(Taint(), False), (Taint(untrusted=True, injection_score=0.7, sources=("http_get:c1",)), True), (None, True)],
    ids=["clean-step", "tainted-step", "undeclared"],
)
async def test_a_step_output_is_trusted_only_when_the_step_that_wrote_it_read_nothing_untrusted(declared, delimited):
    model = Recording({"worker": [{"content": "done"}]})
    mesh, worker = _worker(model)
    step = PlanStep(step_id="s2", instruction="Answer", depends_on=("s1",))
    taint = {"s1": declared} if declared is not None else {}
    await worker.on_step(StepRequested(**T, step=step, inputs={"s1": "the s1 output"}, input_taint=taint), None)
    (line,) = [m.content for m in model.requests[-1].messages if m.content.startswith("Input from s1")]
    assert ("<<untrusted" in line) is delimited
    assert mesh.last(StepCompleted).taint.untrusted is delimited


def test_the_worker_context_grows_through_admit_only():
    """Static: outside ``admit`` and ``model_turn``, nothing in the worker (any of its modules)
    appends to a step's messages or builds a prompt message (a new path would bypass the
    provenance rule)."""
    import mesh_worker

    modules = sorted(Path(mesh_worker.__file__).parent.glob("*.py"))
    assert any(m.name == "checkpoint.py" for m in modules), modules  # where admit lives: the walk sees it
    offenders = []
    for module in modules:
        tree = ast.parse(module.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name in ("admit", "model_turn"):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call):
                    f = node.func
                    if isinstance(f, ast.Name) and f.id == "Message":
                        offenders.append(f"{module.name}:{fn.name}: Message(...)")
                    if isinstance(f, ast.Attribute) and f.attr in ("append", "extend", "insert"):
                        target = f.value
                        if isinstance(target, ast.Attribute) and target.attr == "messages":
                            offenders.append(f"{module.name}:{fn.name}: .messages.{f.attr}(...)")
    assert offenders == []


def test_the_judge_sees_the_answer_and_every_piece_of_evidence_delimited():
    import mesh_judge as jd

    canaries = Canaries()
    answer, passages = canaries.fill("judge", "a"), tuple(canaries.fill("judge", "p") for _ in range(3))
    req = jd.request(jd.JudgeInput("the goal", answer, "- Mentions the refund window.", passages))
    case = json.loads(req.messages[1].content)
    texts = [req.messages[0].content, case["goal"], case["answer"], *case["passages"]]
    leaks = {c for t in texts for c in canaries.where if c in BLOCK.sub("", t)}
    assert leaks == set()
    assert all(c in req.messages[1].content for c in canaries.where), "every piece reached the judge"


async def test_the_planner_model_sees_the_goal_and_nothing_a_step_or_the_checker_wrote():
    from mesh_contracts.v1 import CheckResult, TaskSubmitted
    from mesh_planner.service import Planner

    model = Recording({"planner": [{"content": '{"steps": [{"step_id": "s1", "instruction": "Find it"}]}'}]})
    mesh = FakeMesh(service="planner")
    planner = Planner(mesh, model)  # type: ignore[arg-type]
    planner.kv, planner.ledger = MemoryKV(), Ledger(MemoryKV(), "planner")

    await planner.on_submitted(TaskSubmitted(**T, goal="What is our refund window?"), FakeDelivery())
    assert [m.content for m in model.requests[0].messages][1:] == ["What is our refund window?"]
    canaries = Canaries()
    await planner.on_step_completed(canaries.of(StepCompleted(**T, step_id="s1", output="o")), FakeDelivery())
    await planner.on_verdict(CheckVerdict(**T, attempt=1, passed=False, checks=(
        CheckResult(name="grounded", passed=False, reason=canaries.fill("v", "r")),)), FakeDelivery())  # fmt: skip
    assert len(model.requests) == 1, "no step output or verdict is ever put before the planner's model"


@pytest.mark.parametrize(("stopped", "halted"), [("halted", True), ("stopped", False)])
async def test_a_call_not_run_because_the_task_stopped_ends_the_step_without_the_model(stopped, halted):
    """Whichever service saw the halt first: when the tool-executor refuses a call because the
    task is halted, the step halts (and runs again after a resume) instead of the model going on
    without the call's result (it once answered without the 391 a calculator call was to give)."""
    model = Recording({"worker": [{"tool_calls": [{"name": "calculator", "arguments": {"expression": "17 * 23"}}]},
                                  {"content": "I could not compute it."}]})  # fmt: skip
    mesh, worker = _worker(model)
    await worker.on_step(StepRequested(**T, step=STEP), None)
    call = mesh.last(ToolRequested)
    assert call.tool == "calculator" and len(model.requests) == 1
    refused = ToolCompleted(**T, step_id="s2", call_id=call.call_id, tool="calculator", ok=False,
                            error="not run: task halted: operator", stopped=stopped)  # fmt: skip
    await worker.on_tool(refused, None)
    assert len(model.requests) == 1, "the model is not told the call failed: the step ends"
    failed = mesh.last(StepFailed)
    assert failed.halted is halted and failed.reason == "stopped: task halted: operator"
    await worker.on_tool(refused, None)  # a redelivery changes nothing
    assert len([m for m in mesh.published if isinstance(m, StepFailed)]) == 1 and len(model.requests) == 1
