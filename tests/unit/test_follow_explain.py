"""``meshctl submit --follow`` explains a failure (``meshctl.explain``, issue 46 item 5): what
failed and what to try next, mapped from the outcome's structured fields and the events the
client received. Each outcome here is made the way the mesh makes it: the checker's verdict by
the checker (its judge the scripted model), the failure by the planner's own transitions
(``mesh_planner.flow.Flow``), a step's reason by the function that words it, a trip by the
budget's monitor, a refusal by the client's own hand-in."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mesh_agent.metered import BudgetExceeded
from mesh_budget.ledger import Decision
from mesh_budget.monitor import Monitor, Trip
from mesh_budget.reserve import denial
from mesh_checker import service as checker_service
from mesh_checker.checks import check_answer, run_checks
from mesh_checker.service import Checker
from mesh_contracts.v1 import (
    BudgetReserve,
    CheckRequested,
    CheckResult,
    CheckVerdict,
    Citation,
    ControlCancel,
    PlanStep,
    ProgressEvent,
    RetrievalHit,
    StepFailed,
    StepResult,
    TaskCompleted,
    TaskFailed,
    TaskLimits,
    TaskPolicy,
    TaskRejected,
    TaskSubmitted,
    TokenUsage,
    UsageRecorded,
)
from mesh_contracts.v1.records import QuotaRecord, StepState, TaskRecord
from mesh_llm.errors import ProviderError
from mesh_llm.scripted import ScriptedModel
from mesh_planner.flow import Flow
from mesh_tenancy import quota
from mesh_tenancy.door import DoorRefused
from meshctl.commands.tasks import _followed
from meshctl.explain import HINTS, explain, failed
from meshctl.submission import Followed, Submission

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
GOAL = "What is NATS JetStream? Also how does it store messages?"
HISTORY = "see: meshctl history t-1 --tenant acme"


def worker_usage(model: str = "scripted-1", provider: str = "scripted") -> UsageRecorded:
    return UsageRecorded(tenant="acme", task_id="t-1", agent="worker", step_id="s1", call_id="s1-a1-i0",
                         provider=provider, model=model, input_tokens=10, output_tokens=5)  # fmt: skip


# --- the outcome as the mesh makes it ---------------------------------------------------------------


def record(status: str = "running", goal: str = GOAL) -> TaskRecord:
    steps = {
        "s1": StepState(
            step=PlanStep(step_id="s1", kind="research", instruction="look it up"), status="dispatched", attempt=1
        ),
        "s2": StepState(
            step=PlanStep(step_id="s2", kind="answer", instruction="answer", depends_on=("s1",)), status="pending"
        ),
    }
    return TaskRecord(tenant="acme", task_id="t-1", goal=goal, status=status, steps=steps)  # type: ignore[arg-type]


def ended(rec: TaskRecord) -> TaskFailed:
    """The task's outcome as the planner's transition wrote it to the record's outbox."""
    (body,) = [i.body for i in rec.outbox if i.type == "task.failed"]
    return TaskFailed.model_validate(body)


def flow() -> Flow:
    return Flow(lambda: None, lambda _tenant: False)


def step_failed(reason: str) -> TaskFailed:
    rec = record()
    assert flow().step_failed(rec, StepFailed(tenant="acme", task_id="t-1", step_id="s1", attempt=1, reason=reason))
    return ended(rec)


def rejected_by_checker(verdict: CheckVerdict) -> TaskFailed:
    rec = record("checking")
    rec.check_attempt = 1
    for s in rec.steps.values():
        s.status, s.output = "completed", "The result is 4."
    assert flow().verdict(rec, verdict, "c1")
    return ended(rec)


