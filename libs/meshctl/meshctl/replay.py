"""``meshctl replay TASK``: re-run a finished task from its recorded inputs into a new task, and
say what changed.

The replay is an ordinary task of the same tenant (submitted by the tenant's client, admitted,
budgeted, audited) whose ``task.submitted`` carries a ``Replay``: the goal, limits, policy,
labels and priority are the original's, as its client signed them. By default every model call
is answered with the original's recorded response (the ledger keeps each under its call id,
which does not name the task), so the replay is deterministic and free: a regression check of
the mesh's own code (tools, checks, parsing) against a real past task. ``--from STEP`` answers
the plan and the steps before STEP from the recordings and makes STEP, what follows it and the
judge live; ``--model ROUTE`` sends the live calls to a gateway route (another model, for
comparison); ``--live`` makes every call live. Write and external tools never run in a replay:
the tool-executor answers them with the original's recorded result (or a note) and says so.

The story of each task (plan, tool calls, answer, verdict, cost, models, prompt versions) is
read as the admin with direct gets, every message's signature verified (a message that does not
verify is left out, as the budget's monitor does), and the two are compared field by field.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS

from mesh_contracts import ContractError, parse_message
from mesh_contracts import topology as topo
from mesh_contracts.v1 import (
    CheckVerdict,
    PlanCreated,
    ProgressEvent,
    Replay,
    TaskCompleted,
    TaskFailed,
    TaskRejected,
    TaskSubmitted,
    ToolCompleted,
    ToolRequested,
    UsageRecorded,
)
from mesh_guardrails.redact import redact, redact_value
from mesh_identity import IdentityError, Verifier
from mesh_kit import envelope as env
from meshctl import audit
from meshctl.errors import MeshctlError

PLAN, CHECK = "plan", "check"
"""The ``Replay.recorded`` names of the planner's call and the judge's."""
FIELDS = ("plan", "tools", "answer", "verdict", "cost", "models", "prompts")


class ReplayError(MeshctlError):
    """The task cannot be replayed as asked (one line for the operator)."""


@dataclass
class ToolUse:
    call_id: str
    tool: str
    arguments: dict[str, Any]
    ok: bool | None = None
    """None: no answer stored."""
    result: str = ""
    dry_run: bool = False

    def line(self) -> str:
        args = json.dumps(redact_value(self.arguments), sort_keys=True, ensure_ascii=False)
        if self.ok is None:
            out = "(no answer)"
        else:
            out = redact(self.result if self.ok else f"error: {self.result}")[:100].replace("\n", " ")
        return f"{self.call_id} {self.tool}({args[:120]}) -> {out}" + (" [dry run]" if self.dry_run else "")

    def same(self, other: ToolUse) -> bool:
        return (self.tool, self.arguments, self.ok, self.result) == (other.tool, other.arguments, other.ok,
                                                                     other.result)  # fmt: skip


@dataclass
class Story:
    """What one task did, from its verified stored messages."""

    tenant: str
    task_id: str
    submitted: TaskSubmitted | None = None
    plan: PlanCreated | None = None
    tools: dict[str, ToolUse] = field(default_factory=dict)
    outcome: TaskCompleted | TaskFailed | TaskRejected | None = None
    verdict: CheckVerdict | None = None
    tokens: int = 0
    cost_usd: float = 0.0
    calls: int = 0
    models: set[str] = field(default_factory=set)
    live_calls: list[str] = field(default_factory=list)
    """Calls of a replay the recordings could not answer (``replay.live`` events)."""
    unverified: int = 0
    messages: int = 0
    """Verified messages read."""

    @property
    def steps(self) -> list[str]:
        return [s.step_id for s in self.plan.steps] if self.plan else []

    def plan_lines(self) -> list[str]:
        if self.plan is None:
            return ["(no plan)"]
        return [f"{s.step_id} {s.kind}{' after ' + ','.join(s.depends_on) if s.depends_on else ''}: "
                f"{s.instruction} [tools: {', '.join(s.tools) or '-'}]" for s in self.plan.steps]  # fmt: skip

    def answer(self) -> str:
        if isinstance(self.outcome, TaskCompleted):
            return self.outcome.answer
        if self.outcome is None:
            return "(no outcome)"
        return f"({self.outcome.type}: {self.outcome.reason})"

    def verdict_line(self) -> str:
        if self.verdict is None:
            return "(no verdict)"
        failed = [c.name for c in self.verdict.checks if not c.passed]
        score = f", judge {self.verdict.judge_score:.2f}" if self.verdict.judge_score is not None else ""
        return ("passed" if self.verdict.passed else f"failed ({', '.join(failed) or '?'})") + score

    def cost_line(self) -> str:
        return f"${self.cost_usd:.6f}, {self.tokens} tokens in {self.calls} paid model calls"

    def prompts(self) -> dict[str, str]:
        return dict(getattr(self.outcome, "prompt_versions", {}) or {})

    def summary(self) -> dict[str, Any]:
        """What the task did, redacted as ``meshctl history`` shows it."""
        redacted: dict[str, Any] = redact_value(  # redact_value is typed Any -> Any: a copy, same shape
            {
                "task_id": self.task_id,
                "outcome": self.outcome.type if self.outcome else None,
                "plan": self.plan_lines(),
                "tools": [t.line() for t in self.tools.values()],
                "answer": self.answer(),
                "verdict": self.verdict_line(),
                "cost_usd": round(self.cost_usd, 6),
                "tokens": self.tokens,
                "paid_calls": self.calls,
                "models": sorted(self.models),
                "prompts": self.prompts(),
                "live_calls": self.live_calls,
            }
        )
        return redacted


async def load(nc: NATS, tenant: str, task_id: str, verifier: Verifier) -> Story:
    """The task's story from every stream but the progress feed (and the feed's replay notes)."""
    story = Story(tenant, task_id)
    sources = [(stream, f"{domain}.*.{tenant}.{task_id}.>") for domain, stream in topo.STREAMS.items()]
    for stream, subject in sources:
        for s in await audit.stored(nc, stream, subject):
            try:
                model = parse_message(s.subject, s.data)
                verifier.verify(s.headers.get(env.IDENTITY), s.data, model, at=s.time,
                                msg_id=s.headers.get(env.MSG_ID, ""))  # fmt: skip
            except (ContractError, IdentityError):
                story.unverified += 1
                continue
            story.messages += 1
            _fold(story, model)
    return story


def _fold(story: Story, m: Any) -> None:
    if isinstance(m, TaskSubmitted):
        story.submitted = story.submitted or m
    elif isinstance(m, PlanCreated):
        if story.plan is None or m.revision >= story.plan.revision:
            story.plan = m
    elif isinstance(m, ToolRequested):
        story.tools.setdefault(m.call_id, ToolUse(m.call_id, m.tool, dict(m.arguments)))
    elif isinstance(m, ToolCompleted):
        use = story.tools.setdefault(m.call_id, ToolUse(m.call_id, m.tool, {}))
        use.ok, use.result, use.dry_run = m.ok, (m.result if m.ok else m.error), m.dry_run
    elif isinstance(m, TaskRejected):
        story.outcome = story.outcome or m
    elif isinstance(m, (TaskCompleted, TaskFailed)):
        # An end wins over a refusal stored before it: the task was resubmitted under its id and ran.
        story.outcome = m if story.outcome is None or isinstance(story.outcome, TaskRejected) else story.outcome
    elif isinstance(m, CheckVerdict) and not m.node:  # the task's verdict (a check node's decides its node)
        if story.verdict is None or m.attempt >= story.verdict.attempt:
            story.verdict = m
    elif isinstance(m, UsageRecorded):
        story.tokens += m.input_tokens + m.output_tokens
        story.cost_usd += m.cost_usd
        story.calls += 0 if m.error else 1
        story.models.add(f"{m.provider}/{m.model}")
    elif isinstance(m, ProgressEvent) and m.stage == "replay.live":
        story.live_calls.append(str(m.detail.get("call_id", "?")))


def recorded_for(story: Story, *, from_step: str | None, live: bool) -> tuple[str, ...]:
    """``Replay.recorded`` for a replay of ``story``: everything (default), nothing (``live``), or
    the plan and the steps before ``from_step`` in plan order."""
    if live:
        return ()
    steps = story.steps
    if from_step is None:
        return (PLAN, *steps, CHECK)
    if from_step not in steps:
        raise ReplayError(f"no step {from_step!r} in the plan of {story.task_id} (steps: {', '.join(steps) or 'none'})")
    return (PLAN, *steps[: steps.index(from_step)])


def replay_of(story: Story, *, from_step: str | None = None, live: bool = False, route: str = "",
              prompts: dict[str, str] | None = None) -> Replay:  # fmt: skip
    """The ``Replay`` a replay of a finished ``story`` carries; ``ReplayError`` says why not."""
    where = f"{story.tenant}/{story.task_id}"
    if not story.messages:
        raise ReplayError(f"no stored message about {where}")
    if story.submitted is None:
        raise ReplayError(
            f"no verified submission of {where} is stored (never submitted, or older than the task stream keeps)"
        )
    if story.outcome is None:
        raise ReplayError(f"{where} has not finished (no outcome is stored): replay a finished task")
    if isinstance(story.outcome, TaskRejected):
        raise ReplayError(f"{where} was rejected ({story.outcome.reason}): nothing ran, so there is nothing to replay")
    return Replay(of=story.task_id, recorded=recorded_for(story, from_step=from_step, live=live), route=route,
                  prompts=prompts or {})  # fmt: skip


def resubmission(story: Story) -> dict[str, Any]:
    """The original submission's inputs, for ``TenantClient.submit``."""
    m = story.submitted
    assert m is not None
    return {"goal": m.goal, "limits": m.limits, "policy": m.policy, "priority": m.priority, "labels": dict(m.labels)}


