"""The tool policy: may this call run now, does it need a human, or is it refused?

The model is not trusted to police itself: an instruction injected into a retrieved passage
or a web page reads, to a gullible model, exactly like the user's own. So the decision is
made here, in code, from facts the model cannot forge:

- the tool's risk class and configured policy;
- the step's *taint*, declared by the worker (which passages and tool outputs are in the
  step's context, and their injection scores), never by the model;
- the task's own text (the tenant's goal and the planner's instruction for the step) from
  the task record, to tell whether the arguments that decide where an effect lands (an
  email's recipient, a URL) were chosen by the tenant or could have been chosen by
  injected text.

A read tool always runs. A write or external tool in an untainted step runs. In a tainted
step it follows its ``on_untrusted`` policy: ``approve`` asks a human unless every trusted
argument appears verbatim in the task's own text; ``deny`` refuses; ``allow`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mesh_contracts.v1 import Taint
from mesh_tool_executor.tools import Tool

Verdict = Literal["allow", "approve", "deny"]


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reasons: tuple[str, ...]


def _value(args: Any, name: str) -> str | None:
    value = args.get(name) if isinstance(args, dict) else getattr(args, name, None)
    return None if value is None else str(value)


def _in_text(value: str, text: str) -> bool:
    """An argument appears in the task's own text (case-insensitively, as a whole value)."""
    v = value.strip().lower()
    return bool(v) and v in text.lower()


def decide(tool: Tool, args: Any, taint: Taint, trusted_text: str) -> Decision:
    """The verdict for one validated call. ``trusted_text`` is the goal and the step's
    instruction as the planner recorded them ('' when unknown: nothing counts as trusted)."""
    if tool.needs_approval:
        return Decision("approve", (f"{tool.name} always needs a human decision",))
    if tool.risk == "read":
        return Decision("allow", ("read-only tool",))
    if not taint.untrusted:
        return Decision("allow", (f"{tool.risk} tool; the step's context holds no untrusted content",))
    origin = ", ".join(taint.sources[:4]) or "unknown"
    tainted = f"{tool.risk} tool in a step whose context holds untrusted content ({origin})"
    score = f"highest injection score {taint.injection_score:.2f}" + (
        f" ({', '.join(taint.signals[:5])})" if taint.signals else ""
    )
    policy = tool.untrusted_policy
    if policy == "allow":
        return Decision("allow", (tainted, f"{tool.name} is configured on_untrusted=allow", score))
    if policy == "deny":
        return Decision("deny", (tainted, f"{tool.name} is configured on_untrusted=deny", score))
    if tool.trusted_args:
        values = {a: _value(args, a) for a in tool.trusted_args}
        foreign = [a for a, v in values.items() if v is None or not _in_text(v, trusted_text)]
        if not foreign:
            chosen = ", ".join(f"{a}={values[a]}" for a in tool.trusted_args)
            return Decision("allow", (tainted, f"{chosen} comes from the task's own text, not from content", score))
        return Decision(
            "approve",
            (tainted, f"{', '.join(foreign)} not found in the task's own text (could come from content)", score),
        )
    return Decision("approve", (tainted, score))