async def checked(answer: str, *, require_citations: bool, passages: dict[Any, RetrievalHit] | None = None,
                  citations: tuple[Citation, ...] = (), monkeypatch: pytest.MonkeyPatch,
                  tmp_path: Path) -> tuple[CheckVerdict, list[ProgressEvent]]:  # fmt: skip
    """The checker's verdict and its ``check.verdict`` event, its judge the scripted model."""
    from mesh_host import Mesh
    from mesh_identity import Signer, TrustBundle, Verifier, new_signing_key
    from mesh_kit import ServiceSettings

    settings = ServiceSettings(service="checker", signing_key_file=tmp_path / "k", trust_bundle_file=tmp_path / "b")
    mesh = Mesh(settings, signer=Signer("checker", new_signing_key()), verifier=Verifier(TrustBundle({})))
    sent: list[CheckVerdict] = []
    events: list[ProgressEvent] = []

    async def publish(msg: CheckVerdict, key: str = "", **_: Any) -> None:
        sent.append(msg)

    async def progress(tenant: str, task_id: str, stage: str, message: str, **kw: Any) -> None:
        events.append(ProgressEvent(tenant=tenant, task_id=task_id, source="checker", stage=stage, message=message))

    async def judged(_mesh: Any, _ledger: Any, _models: Any, request: Any, **_: Any) -> tuple[Any, TokenUsage]:
        return await ScriptedModel("scripted-1").complete(request), TokenUsage()  # no budget, no ledger

    async def retrieved(*_: Any) -> dict[Any, RetrievalHit]:
        return passages or {}

    mesh.publish, mesh.progress = publish, progress  # type: ignore[method-assign,assignment]
    monkeypatch.setattr(checker_service, "call_model_once", judged)
    checker = Checker(mesh, ScriptedModel("scripted-1"), passages=retrieved)
    request = CheckRequested(
        tenant="acme", task_id="t-1", goal=GOAL, answer=answer, answer_step="s2", citations=citations,
        require_citations=require_citations,
        steps=(StepResult(step_id="s2", kind="answer", output=answer, models=("scripted/scripted-1",)),),
    )  # fmt: skip
    await checker.on_request(request, SimpleNamespace(msg_id="m1", stored_at=None))  # type: ignore[arg-type]
    (verdict,) = sent
    return verdict, events


def hint(lines: list[str]) -> str:
    """The hints (``next:`` lines), joined."""
    return " | ".join(line for line in lines if line.startswith("next: "))


def shaped(lines: list[str]) -> list[str]:
    """Every explanation: what failed, at most two hints, the history command last; four lines at most."""
    assert 2 <= len(lines) <= 4, lines
    assert lines[0].startswith("what failed: ") and lines[-1].startswith(HISTORY), lines
    return lines


# --- the checker's verdict -----------------------------------------------------------------------


async def test_a_judge_rejection_names_the_judge_with_its_grade_and_says_look_at_the_steps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    verdict, events = await checked("The result is 4.", require_citations=False, monkeypatch=monkeypatch,
                                    tmp_path=tmp_path)  # fmt: skip
    out = rejected_by_checker(verdict)
    assert out.reason.startswith("checker rejected the answer: judge: scripted/scripted-1 scored 0.00 (min 0.60)")
    lines = shaped(explain(out, events, [worker_usage("gpt-4o-mini", "openai")]))
    assert lines[0] == (
        "what failed: judge (scored 0.00, min 0.60: relevance 0.00: shares 0 of 4 goal words; "
        "incomplete: nothing on 'What is NATS JetStream')"
    )
    assert "did not address the goal" in lines[1] and "written by openai/gpt-4o-mini" in lines[1]
    assert "try a larger model (MESH_MODEL_CONFIG" in lines[1]
    # Written by the scripted model: a larger one is not the cure, a real one is.
    scripted = explain(out, events, [worker_usage()])
    assert "the scripted model answers only the goals it has scripts for" in hint(scripted)


