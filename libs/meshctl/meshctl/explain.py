"""Why a task ``submit --follow`` followed did not succeed, and what to try next (issue 46 item 5).

``explain(outcome, events, usage)`` reads what the client already holds: the outcome's structured
fields (``TaskFailed.checks``, ``failed_step``, ``TaskRejected.code``), the progress events it
received (``budget.<kind>`` trips and ``budget.denied`` with their codes, ``check.verdict``,
``retrieval.completed``) and the usage records (which model wrote the answer). Where no field
says it, the reason's stable prefix does; each is built by one place in the services:

- the planner (``mesh_planner.flow`` / ``steps.fail``): ``checker rejected the answer: ...``,
  ``step S failed[ (try N of M)]: <step's reason>[; dependents not run: ...]``, ``cancelled by
  WHO[ before it started]: ...``, ``plan rejected by WHO: ...``, ``approval S denied by WHO: ...``,
  ``try N timed out``, ``no signal X within its timeout``, ``no approver decided ...``;
- the worker (``mesh_worker.loop``): ``iteration cap (N) reached without an answer``, ``model
  (<ProviderError.kind>): ...``, ``budget (<BudgetDenied.code>): ...`` and ``stopped: ...``
  (``BudgetExceeded.describe``), ``<tool>: not run: approval ... denied|expired`` and ``<tool>:
  refused by policy: ...`` (a fixed call's refusal, from the tool-executor);
- the budget's trips (``mesh_budget.monitor``), a cancel's reason: ``deadline: ...``,
  ``stalled: ...``, ``queued too long: ...``, ``loop: ...``, ``iteration cap: ...``, ``chatter:
  ...``, ``deadlock: ...``;
- the checker (``mesh_checker``): each ``CheckResult.name``; the judge's ``judge not run: ...`` /
  ``judge failed: ...`` when it gave no grade.

The result: a line saying what failed (each failed check by name, with its reason), at most two
hints with commands to run, and always last the ``meshctl history`` of the task.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mesh_contracts import Contract
from mesh_contracts.v1 import CheckResult, ProgressEvent, TaskFailed, TaskRejected, UsageRecorded

MAX_HINTS = 2
"""Hint lines at most: with the line of what failed and the history command, four lines."""
MAX_REASON = 140
"""Characters of one check's or step's reason quoted in the line of what failed."""
MAX_CHECKS = 3
"""Failed checks named in that line (the rest counted)."""

MODEL = "try a larger model (MESH_MODEL_CONFIG; infra/local-model/README.md compares the local ones)"
HINTS: dict[str, str] = {
    # The checker's checks (CheckResult.name), and the judge when it gave no grade.
    "judge": "the answer{by} did not address the goal well enough for the judge: look at what each step produced "
    "(the history, below); {model}",
    "judge_error": "the judge gave no grade, so the answer was not passed: check the judge's route in "
    "MESH_MODEL_CONFIG and `meshctl status`, then submit again",
    "nothing_retrieved": "nothing was retrieved for the task (no step searched, or no document matched), so there "
    "was nothing to cite: does the tenant have documents on it (`meshctl ingest PATH --tenant {tenant}`)? or "
    "submit without require_citations in --policy",
    "uncited": "the answer{by} cites none of the passages retrieved: {model}",
    "bad_citation": "the answer{by} cites passages this task never retrieved (a made-up or stale [doc#chunk]): "
    "{model}; documents changed since? `meshctl ingest` them again",
    "ungrounded": "a claim is not supported by what it cites: do the tenant's documents cover the goal "
    "(`meshctl ingest PATH --tenant {tenant}`)? or lower grounding_min_support in --policy",
    "schema": "the output is not the JSON its schema asks for: check output_schema in --policy; {model}",
    "pii": "the answer holds personal data or a secret the goal did not give: name the value in the goal if it "
    "is meant to be there, or take it out of the tenant's documents",
    "forbidden": "the answer uses a term the policy forbids: reword the goal, or change forbidden_terms in --policy",
    "empty": "the answer is empty or outside its length bounds: check min_length / max_length in --policy; {model}",
    # A step's failure, a trip of the budget's, a person's decision.
    "iteration_cap": "the model kept calling tools without answering: {model}, or ask for less in one goal",
    "provider": "the model provider did not answer (down, overloaded or too slow): check it (a local model: is "
    "infra/local-model/serve.py up?) and `meshctl status`, then submit again; a fallback model in the route "
    "(MESH_MODEL_CONFIG) rides this out",
    "context": "the prompt did not fit the model's context window: MESH_CONTEXT_STRATEGY=drop_oldest (or "
    "summarise), or a model with a larger context_window in MESH_MODEL_CONFIG",
    "model_config": "the model route is misconfigured: check its keys, model ids and routes in MESH_MODEL_CONFIG",
    "unpriced": "the model has no price, so every call to it is refused: add it to MESH_PRICE_TABLE_FILE",
    "ceiling": "the task needed more than its token or cost ceiling: `meshctl budget --tenant {tenant} --task "
    "{task}` shows where it went; ask for less, or submit from code with higher TaskLimits(max_tokens, "
    "max_cost_usd)",
    "daily": "the tenant's daily ceiling is spent: `meshctl budget --tenant {tenant}`; wait for the next UTC day, "
    "or raise it in MESH_BUDGET_TENANT_LIMITS",
    "deadline": "the task ran past its deadline: submit again with a longer --deadline S (300 by default)",
    "stall": "nothing moved for its stall timeout: is every service up (`meshctl status`)? a slow local model "
    "needs a longer --stall-timeout S",
    "queue": "it waited in queues longer than --max-queue: the mesh is busy (`meshctl status`, `meshctl top`); "
    "submit later, or with a longer --max-queue S",
    "breaker": "a circuit breaker stopped the task going round in circles: reword the goal, or {model}",
    "kill_switch": "a kill switch is on: `meshctl kill-switch status`; an operator turns it off "
    "(`meshctl kill-switch off`)",
    "cancelled": "{who} cancelled it: submit it again if it is still wanted",
    "approval": "a person denied a tool call, or nobody decided in time: `meshctl approvals --all` shows the "
    "decisions; ask an approver, or reword the goal so the call is not needed",
    "policy_denied": "the tool policy refused a call: reword the goal so the call is not needed, or change the "
    "tenant's tool rules (`meshctl release`)",
    "timeout": "a step ran past its timeout: a slow model or tool (`meshctl status`); raise the node's timeout "
    "in the workflow (`meshctl workflow show`)",
    "signal": "no signal came in time: next time send it sooner (`meshctl signal TASK NAME --tenant {tenant}`), "
    "or raise the node's timeout in the workflow",
    "plan_rejected": "a reviewer rejected the plan: reword the goal, or ask the reviewer (`meshctl review list`)",
    "bad_plan": "the planner model wrote a plan that could not be used: {model}, or ask for less in one goal",
    # Refused for good at the door or by the planner: nothing ran.
    "identity": "the mesh did not accept this client for the tenant: check --tenant and the mesh home "
    "(`meshctl init --tenants NAME` adds a tenant)",
    "too_big": "the submission is larger than the tenant's whole quota: make it smaller (`meshctl status` shows "
    "each tenant's quota)",
    "refused": "nothing ran: the submission is refused as it is; change what the reason names and submit again",
}
"""What to try next, by the kind of failure: one line each (``{tenant}``, ``{task}``, ``{who}``,
``{by}`` the model that wrote the answer, ``{model}`` the advice to try a larger one)."""

CHECKS = {
    "judge": "judge", "citations_present": "uncited", "citations_resolve": "bad_citation",
    "references_resolve": "bad_citation", "grounded": "ungrounded", "schema": "schema", "no_pii": "pii",
    "no_forbidden_terms": "forbidden", "non_empty": "empty", "length": "empty",
}  # fmt: skip
"""``CheckResult.name`` -> kind (``mesh_checker.checks`` and the checker's judge)."""
MODEL_ERRORS = {"context_overflow": "context", "auth": "model_config", "bad_request": "model_config",
                "unknown_route": "model_config"}  # fmt: skip
"""``ProviderError.kind`` -> kind; any other (timeout, connection, server_error, rate_limited,
circuit_open, stalled, malformed...) is the provider not answering."""
BUDGET_CODES = {
    "task_tokens": "ceiling", "task_cost": "ceiling", "step_tokens": "ceiling", "step_cost": "ceiling",
    "tenant_daily_tokens": "daily", "tenant_daily_cost": "daily", "deadline": "deadline", "breaker": "breaker",
    "provider_breaker": "provider", "unpriced_model": "unpriced", "kill_switch": "kill_switch",
}  # fmt: skip
"""``BudgetDenied.code`` -> kind (``stopped`` is read from the reason after it)."""
TRIPS = {"deadline": "deadline", "stall": "stall", "queue": "queue", "iteration_cap": "iteration_cap",
         "loop": "breaker", "chatter": "breaker", "deadlock": "breaker", "retry_storm": "breaker"}  # fmt: skip
"""The budget's trip kinds (``budget.<kind>`` events) -> kind."""
TRIP_PREFIXES = (("deadline:", "deadline"), ("stalled:", "stall"), ("queued too long:", "queue"),
                 ("iteration cap:", "iteration_cap"), ("loop:", "breaker"), ("chatter:", "breaker"),
                 ("deadlock:", "breaker"), ("retry storm:", "breaker"))  # fmt: skip
"""A trip's reason, as a cancel quotes it, by its prefix: when its event was not seen."""

STEP = re.compile(
    r"step (?P<step>\S+) failed(?: \(try \d+ of \d+\))?: (?P<why>.*?)(?:; dependents not run: .*)?$", re.S
)
CANCELLED = re.compile(r"cancelled by (?P<who>\S+?)(?: before it started)?: (?P<why>.*)", re.S)
CODED = re.compile(r"(?P<what>model|budget) \((?P<code>[a-z_]+)\): ")
REASONS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p, re.S), kind)
    for p, kind in (
        (r"iteration cap \(\d+\) reached", "iteration_cap"),
        (r"model: .*window", "context"),
        (r"model: ", "model_config"),
        (r"budget: ", "ceiling"),
        (r"stopped: kill switch", "kill_switch"),
        (r"stopped: ", "cancelled"),
        (r"plan rejected by ", "plan_rejected"),
        (r"approval \S+ denied by ", "approval"),
        (r".*not run: approval \S+ (?:denied|expired)", "approval"),
        (r"no approver decided", "approval"),
        (r".*refused by policy: ", "policy_denied"),
        (r"try \d+ timed out", "timeout"),
        (r"no signal \S+ within its timeout", "signal"),
        (r"planner model returned an unusable plan|plan has |step \S+ depends on ", "bad_plan"),
        (r"refused at the door: identity: ", "identity"),
    )
)
"""A reason (the task's, or its failed step's) by its stable prefix -> kind, first match."""
JUDGED = re.compile(
    r"(?P<model>\S+) scored (?P<score>[\d.]+) \(min (?P<min>[\d.]+)\)(?: \([^)]*\))?: (?P<why>.*)", re.S
)
"""The judge's grade, as the checker words it: ``<provider/model> scored S (min M)[ (...)]: reasons``."""
DOOR = "refused at the door: "
"""How the client words a refusal by the tenant's door (``meshctl.submission``)."""
CHECKER_REJECTED = re.compile(r"(?:checker rejected the answer|the checker rejected \S+): (?P<checks>.*)", re.S)