def compare(a: Story, b: Story) -> dict[str, dict[str, Any]]:
    """Field by field: ``{"plan": {"same": bool, "was": ..., "now": ...}, ...}``."""
    out: dict[str, dict[str, Any]] = {}

    def put(name: str, same: bool, was: Any, now: Any) -> None:
        out[name] = {"same": same, "was": was, "now": now}

    put("plan", a.plan_lines() == b.plan_lines(), a.plan_lines(), b.plan_lines())
    ta, tb = list(a.tools.values()), list(b.tools.values())
    put("tools", len(ta) == len(tb) and all(x.same(y) for x, y in zip(ta, tb, strict=True)),
        [t.line() for t in ta], [t.line() for t in tb])  # fmt: skip
    put("answer", a.answer() == b.answer(), a.answer(), b.answer())
    put("verdict", a.verdict_line() == b.verdict_line(), a.verdict_line(), b.verdict_line())
    put("cost", (round(a.cost_usd, 6), a.tokens) == (round(b.cost_usd, 6), b.tokens), a.cost_line(), b.cost_line())
    put("models", a.models == b.models, sorted(a.models), sorted(b.models))
    put("prompts", a.prompts() == b.prompts(), a.prompts(), b.prompts())
    return out


def behaves_the_same(diff: dict[str, dict[str, Any]]) -> bool:
    """Plan, tool calls, answer and verdict unchanged (cost, models and prompts may differ: a
    recorded replay costs nothing, a replay on another model is meant to differ there)."""
    return all(diff[k]["same"] for k in ("plan", "tools", "answer", "verdict"))