async def test_an_uncited_answer_with_nothing_retrieved_says_to_ingest_documents(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    verdict, events = await checked("The result is 4.", require_citations=True, monkeypatch=monkeypatch,
                                    tmp_path=tmp_path)  # fmt: skip
    out = rejected_by_checker(verdict)
    lines = shaped(explain(out, events))
    assert lines[0] == "what failed: citations_present (the task retrieved 0 passage(s) but the answer cites none)"
    assert "nothing was retrieved" in lines[1] and "`meshctl ingest PATH --tenant acme`" in lines[1]
    assert "require_citations" in lines[1]


async def test_an_uncited_answer_when_passages_were_retrieved_blames_the_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    text = "JetStream stores messages in streams on disk or in memory, replicated across servers."
    passages = {("jetstream.md", "0"): RetrievalHit(doc_id="jetstream.md", version="v1", chunk_id="0",
                                                    chunk_hash="h" * 64, score=0.5, text=text)}  # fmt: skip
    verdict, events = await checked(text, require_citations=True, passages=passages, monkeypatch=monkeypatch,
                                    tmp_path=tmp_path)  # fmt: skip
    assert [c.name for c in verdict.checks if not c.passed] == ["citations_present"]
    lines = shaped(explain(rejected_by_checker(verdict), events))
    assert "cites none of the passages retrieved" in hint(lines) and "MESH_MODEL_CONFIG" in hint(lines)


def check_request(answer: str, **kw: Any) -> CheckRequested:
    kw.setdefault("require_citations", False)
    return CheckRequested(tenant="acme", task_id="t-1", goal=GOAL, answer=answer, answer_step="s2", **kw)


GHOST = Citation(doc_id="ghost.md", version="v1", chunk_id="9", chunk_hash="0" * 64)
HIT = RetrievalHit(doc_id="jetstream.md", version="v1", chunk_id="0", chunk_hash="1" * 64, score=0.5,
                   text="JetStream keeps messages in streams.")  # fmt: skip


@pytest.mark.parametrize(
    ("name", "request_", "passages", "expected"),
    [
        ("citations_resolve", check_request("JetStream keeps messages. [ghost.md#9]", citations=(GHOST,)), {},
         "never retrieved"),
        ("references_resolve", check_request("JetStream keeps messages. [nowhere.md#1]"), {}, "never retrieved"),
        ("grounded", check_request("Kafka partitions replicate through ZooKeeper quorum elections. [jetstream.md#0]",
                                   citations=(Citation(**HIT.model_dump(include=set(Citation.model_fields))),)),
         {("jetstream.md", "0"): HIT}, "grounding_min_support"),
        ("schema", check_request("not json", policy=TaskPolicy(output_schema={"type": "object"})), {},
         "output_schema"),
        ("no_pii", check_request("Mail ops@example.com about it."), {}, "personal data"),
        ("no_forbidden_terms", check_request("We guarantee it.", policy=TaskPolicy(forbidden_terms=("guarantee",))),
         {}, "forbidden_terms"),
        ("length", check_request("x" * 50, policy=TaskPolicy(max_length=10)), {}, "max_length"),
        ("non_empty", check_request(" "), {}, "min_length"),
    ],
)  # fmt: skip
def test_each_check_the_checker_runs_has_its_hint(
    name: str, request_: CheckRequested, passages: dict[Any, RetrievalHit], expected: str
) -> None:
    failing = [c for c in check_answer(request_, passages) if not c.passed]
    assert name in {c.name for c in failing}, failing
    verdict = CheckVerdict(tenant="acme", task_id="t-1", passed=False, checks=tuple(failing))
    lines = shaped(explain(rejected_by_checker(verdict)))
    assert f"{name} (" in lines[0] and expected in hint(lines), lines


def test_a_judge_that_gave_no_grade_is_not_blamed_on_the_answer() -> None:
    """The checker's own words when the judge did not grade (its budget, its model's reply)."""
    ceiling = BudgetExceeded("task token ceiling 50000 would be exceeded", "task_tokens")
    for reason, expected in ((f"judge not run: {ceiling.describe()}", "`meshctl budget --tenant acme --task t-1`"),
                             ("judge failed: judge reply has no JSON object: 'sure!'", "the judge gave no grade")):  # fmt: skip
        judge = CheckResult(name="judge", passed=False, reason=reason)
        lines = shaped(explain(rejected_by_checker(CheckVerdict(tenant="acme", task_id="t-1", passed=False,
                                                                checks=(judge,)))))  # fmt: skip
        assert expected in hint(lines) and "did not address the goal" not in hint(lines), lines


def test_many_failed_checks_are_counted_and_at_most_two_hints_are_given() -> None:
    m = check_request("Mail ops@example.com, we guarantee it. [nowhere.md#1]",
                      policy=TaskPolicy(forbidden_terms=("guarantee",), max_length=10), require_citations=True)  # fmt: skip
    verdict = CheckVerdict(tenant="acme", task_id="t-1", passed=False,
                           checks=tuple(c for c in run_checks(m, {}) if not c.passed))  # fmt: skip
    assert len(verdict.checks) > 3
    lines = shaped(explain(rejected_by_checker(verdict)))
    assert len(lines) == 4 and f"and {len(verdict.checks) - 3} more check(s)" in lines[0]


def test_a_workflow_check_nodes_rejection_is_read_by_the_names_in_its_verdict_event() -> None:
    """A check node's verdict is not the outcome's ``checks``: the planner's reason (``the checker
    rejected <node>: name: reason; ...``) is cut at the names the ``check.verdict`` event lists."""
    leak = check_request("Mail ops@example.com.")
    (pii,) = [c for c in check_answer(leak, {}) if not c.passed]
    reason = f"step gate failed: the checker rejected draft: {pii.name}: {pii.reason}; judge: judge failed: timeout"
    out = TaskFailed(tenant="acme", task_id="t-1", reason=reason, failed_step="gate")
    event = ProgressEvent(tenant="acme", task_id="t-1", source="checker", stage="check.verdict",
                          message="failed no_pii, judge")  # fmt: skip
    lines = shaped(explain(out, [event]))
    assert lines[0] == f"what failed: no_pii ({pii.reason}); judge (judge failed: timeout)"
    assert "personal data" in lines[1] and "the judge gave no grade" in lines[2]


# --- a step's failure ----------------------------------------------------------------------------


def reserve() -> BudgetReserve:
    return BudgetReserve(tenant="acme", task_id="t-1", agent="worker", step_id="s1", call_id="s1-a1-i2", tokens=1561)


def refused_by_budget(code: str) -> str:
    """The worker's reason for a call the budget refused (``BudgetExceeded.describe``)."""
    decision = Decision(False, code, 900, 0.01, 900, 0.01)
    return BudgetExceeded(denial(reserve(), decision, (50_000, 1.0, 2_000_000, 20.0), None, ("", -1, -1.0)),
                          code).describe()  # fmt: skip


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("iteration cap (6) reached without an answer", "kept calling tools without answering"),
        (f"model (timeout): {ProviderError('no first token within 30s', kind='timeout')}", "did not answer"),
        (f"model (server_error): {ProviderError('HTTP 503', kind='server_error')}", "infra/local-model/serve.py up?"),
        (f"model (context_overflow): {ProviderError('needs 9,000 tokens', kind='context_overflow')}",
         "MESH_CONTEXT_STRATEGY=drop_oldest"),
        (f"model (auth): {ProviderError('401', kind='auth')}", "keys, model ids and routes"),
        (refused_by_budget("task_tokens"), "`meshctl budget --tenant acme --task t-1`"),
        (refused_by_budget("task_cost"), "TaskLimits(max_tokens, max_cost_usd)"),
        (refused_by_budget("tenant_daily_cost"), "MESH_BUDGET_TENANT_LIMITS"),
        (BudgetExceeded("task deadline of 300 s has passed", "deadline").describe(), "--deadline S"),
        (BudgetExceeded("circuit breaker tripped: loop: step s1 dispatched 3 times", "breaker").describe(),
         "circuit breaker"),
        (BudgetExceeded("kill switch (tenant acme) is on: incident 42", "kill_switch").describe(),
         "`meshctl kill-switch status`"),
        ("send_email: not run: approval ap-1c0f denied (denied by approver.acme.bob: not to them)",
         "`meshctl approvals --all`"),
        ("send_email: refused by policy: recipient not named in the goal", "tool policy refused a call"),
        ("try 2 timed out", "raise the node's timeout"),
    ],
)  # fmt: skip
def test_a_failed_steps_reason_gets_its_hint(reason: str, expected: str) -> None:
    out = step_failed(reason)
    assert out.reason == f"step s1 failed: {reason}; dependents not run: s2" and out.failed_step == "s1"
    lines = shaped(explain(out))
    assert lines[0].startswith("what failed: step s1: ") and "dependents" not in lines[0]
    assert expected in hint(lines), lines