@dataclass(frozen=True)
class Cause:
    kind: str
    what: str
    who: str = ""


def failed(outcome: Contract | None) -> bool:
    """The task ended without an answer for good: it failed, or was refused in a way waiting does
    not cure (no ``retry_after_s``, or 0: e.g. larger than the tenant's whole quota)."""
    return isinstance(outcome, TaskFailed) or (isinstance(outcome, TaskRejected) and not outcome.retry_after_s)


def explain(
    outcome: Contract | None, events: Sequence[ProgressEvent] = (), usage: Sequence[UsageRecorded] = ()
) -> list[str]:
    """What failed and what to try next, one line each, ending with the task's history command;
    empty unless the task ``failed``."""
    if not failed(outcome):
        return []
    assert isinstance(outcome, TaskFailed | TaskRejected)
    causes = _causes(outcome, events)
    by = next((f"{u.provider}/{u.model}" for u in reversed(usage) if u.agent == "worker" and not u.error), "")
    lines = [f"what failed: {'; '.join(dict.fromkeys(c.what for c in causes))}"] if causes else []
    hints: list[str] = []
    for c in (c for c in causes if c.kind):
        hint = HINTS[c.kind].format(
            tenant=outcome.tenant, task=outcome.task_id, who=c.who or "someone",
            by=f" (written by {by})" if by else "", model=_larger(by),
        )  # fmt: skip
        if hint not in hints:
            hints.append(hint)
    lines += [f"next: {h}" for h in hints[:MAX_HINTS]]
    lines.append(f"see: meshctl history {outcome.task_id} --tenant {outcome.tenant} (as the admin): every message "
                 "of the task, each step's output, each check and why")  # fmt: skip
    return lines