def render(a: Story, b: Story, replay: Replay, diff: dict[str, dict[str, Any]]) -> str:
    recorded = ", ".join(replay.recorded) or "none"
    prompts = ", ".join(f"{k}@{v}" for k, v in sorted(replay.prompts.items()))
    lines = [
        f"replay of {a.tenant}/{a.task_id} as {b.task_id}: {b.outcome.type if b.outcome else 'no outcome'}",
        f"  recorded responses for: {recorded}; other calls live"
        + (f" on route {replay.route}" if replay.route else "")
        + (f" with prompts {prompts}" if prompts else "")
        + "; write and external tools dry-run",
    ]
    if b.live_calls and replay.recorded:
        lines.append(f"  made live for want of a recording: {', '.join(b.live_calls)}")
    lines.append("")
    for name in FIELDS:
        d = diff[name]
        if d["same"]:
            lines.append(f"{name:<8} same: {_short(_count(name, d['now'], b))}")
            continue
        lines.append(f"{name:<8} CHANGED")
        if name == "models":
            lines += [
                f"  - {', '.join(d['was']) or '(no paid call)'}",
                f"  + {', '.join(d['now']) or '(no paid call)'}",
            ]
        elif isinstance(d["was"], str) and isinstance(d["now"], str):
            if name == "answer":
                lines += [f"  {x}" for x in _udiff(d["was"].splitlines(), d["now"].splitlines())]
            else:
                lines += [f"  - {d['was']}", f"  + {d['now']}"]
        elif isinstance(d["was"], dict):
            keys = sorted(set(d["was"]) | set(d["now"]))
            lines += [f"  {k}: {d['was'].get(k, '-')} -> {d['now'].get(k, '-')}" for k in keys
                      if d["was"].get(k) != d["now"].get(k)]  # fmt: skip
        else:
            lines += [f"  {x}" for x in _udiff([str(x) for x in d["was"]], [str(x) for x in d["now"]])]
    same = behaves_the_same(diff)
    lines += ["", "behaviour: " + ("the same (plan, tool calls, answer, verdict)" if same else "CHANGED")]
    return redact("\n".join(lines))  # compared as stored, shown as history shows it


def _count(name: str, value: Any, b: Story) -> str:
    if isinstance(value, str):
        return value
    if name == "tools":
        dry = sum(t.dry_run for t in b.tools.values())
        return f"{len(value)} calls" + (f" ({dry} dry run in the replay)" if dry else "")
    if name == "plan":
        return f"{len(value)} steps"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
    return ", ".join(map(str, value))


def _short(text: str, width: int = 110) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _udiff(was: list[str], now: list[str]) -> list[str]:
    return [x.rstrip("\n") for x in difflib.unified_diff(was, now, "original", "replay", lineterm="", n=1)]