def test_a_budget_denial_is_read_by_the_code_its_event_carries() -> None:
    out = step_failed(refused_by_budget("task_tokens"))
    daily = ProgressEvent(tenant="acme", task_id="t-1", source="budget", stage="budget.denied", message="...",
                          step_id="s1", detail={"code": "tenant_daily_tokens"})  # fmt: skip
    assert "MESH_BUDGET_TENANT_LIMITS" in hint(explain(out, [daily])), "the event's code, where it was seen"


def test_a_step_failure_without_a_known_cause_still_says_which_step_and_points_at_the_history() -> None:
    lines = explain(step_failed("calculator: division by zero"))
    assert lines == ["what failed: step s1: calculator: division by zero", lines[-1]]
    assert lines[-1].startswith(HISTORY)


# --- cancelled: by the budget's trips, or by a person ----------------------------------------------


def trip(kind: str) -> Trip:
    """The budget monitor's trip of ``kind``, from its own clock rules."""
    m = Monitor()
    limits = TaskLimits(deadline_s=10, stall_timeout_s=5, max_queue_s=3 if kind == "queue" else None)
    m.observe(TaskSubmitted(tenant="acme", task_id="t-1", goal=GOAL, limits=limits), 0.0)
    if kind == "stall":
        m.started("acme", "t-1", "plan", 1.0)
    (found,) = m.tick({"deadline": 10.5, "stall": 6.5, "queue": 3.5}[kind])
    assert found.kind == kind
    return found