def _larger(by: str) -> str:
    if by.startswith("scripted/"):
        return "the scripted model answers only the goals it has scripts for: configure a real one (MESH_MODEL_CONFIG)"
    return MODEL


def _causes(outcome: TaskFailed | TaskRejected, events: Sequence[ProgressEvent]) -> list[Cause]:
    reason = outcome.reason.strip()
    if isinstance(outcome, TaskRejected):
        kind = (
            "too_big" if outcome.code == "quota_exceeded" else "identity" if _kind(reason) == "identity" else "refused"
        )
        return [Cause(kind, f"refused before anything ran ({outcome.code}): {_short(reason.removeprefix(DOOR))}")]
    if CHECKER_REJECTED.match(reason):
        return _checks(outcome.checks, events, reason)
    if m := CANCELLED.match(reason):
        return [_cancelled(m["who"], m["why"], events)]
    step, why = "", reason
    if m := STEP.match(reason):
        step, why = m["step"], m["why"]
    where = f"step {step}" if step else "the task"
    if CHECKER_REJECTED.match(why):  # a workflow's check node, on its last try (the task's checks are not its)
        return _checks((), events, why)
    if m := CANCELLED.match(why.removeprefix("stopped: task ")):
        return [_cancelled(m["who"], m["why"], events)]
    if m := CODED.match(why):
        said = "its model call failed" if m["what"] == "model" else "the budget refused a model call"
        return [
            Cause(
                _coded(m["what"], m["code"], step, events), f"{where}: {said} ({m['code']}): {_short(why[m.end() :])}"
            )
        ]
    kind = _kind(why)
    return [Cause(kind, f"{where}: {_short(why)}")] if kind or step else []


