"""Holding one case's outcome to what its dataset line expects: a property per thing checked
(``outcome`` always, ``checker`` unless a failure is expected, one per ``expect`` key given), each
``{"passed", "detail"}`` with a detail a person can act on, and the case's entry in the report
(the properties, with the outcome's cost, tokens, latency, steps, tools, judge score and answer).

Public API::

    evaluate(case, outcome, *, step_ids=None, label=None) -> dict[str, {"passed", "detail"}]
    case_result(case, task_id, observed, *, timeout_s=None) -> dict
    Observed(outcome, latency_s, step_ids=None, error="")   # what the mesh gave for one case
    outcome_name(outcome) -> "completed" | "failed" | "rejected" | "timeout" | ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mesh_contracts import Contract
from mesh_contracts.v1 import TaskCompleted, TaskFailed, TaskRejected
from mesh_eval.dataset import Case

ANSWER_CHARS = 2000


def outcome_name(outcome: Contract | None) -> str:
    if isinstance(outcome, TaskCompleted):
        return "completed"
    if isinstance(outcome, TaskFailed):
        return "failed"
    if isinstance(outcome, TaskRejected):
        return "rejected"
    return "timeout" if outcome is None else type(outcome).__name__


def _prop(passed: bool, detail: str = "", *, skipped: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"passed": bool(passed), "detail": detail}
    if skipped:
        out["skipped"] = True
    return out


def _short(items: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(repr(s) for s in items[:limit])
    return shown + (f" (+{len(items) - limit})" if len(items) > limit else "") if items else "none"


def evaluate(
    case: Case, outcome: Contract | None, *, step_ids: Sequence[str] | None = None, label: str | None = None
) -> dict[str, dict[str, Any]]:
    """Property results for one case: ``outcome`` always, ``checker`` unless a failure is
    expected, and one per ``expect`` key given. ``label`` overrides the outcome's name (e.g.
    ``error``); ``step_ids`` are the distinct steps seen in progress events (None: unknown)."""
    exp = case.expect
    seen = _Seen(outcome, label or outcome_name(outcome), exp.outcome, step_ids)
    props = {"outcome": _outcome(seen)}
    if exp.outcome == "completed":
        props["checker"] = _checker(seen)
    for key in exp.keys:
        props[key] = _EXPECTED[key](getattr(exp, key), seen)
    return props


@dataclass(frozen=True)
class _Seen:
    """One case's outcome as its properties read it."""

    outcome: Contract | None
    got: str
    """The outcome's name (``completed``, ``timeout``, ...), or the label given instead (``error``)."""
    expected: str
    """The outcome the case expects (``expect.outcome``)."""
    step_ids: Sequence[str] | None

    @property
    def completed(self) -> TaskCompleted | None:
        return self.outcome if isinstance(self.outcome, TaskCompleted) else None

    @property
    def reason(self) -> str:
        return getattr(self.outcome, "reason", "") or ""

    @property
    def none(self) -> str:
        return f"no outcome ({self.got})"


def _outcome(seen: _Seen) -> dict[str, Any]:
    got, exp, reason = seen.got, seen.expected, seen.reason
    return _prop(
        got == exp,
        f"{got}" if got == exp else f"expected {exp}, got {got}" + (f": {reason}" if reason else ""),
    )


def _checker(seen: _Seen) -> dict[str, Any]:
    """The checker's verdict on an answer (when one is expected): every check passed."""
    completed = seen.completed
    if completed is not None:
        bad = [c for c in completed.checks if not c.passed]
        return _prop(
            not bad,
            f"{len(completed.checks)} check(s) passed"
            if not bad
            else "; ".join(f"{c.name}: {c.reason}" if c.reason else c.name for c in bad),
        )
    failing = [
        f"{c.name}: {c.reason}" if c.reason else c.name for c in getattr(seen.outcome, "checks", ()) if not c.passed
    ]
    return _prop(False, f"{seen.got}" + (f"; failed checks: {'; '.join(failing)}" if failing else ""))


def _cites(want: Sequence[str], seen: _Seen) -> dict[str, Any]:
    completed = seen.completed
    done = completed is not None
    cited = list(dict.fromkeys(c.doc_id for c in completed.citations)) if completed is not None else []
    missing = [d for d in want if d not in cited]
    return _prop(
        done and not missing,
        f"no citations ({seen.got})"
        if not done
        else (f"cited {_short(cited)}" if not missing else f"missing {_short(missing)}; cited {_short(cited)}"),
    )


def _text(want: Sequence[str], seen: _Seen, *, forbidden: bool) -> dict[str, Any]:
    """The answer when an answer is expected, the reason when a failure is, has every one of
    ``want`` (none of them: ``forbidden``), case-insensitively. An outcome of the other kind has no
    text to hold to the expectation (its mismatch is the ``outcome`` property's)."""
    completed = seen.completed
    what = "answer" if seen.expected == "completed" else "reason"
    has_text = (
        completed is not None if seen.expected == "completed" else isinstance(seen.outcome, (TaskFailed, TaskRejected))
    )
    if not has_text:
        return _prop(False, f"no {what} to check ({seen.got})")
    low = (completed.answer if completed is not None else seen.reason).lower()
    if forbidden:
        present = [s for s in want if s.lower() in low]
        return _prop(not present, f"{what} has {_short(present)}" if present else f"{what} has none of {len(want)}")
    absent = [s for s in want if s.lower() not in low]
    return _prop(not absent, f"{what} lacks {_short(absent)}" if absent else f"{what} has all {len(want)}")