@pytest.mark.parametrize(("kind", "expected"), [("deadline", "--deadline S"), ("stall", "--stall-timeout S"),
                                                ("queue", "--max-queue S")])  # fmt: skip
@pytest.mark.parametrize("event_seen", [True, False])
def test_a_cancel_by_the_budget_says_which_limit_and_the_flag_that_sets_it(
    kind: str, expected: str, event_seen: bool
) -> None:
    t = trip(kind)
    rec = record()
    assert flow().control(rec, ControlCancel(tenant="acme", task_id="t-1", reason=t.reason), "budget", "c1")
    out = ended(rec)
    assert out.reason == f"cancelled by budget: {t.reason}"
    # what the budget's watch publishes with the cancel (``Watch.act``)
    events = [ProgressEvent(tenant="acme", task_id="t-1", source="budget", stage=f"budget.{t.kind}",
                            message=t.reason, detail={"action": t.action})] if event_seen else []  # fmt: skip
    lines = shaped(explain(out, events))
    assert lines[0] == f"what failed: the budget stopped it: {t.reason}" and expected in lines[1]


def test_a_person_cancelling_is_said_as_such() -> None:
    rec = record()
    assert flow().control(rec, ControlCancel(tenant="acme", task_id="t-1", reason="not needed"), "client.acme", "c")
    lines = shaped(explain(ended(rec)))
    assert lines[1] == "next: client.acme cancelled it: submit it again if it is still wanted"


# --- refused ---------------------------------------------------------------------------------------


class _Door:
    """A tenant's client whose door refuses the submission."""

    def __init__(self, refusal: DoorRefused) -> None:
        self.nc, self.tenant, self.refusal = None, "acme", refusal

    async def publish(self, *_: Any, **__: Any) -> Any:
        raise self.refusal