def _kind(reason: str) -> str:
    return next((kind for pattern, kind in REASONS if pattern.match(reason)), "")


def _coded(what: str, code: str, step: str, events: Sequence[ProgressEvent]) -> str:
    """A model error's or a budget denial's kind; a denial's code as its event carries it, if seen."""
    if what == "model":
        return MODEL_ERRORS.get(code, "provider")
    for e in reversed(events):
        if e.stage == "budget.denied" and (not step or e.step_id == step) and e.detail.get("code"):
            code = str(e.detail["code"])
            break
    return BUDGET_CODES.get(code, "ceiling")


def _cancelled(who: str, why: str, events: Sequence[ProgressEvent]) -> Cause:
    """A cancel: a trip of the budget's (its ``budget.<kind>`` event, whose message the cancel
    quotes, says which; else the reason's prefix), or a person's."""
    trip = next((e.stage.removeprefix("budget.") for e in reversed(events)
                 if e.stage.startswith("budget.") and e.message == why), "")  # fmt: skip
    kind = TRIPS.get(trip) or next((k for prefix, k in TRIP_PREFIXES if why.startswith(prefix)), "")
    if kind:
        return Cause(kind, f"the budget stopped it: {_short(why)}")
    return Cause("cancelled", f"cancelled by {who}: {_short(why)}", who=who)