def _contains(want: Sequence[str], seen: _Seen) -> dict[str, Any]:
    return _text(want, seen, forbidden=False)


def _lacks(want: Sequence[str], seen: _Seen) -> dict[str, Any]:
    return _text(want, seen, forbidden=True)


def _cost(want: float, seen: _Seen) -> dict[str, Any]:
    if seen.outcome is None:
        return _prop(False, seen.none)
    cost = _usage(seen.outcome)["cost_usd"]
    return _prop(cost <= want, f"${cost:.6f} {'<=' if cost <= want else '>'} ${want:.6f}")


def _steps(want: int, seen: _Seen) -> dict[str, Any]:
    """The plan's steps of a completed task; of another, the distinct steps seen (skipped when none were)."""
    completed = seen.completed
    if completed is not None:
        steps = completed.steps
    elif seen.step_ids is not None and len(set(seen.step_ids)) > 0:
        steps = len(set(seen.step_ids))
    else:
        return _prop(True, f"skipped: step count unknown ({seen.got})", skipped=True)
    return _prop(steps <= want, f"{steps} step(s) {'<=' if steps <= want else '>'} {want}")


def _tools(want: Sequence[str], seen: _Seen) -> dict[str, Any]:
    used = list(getattr(seen.outcome, "tools", ()) or ())
    missing = [t for t in want if t not in used]
    return _prop(
        seen.outcome is not None and not missing,
        seen.none
        if seen.outcome is None
        else (f"missing {_short(missing)}; called {_short(used)}" if missing else f"called {_short(used)}"),
    )


def _judge(want: float, seen: _Seen) -> dict[str, Any]:
    score = getattr(seen.outcome, "judge_score", None)
    if score is None:
        return _prop(False, "the judge did not run" if seen.outcome is not None else seen.none)
    return _prop(score >= want, f"{score:.3f} {'>=' if score >= want else '<'} {want:g}")


_EXPECTED: dict[str, Callable[[Any, _Seen], dict[str, Any]]] = {
    "must_cite": _cites,
    "must_contain": _contains,
    "must_not_contain": _lacks,
    "max_cost_usd": _cost,
    "max_steps": _steps,
    "tool_calls": _tools,
    "judge_min_score": _judge,
    "reason_contains": _contains,
}
"""The property of each ``expect`` key: ``(the key's value, the outcome seen) -> result``."""


def _usage(outcome: Contract | None) -> dict[str, Any]:
    u = getattr(outcome, "usage", None)
    if u is None:
        return {"cost_usd": 0.0, "input": 0, "output": 0}
    return {"cost_usd": float(u.cost_usd), "input": int(u.input_tokens), "output": int(u.output_tokens)}


@dataclass
class Observed:
    """What the mesh gave for one case."""

    outcome: Contract | None
    """``TaskCompleted`` / ``TaskFailed`` / ``TaskRejected``, or None: nothing within the timeout."""
    latency_s: float
    """Client-observed seconds from submission to outcome (to giving up, for a timeout)."""
    step_ids: Sequence[str] | None = None
    """Distinct step ids seen in progress events (None: not known)."""
    error: str = ""
    """Set when the submission itself failed (the case's outcome is then ``error``)."""


def case_result(case: Case, task_id: str, seen: Observed, *, timeout_s: float | None = None) -> dict[str, Any]:
    """The report entry of one case."""
    out = seen.outcome
    label = "error" if seen.error else outcome_name(out)
    props = evaluate(case, out, step_ids=seen.step_ids, label=label if seen.error else None)
    usage = _usage(out)
    if seen.error:
        reason = seen.error
    elif out is None:
        reason = f"no outcome within {timeout_s:g}s" if timeout_s else "no outcome"
    else:
        reason = getattr(out, "reason", "") or ""
    steps = out.steps if isinstance(out, TaskCompleted) else (len(set(seen.step_ids)) if seen.step_ids else None)
    return {
        "id": case.id,
        "tenant": case.tenant,
        "task_id": task_id,
        "tags": list(case.tags),
        "passed": all(p["passed"] for p in props.values()),
        "outcome": label,
        "reason": reason,
        "properties": props,
        "cost_usd": round(usage["cost_usd"], 10),
        "tokens": {"input": usage["input"], "output": usage["output"]},
        "latency_s": round(seen.latency_s, 3),
        "steps": steps,
        "tools": list(getattr(out, "tools", ()) or ()),
        "judge_score": getattr(out, "judge_score", None),
        "checks": [c.model_dump(mode="json") for c in getattr(out, "checks", ()) or ()],
        "prompt_versions": dict(getattr(out, "prompt_versions", {}) or {}),
        "answer": out.answer[:ANSWER_CHARS] if isinstance(out, TaskCompleted) else "",
    }
