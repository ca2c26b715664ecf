"""The tool policy: may this call run now, does it need a human, or is it refused?

The model is not trusted to police itself: an instruction injected into a retrieved passage
or a web page reads, to a gullible model, exactly like the user's own. So the decision is
made here, in code, from facts the model cannot forge:

- the tool's risk class and configured policy;
- the step's *taint*, declared by the worker (which passages and tool outputs are in the
  step's context, and their injection scores), never by the model;
- the tenant's goal from the task record, to tell whether the arguments that decide where
  an effect lands (an email's recipient, a URL) were chosen by the tenant, or could have been
  chosen by injected text (``destinations.py``: whole values, parsed, in the argument's role).

A read tool always runs. A write or external tool in an untainted step runs. In a tainted
step it follows its ``on_untrusted`` policy: ``approve`` asks a human unless every trusted
argument is a value the goal offers in that argument's role *and* nothing else the call
carries (an email's body and subject, say) is flagged by the injection detector; ``deny``
refuses; ``allow`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from mesh_contracts.v1 import Taint
from mesh_guardrails import injection
from mesh_tool_executor import destinations
from mesh_tool_executor.tools import Tool

Verdict = Literal["allow", "approve", "deny"]


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reasons: tuple[str, ...]


def _value(args: Any, name: str) -> Any:
    return args.get(name) if isinstance(args, dict) else getattr(args, name, None)


def _strings(value: Any, skip: frozenset[str] = frozenset()) -> list[str]:
    """Every string a call carries (recursively), less the named top-level arguments."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() if k not in skip for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _shown(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def decide(tool: Tool, args: Any, taint: Taint, goal: str) -> Decision:
    """The verdict for one validated call. ``goal`` is the tenant's goal as the planner recorded
    it ('' when unknown: nothing is offered)."""
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
    if not tool.trusted_args:
        return Decision("approve", (tainted, score))
    offered = destinations.offers(goal)
    roles = [destinations.role_of(a) for a in tool.trusted_args]
    values = {name: _value(args, name) for name, _ in roles}
    foreign = [f"{name} (as a {role})" for name, role in roles if not offered.offers(role, values[name])]
    if foreign:
        return Decision(
            "approve", (tainted, f"{', '.join(foreign)} not offered by the goal in that role (could come from content)",
                        score),
        )  # fmt: skip
    payload = injection.score("\n".join(_strings(args, frozenset(values)))[:20_000])
    if payload.flagged:
        return Decision(
            "approve",
            (tainted, f"the call carries text the injection detector flags (score {payload.score:.2f}: "
                      f"{', '.join(payload.signals[:4])}) to a destination the goal chose", score),
        )  # fmt: skip
    chosen = ", ".join(f"{name}={_shown(values[name])}" for name, _ in roles)
    return Decision("allow", (tainted, f"{chosen} offered by the goal in that role, not by content", score))