def _checks(checks: Sequence[CheckResult], events: Sequence[ProgressEvent], text: str) -> list[Cause]:
    """Each failed check: from the verdict's ``checks``, else by name from the reason the planner
    wrote (a workflow's check node, whose verdict the outcome does not carry)."""
    failed_checks = [c for c in checks if not c.passed] or _named(text, events)
    causes = [Cause(_check_kind(c, events), f"{c.step_id + '.' if c.step_id else ''}{c.name} ({_why(c)})")
              for c in failed_checks]  # fmt: skip
    if len(causes) > MAX_CHECKS:
        rest = len(causes) - MAX_CHECKS
        causes = [*causes[:MAX_CHECKS], Cause(causes[MAX_CHECKS].kind, f"and {rest} more check(s)")]
    return causes


def _why(c: CheckResult) -> str:
    """A check's reason, short; the judge's as its score against the minimum and its reasons."""
    if c.name == "judge" and (m := JUDGED.match(c.reason)):
        return _short(f"scored {m['score']}, min {m['min']}: {m['why']}")
    return _short(c.reason)


def _check_kind(c: CheckResult, events: Sequence[ProgressEvent]) -> str:
    if c.name == "judge" and c.reason.startswith(("judge not run: ", "judge failed: ")):
        inner = c.reason.split(": ", 1)[1]
        m = CODED.match(inner)
        return _coded(m["what"], m["code"], "", events) if m else _kind(inner) or "judge_error"
    if c.name == "citations_present" and not _retrieved(c.reason, events):
        return "nothing_retrieved"
    return CHECKS.get(c.name, "judge")


def _retrieved(reason: str, events: Sequence[ProgressEvent]) -> int:
    """Passages the task retrieved: as the check counted them, else as rag's events said."""
    if m := re.search(r"retrieved (\d+) passage", reason):
        return int(m[1])
    return sum(int(m[1]) for e in events if e.stage == "retrieval.completed" and (m := re.match(r"(\d+) ", e.message)))


def _named(text: str, events: Sequence[ProgressEvent]) -> list[CheckResult]:
    """``name: reason; name: reason`` as the planner joins failed checks, cut at the names the
    last ``check.verdict`` event lists (or the checker's own names)."""
    m = CHECKER_REJECTED.match(text)
    body = m["checks"] if m else text
    verdict = next((e.message for e in reversed(events) if e.stage == "check.verdict"), "")
    listed = verdict.removeprefix("failed ").split(", ") if verdict.startswith("failed ") else []
    names = {n.split(".")[-1] for n in listed if n} | set(CHECKS)
    pattern = re.compile(rf"(?:^|; )(?:(\S+)\.)?({'|'.join(map(re.escape, sorted(names, key=len, reverse=True)))}): ")
    found = list(pattern.finditer(body))
    return [
        CheckResult(name=f[2], passed=False, step_id=f[1] or "",
                    reason=body[f.end() : found[i + 1].start() if i + 1 < len(found) else len(body)])
        for i, f in enumerate(found)
    ]  # fmt: skip


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"