def refused_at_the_door(refusal: DoorRefused) -> TaskRejected:
    submitted = TaskSubmitted(tenant="acme", task_id="t-1", goal=GOAL)
    door: Any = _Door(refusal)
    got = asyncio.run(Submission(door, submitted, None)._hand_in("1", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"))
    assert got is not None
    return got


def test_a_refusal_for_good_is_explained_and_one_worth_waiting_for_is_not() -> None:
    identity = refused_at_the_door(DoorRefused("forbidden", "identity: token signed by a key the bundle does not hold"))
    assert identity.code == "invalid" and identity.retry_after_s is None and failed(identity)
    assert "`meshctl init --tenants NAME`" in hint(shaped(explain(identity)))

    too_big = quota.charge(QuotaRecord(), quota.Limit(bytes=1024), 3600.0, 4096, 0.0)
    assert too_big is not None and too_big.retry_after_s == 0.0
    whole = refused_at_the_door(DoorRefused(too_big.code, f"tenant acme in TASK: {too_big.reason}", 0.0))
    assert failed(whole), "retry after 0 s: waiting does not cure it"
    assert "larger than the tenant's whole quota" in hint(shaped(explain(whole)))

    busy = TaskRejected(tenant="acme", task_id="t-1", reason="tenant acme has 64 tasks in flight, its limit",
                        code="too_many_in_flight", retry_after_s=2.5)  # fmt: skip
    assert not failed(busy) and explain(busy) == []
    done = TaskCompleted(tenant="acme", task_id="t-1", answer="4", steps=1, elapsed_s=1.0)
    assert explain(done) == [] and explain(None) == []


def test_every_kind_of_hint_is_one_line_and_names_something_to_do() -> None:
    for kind, text in HINTS.items():
        line = text.format(tenant="acme", task="t-1", who="someone", by="", model="a larger model")
        assert "\n" not in line and len(line) < 260, (kind, len(line))


def test_the_reasons_read_here_are_still_worded_so_by_the_services() -> None:
    """The reasons built inline (no function to import): their wording, where the services write
    them. A change there must change ``meshctl.explain`` too."""
    sources = {
        "services/worker/mesh_worker/loop.py": (
            'failed=f"iteration cap ({req.max_iterations}) reached without an answer"',
            'failed=f"model ({exc.kind}): {exc}"',
            "failed=f\"{call.tool}: {run.fixed_output.removeprefix('error: ')}\"",
        ),
        "services/tool-executor/mesh_tool_executor/held.py": (
            'f"not run: approval {rec.approval_id} {verdict} ({why})"',
        ),
        "services/tool-executor/mesh_tool_executor/service.py": ('f"refused by policy: ',),
        "services/checker/mesh_checker/service.py": (
            'reason=f"judge not run: {exc.describe()}"',
            'reason=f"judge failed: {exc}"',
            'f"{verdict.model} scored {verdict.score:.2f} (min {m.policy.judge_min_score:.2f}){same}: {why}"',
            '"failed " + ", ".join(failed)',
        ),
        "services/planner/mesh_planner/flow.py": (
            'f"the checker rejected {node.of}: {failed}"',
            'f"try {w.attempt} timed out"',
            'f"no signal {w.signal} within its timeout"',
        ),
        "services/budget/mesh_budget/monitor.py": (
            'f"loop: ',
            'f"chatter: ',
            'f"deadlock: ',
            'f"iteration cap: ',
            'f"retry storm: ',
        ),
        "services/budget/mesh_budget/watch.py": ('f"budget.{trip.kind}"',),
    }
    missing = [(f, s) for f, texts in sources.items() for s in texts if s not in (ROOT / f).read_text()]
    assert missing == []


# --- through the command ---------------------------------------------------------------------------


def followed(out: TaskFailed, events: list[ProgressEvent]) -> Followed:
    return Followed("t-1", outcome=out, events=events, usage=[worker_usage()], submitted_at=1.0, finished_at=2.0)


def test_submit_follow_prints_the_explanation_after_the_verdict_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    t = trip("deadline")
    rec = record()
    flow().control(rec, ControlCancel(tenant="acme", task_id="t-1", reason=t.reason), "budget", "c1")
    seen = followed(ended(rec), [])
    code = _followed(argparse.Namespace(json=False, timeout=30.0), seen)
    got = capsys.readouterr()
    assert code == 1 and got.out == ""
    assert got.err.splitlines()[1:] == [
        f"failed t-1: cancelled by budget: {t.reason}",
        f"  what failed: the budget stopped it: {t.reason}",
        f"  next: {HINTS['deadline']}",
        "  see: meshctl history t-1 --tenant acme (as the admin): every message of the task, each step's output, "
        "each check and why",
    ]

    code = _followed(argparse.Namespace(json=True, timeout=30.0), seen)
    got = capsys.readouterr()
    assert code == 1 and got.err == ""
    assert json.loads(got.out)["explain"] == explain(seen.outcome, seen.events, seen.usage) != []


def test_a_completed_task_has_nothing_to_explain(capsys: pytest.CaptureFixture[str]) -> None:
    done = TaskCompleted(tenant="acme", task_id="t-1", answer="4", steps=1, elapsed_s=1.0)
    seen = Followed("t-1", outcome=done, submitted_at=1.0, finished_at=2.0)
    assert _followed(argparse.Namespace(json=False, timeout=30.0), seen) == 0
    assert capsys.readouterr().err == ""
    assert _followed(argparse.Namespace(json=True, timeout=30.0), seen) == 0
    assert json.loads(capsys.readouterr().out)["explain"] == []
