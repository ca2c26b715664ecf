"""Coordination safety, derived only from the message stream.

``Monitor`` folds every message about a task (in any order: it reads several streams) into a
``TaskWatch`` and reports ``Trip``s. It folds what the budget may know of a message, its
``Seen``: type, task and facts (``mesh_contracts.facts``: ids, statuses, plan dependencies,
keyed digests of what repeats, never the content), as the ENVELOPES stream carries them. It
reports circuit breakers (iteration cap, loop, chatter, retry
storm), deadlocks (a cycle in the wait-for graph) and stalls. It is pure
logic: no I/O, a clock passed in, so the rules are unit-tested exactly; the service feeds it
and acts on what it reports. (The provider breakers are not per task: they are decided in the
budget's Redis view, on each call as it is settled, see ``mesh_budget.ledger``.)

The wait-for graph has a node per step and per outstanding call. Edges:

- a pending step waits on each dependency that has not completed (``plan.created``);
- a dispatched step waits on each of its outstanding tool / retrieval calls;
- an ``await_step`` call (one agent waiting for another's output) waits on that step;
- a tool call waiting for a human decision waits on the approval (which waits on nobody:
  humans do not deadlock, they stall, and approval time is excluded from stall time).

A cycle means no member can ever proceed. It is reported with its members and the edge
kinds, and the task is cancelled with reason ``deadlock``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

from pydantic import ValidationError

from mesh_contracts import Contract
from mesh_contracts import facts as mesh_facts
from mesh_contracts.v1 import StepRequested, TaskLimits
from mesh_resilience import BreakerPolicy

AWAIT_TOOL = mesh_facts.AWAIT_TOOL
FIRST_ATTEMPT = StepRequested.model_fields["attempt"].default
MAX_ITERATIONS = StepRequested.model_fields["max_iterations"].default
DEADLOCK_CHECKED = frozenset({"plan.created", "tool.requested", "step.requested", "step.failed"})
"""What can close a cycle of the wait-for graph (a dependency, a call, a dispatch, a failure)."""


@dataclass(frozen=True)
class Rules:
    """Breaker thresholds (``MESH_BUDGET_*`` settings)."""

    loop_repeats: int = 3
    """The same step signature (tool + arguments, a re-dispatched step, a re-checked answer) seen
    this many times in one task is a loop."""
    chatter_window_s: float = 30.0
    chatter_min_messages: int = 60
    chatter_ratio: float = 25.0
    """Inter-agent messages per completed step in the window above which agents are chattering."""
    retry_storm_errors: int = 5
    retry_storm_window_s: float = 30.0
    provider_window_s: float = BreakerPolicy.window_s
    provider_min_calls: int = BreakerPolicy.min_calls
    provider_error_rate: float = BreakerPolicy.failure_rate
    provider_cooldown_s: float = BreakerPolicy.cooldown_s
    """The provider breaker: the gateway's policy and defaults (``mesh_resilience``), mesh-wide."""

    def provider_policy(self) -> BreakerPolicy:
        return BreakerPolicy(
            window_s=self.provider_window_s,
            min_calls=self.provider_min_calls,
            failure_rate=self.provider_error_rate,
            cooldown_s=self.provider_cooldown_s,
        )

    iteration_cap: int = 0
    """Model calls per step attempt; 0: the step's own ``max_iterations``."""


@dataclass(frozen=True)
class Trip:
    """Something the budget service must act on. ``action``: cancel | halt | flag."""

    kind: str  # iteration_cap | loop | chatter | retry_storm | provider_breaker | deadlock | stall | deadline | queue
    tenant: str
    task_id: str
    reason: str
    action: str = "cancel"
    members: tuple[str, ...] = ()
    closed_at: float = 0.0
    """Stored time of the message that caused it (a cycle's closing edge), for latency."""


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Seen:
    """One message as the monitor knows it: its type, its task and its facts."""

    type: str
    tenant: str
    task_id: str
    facts: mesh_facts.Facts

    @classmethod
    def of(cls, m: Contract) -> Seen:
        """A whole message's facts (a usage record, a unit test's message), by the projection its
        producer's kit applies (unkeyed signatures: equal stays equal within this process)."""
        return cls(m.type, m.tenant, m.task_id, mesh_facts.facts(m))


@dataclass
class TaskWatch:
    tenant: str
    task_id: str
    created_at: float | None = None
    deadline_s: float = 0.0
    max_queue_s: float | None = None
    stall_timeout_s: float = 0.0
    stall_policy: str = "cancel"
    terminal: bool = False
    refused: bool = False
    """It ended refused (``task.rejected``): nothing of it ran, and a client may submit it again."""
    halted: bool = False
    last_progress: float = 0.0
    waiting: set[str] = field(default_factory=set)
    """Work handed out and not yet taken up: ``plan`` from submission until the planner starts
    planning, a step from its dispatch until its first call. While everything outstanding is
    waiting the task is queued: its stall clock does not run (queue time is not a stall)."""
    queued_since: float | None = None
    queue_s: float = 0.0
    """Time spent queued so far (closed spells)."""
    approvals: dict[str, float] = field(default_factory=dict)  # approval id -> requested at
    approval_paused_s: float = 0.0
    deps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    step_status: dict[str, str] = field(default_factory=dict)
    step_attempt: dict[str, int] = field(default_factory=dict)
    step_cap: dict[str, int] = field(default_factory=dict)
    calls: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # call -> (step, tool, awaited step)
    done_calls: set[str] = field(default_factory=set)
    approval_of: dict[str, str] = field(default_factory=dict)  # approval id -> step
    signatures: Counter[str] = field(default_factory=Counter)
    llm_calls: Counter[tuple[str, int]] = field(default_factory=Counter)
    seen_usage: set[str] = field(default_factory=set)
    labels: dict[str, str] | None = None
    """The task's labels, from its ``task.submitted`` (None: not seen)."""
    failed_calls: set[str] = field(default_factory=set)
    """Logical calls (attempt suffix stripped) that failed at least once."""
    chatter: deque[float] = field(default_factory=deque)
    completions: deque[float] = field(default_factory=deque)
    errors: deque[float] = field(default_factory=deque)
    tripped: set[str] = field(default_factory=set)
    trip_reasons: dict[str, str] = field(default_factory=dict)
    """Why each breaker tripped (a reservation it refuses says so, not just which breaker)."""

    def shrink(self) -> None:
        """The task ended: nothing more of it is folded (``observe`` stops at ``terminal``), so
        what only the breakers and the wait-for graph read goes now, not when the task is
        forgotten ten minutes later. What is kept: whether it ended and when it last moved (for
        ``forget``), its labels (late usage is counted under them) and its trips (their reasons)."""
        for kept in (self.waiting, self.approvals, self.deps, self.step_status, self.step_attempt, self.step_cap,
                     self.calls, self.done_calls, self.approval_of, self.signatures, self.llm_calls,
                     self.seen_usage, self.failed_calls, self.chatter, self.completions, self.errors):  # fmt: skip
            kept.clear()

    # --- the wait-for graph ---------------------------------------------------------------------

    def edges(self) -> dict[str, list[tuple[str, str]]]:
        """node -> [(node it waits on, why)]."""
        g: dict[str, list[tuple[str, str]]] = {}
        for sid, deps in self.deps.items():
            if self.step_status.get(sid, "pending") == "pending":
                for d in deps:
                    if self.step_status.get(d) != "completed":
                        g.setdefault(f"step:{sid}", []).append((f"step:{d}", "depends_on"))
        for cid, (sid, tool, awaited) in self.calls.items():
            if cid in self.done_calls or self.step_status.get(sid) in ("completed", "failed"):
                continue
            g.setdefault(f"step:{sid}", []).append((f"call:{cid}", tool))
            if awaited and self.step_status.get(awaited) != "completed":
                g.setdefault(f"call:{cid}", []).append((f"step:{awaited}", AWAIT_TOOL))
        for aid, sid in self.approval_of.items():
            if aid in self.approvals:
                g.setdefault(f"step:{sid}", []).append((f"approval:{aid}", "approval"))
        return g

    def cycle(self) -> list[tuple[str, str, str]] | None:
        """One cycle as [(from, to, why)], or None."""
        g = self.edges()
        state: dict[str, int] = {}
        path: list[tuple[str, str, str]] = []

        def visit(n: str) -> list[tuple[str, str, str]] | None:
            state[n] = 1
            for m, why in g.get(n, []):
                path.append((n, m, why))
                if state.get(m) == 1:
                    start = next(i for i, (a, _, _) in enumerate(path) if a == m)
                    return path[start:]
                if m not in state:
                    found = visit(m)
                    if found:
                        return found
                path.pop()
            state[n] = 2
            return None

        for n in list(g):
            if n not in state:
                found = visit(n)
                if found:
                    return found
        return None


class _Fold:
    """One message being folded into a task's watch: what it tripped, and what comes after."""

    __slots__ = ("at", "done", "inter_agent", "trips", "w")

    def __init__(self, w: TaskWatch, at: float) -> None:
        self.w, self.at = w, at
        self.trips: list[Trip] = []
        self.inter_agent = True
        """Whether the message is agents talking to each other (counts towards chatter)."""
        self.done = False
        """Nothing after the type's own fold (a task that ended, a usage record seen before)."""

    def trip(self, kind: str, reason: str, action: str = "cancel", members: tuple[str, ...] = ()) -> None:
        if kind not in self.w.tripped:
            self.w.tripped.add(kind)
            self.w.trip_reasons[kind] = reason
            self.trips.append(Trip(kind, self.w.tenant, self.w.task_id, reason, action, members, self.at))


class TenantCounts(TypedDict):
    """One tenant's tasks not ended (``Monitor.per_tenant``; the fields of ``TenantTasks``)."""

    running: int
    queued: int
    queued_s: float


class Monitor:
    def __init__(self, rules: Rules | None = None) -> None:
        self.rules = rules or Rules()
        self.tasks: dict[tuple[str, str], TaskWatch] = {}
        self._handlers: dict[str, Callable[[mesh_facts.Facts, _Fold], None]] = {}

    def watch(self, tenant: str, task_id: str) -> TaskWatch:
        key = (tenant, task_id)
        if key not in self.tasks:
            self.tasks[key] = TaskWatch(tenant, task_id)
        return self.tasks[key]

    # --- folding messages -----------------------------------------------------------------------

    def observe(self, m: Contract | Seen, at: float) -> list[Trip]:
        """Fold one message (stored at ``at``) in; return what tripped because of it."""
        seen = m if isinstance(m, Seen) else Seen.of(m)
        w = self.watch(seen.tenant, seen.task_id)
        if w.terminal:
            if not (w.refused and seen.type == "task.submitted"):
                return []
            # Refused, then submitted again under the same id (a client resubmitting after its
            # retry-after): this submission may be admitted, and then the task runs. Watch it
            # from here as a new task (deadline, stall, breakers); refused again, it ends again.
            w = self.tasks[(seen.tenant, seen.task_id)] = TaskWatch(seen.tenant, seen.task_id)
        o = _Fold(w, at)
        w.last_progress = max(w.last_progress, at)
        handler = self._handler(seen.type)
        if handler is not None:
            handler(seen.facts, o)
        step = seen.facts.get("step", "")
        if step and seen.type != "step.requested":
            w.waiting.discard(step)  # the step's first call (or its end): it was taken up
        if seen.type != "task.submitted":
            w.waiting.discard("plan")  # anything else about the task: the planner took it up
        self._queue_state(w, at)
        if not o.done:
            self._after(seen.type, o)
        return o.trips

    def started(self, tenant: str, task_id: str, step_id: str, at: float) -> None:
        """A call of the task's step is being made (a reservation reached this replica): the
        step left its queue, and starting it is progress."""
        w = self.tasks.get((tenant, task_id))
        if w is None or w.terminal:
            return
        w.waiting.discard(step_id or "plan")
        w.last_progress = max(w.last_progress, at)
        self._queue_state(w, at)

    def queued(self, w: TaskWatch) -> bool:
        """Everything the task has outstanding waits in a queue (nothing is being worked on)."""
        if not w.waiting or w.terminal:
            return False
        running = [s for s, st in w.step_status.items() if st == "dispatched" and s not in w.waiting]
        return not running

    def _queue_state(self, w: TaskWatch, at: float) -> None:
        now_queued = self.queued(w)
        if now_queued and w.queued_since is None:
            w.queued_since = at
        elif not now_queued and w.queued_since is not None:
            w.queue_s += max(0.0, at - w.queued_since)
            w.queued_since = None
            w.last_progress = max(w.last_progress, at)  # leaving the queue restarts the stall clock

    def _handler(self, kind: str) -> Callable[[mesh_facts.Facts, _Fold], None] | None:
        """The fold for a message type (its ``type``, whatever its version); None: no state."""
        if not self._handlers:
            self._handlers = {
                "task.submitted": self._submitted,
                "task.completed": self._ended,
                "task.failed": self._ended,
                "task.rejected": self._rejected,
                "plan.created": self._planned,
                "step.requested": self._step_requested,
                "step.completed": self._step_completed,
                "step.failed": self._step_failed,
                "tool.requested": self._call_requested,
                "retrieval.requested": self._call_requested,
                "tool.completed": self._call_completed,
                "retrieval.completed": self._call_completed,
                "check.requested": self._check_requested,
                "approval.requested": self._approval_requested,
                "approval.decided": self._approval_decided,
                "plan.drafted": self._approval_requested,  # a plan waiting for review: a person's wait
                "plan.reviewed": self._approval_decided,
                "wait.started": self._approval_requested,  # a workflow's timer, signal or retry backoff
                "wait.ended": self._approval_decided,
                "control.halt": self._halted,
                "control.resume": self._resumed,
                "control.cancel": self._control,
                "usage.recorded": self._usage,
            }
        return self._handlers.get(kind)

    # --- one fold per message type (from its facts; one without them folds what it can) ----

    def _submitted(self, f: mesh_facts.Facts, o: _Fold) -> None:
        w = o.w
        o.inter_agent = False  # a client talking to the mesh (maybe resubmitting), not agents chattering
        w.created_at = o.at if w.created_at is None else w.created_at
        try:
            limits = TaskLimits.model_validate(f.get("limits") or {})
        except ValidationError:
            limits = TaskLimits()
        w.deadline_s, w.stall_timeout_s = limits.deadline_s, limits.stall_timeout_s
        w.max_queue_s = limits.max_queue_s
        w.stall_policy = limits.stall_policy
        if isinstance(labels := f.get("labels"), dict):
            w.labels = {str(k): str(v) for k, v in labels.items()}
        if not w.step_status:
            w.waiting.add("plan")  # until the planner takes it up

    def _ended(self, f: mesh_facts.Facts, o: _Fold) -> None:
        o.w.terminal, o.done = True, True
        o.w.shrink()

    def _rejected(self, f: mesh_facts.Facts, o: _Fold) -> None:
        self._ended(f, o)
        o.w.refused = True

    def _planned(self, f: mesh_facts.Facts, o: _Fold) -> None:
        for sid, deps in f.get("steps", ()):
            o.w.deps[sid] = tuple(deps)
            o.w.step_status.setdefault(sid, "pending")

    def _step_requested(self, f: mesh_facts.Facts, o: _Fold) -> None:
        w, sid = o.w, f.get("step", "")
        if not sid:
            return
        attempt = f.get("attempt", FIRST_ATTEMPT)
        if attempt >= w.step_attempt.get(sid, 0):
            w.step_attempt[sid] = attempt
            if w.step_status.get(sid) not in ("completed",):
                w.step_status[sid] = "dispatched"
                w.waiting.add(sid)  # until a worker takes it up
        w.step_cap[sid] = self.rules.iteration_cap or f.get("max_iterations", MAX_ITERATIONS)
        # A workflow node's retry policy re-dispatches the same step by design: its tries are no loop.
        repeats = max(self.rules.loop_repeats, int(f.get("tries", 1)) + 1)
        if "sig" in f and (n := self._seen(w, "step", sid, f["sig"])) >= repeats:
            o.trip("loop", f"loop: step {sid} dispatched {n} times with the same instruction and inputs",
                   members=(f"step:{sid}",))  # fmt: skip

    def _step_completed(self, f: mesh_facts.Facts, o: _Fold) -> None:
        if step := f.get("step", ""):
            o.w.step_status[step] = "completed"
        o.w.completions.append(o.at)

    def _step_failed(self, f: mesh_facts.Facts, o: _Fold) -> None:
        halted = bool(f.get("halted", False))
        if step := f.get("step", ""):
            o.w.step_status[step] = "halted" if halted else "failed"
        if not halted:
            o.w.errors.append(o.at)

    def _call_requested(self, f: mesh_facts.Facts, o: _Fold) -> None:
        w, call, step = o.w, f.get("call", ""), f.get("step", "")
        tool = f.get("tool", "search_docs")
        if call and call not in w.done_calls:
            w.calls[call] = (step, tool, f.get("await", ""))
        if "sig" in f and (n := self._seen(w, "call", step, f["sig"])) >= self.rules.loop_repeats:
            o.trip("loop", f"loop: step {step} called {tool} with the same arguments {n} times",
                   members=(f"step:{step}",))  # fmt: skip

    def _call_completed(self, f: mesh_facts.Facts, o: _Fold) -> None:
        w, call, approval = o.w, f.get("call", ""), f.get("approval", "")
        w.done_calls.add(call)
        w.calls.pop(call, None)
        if not f.get("ok", True) and not approval:
            w.errors.append(o.at)  # a denied or expired approval is a decision, not a failing tool
        if approval:
            # The wait is over however it ended (approved, denied, or expired: an expiry has no
            # approval.decided, only the tool-executor's answer).
            self._approval_over(w, approval, o.at)

    def _check_requested(self, f: mesh_facts.Facts, o: _Fold) -> None:
        if "sig" in f and (n := self._seen(o.w, "check", f["sig"])) >= self.rules.loop_repeats:
            o.trip("loop", f"loop: the same answer went to the checker {n} times (planner and checker ping-pong)",
                   members=("planner", "checker"))  # fmt: skip

    def _approval_requested(self, f: mesh_facts.Facts, o: _Fold) -> None:
        if approval := f.get("approval", ""):
            o.w.approvals[approval] = o.at
            o.w.approval_of[approval] = f.get("step", "") or "-"

    def _approval_decided(self, f: mesh_facts.Facts, o: _Fold) -> None:
        self._approval_over(o.w, f.get("approval", ""), o.at)

    def _control(self, f: mesh_facts.Facts, o: _Fold) -> None:
        o.inter_agent = False

    def _halted(self, f: mesh_facts.Facts, o: _Fold) -> None:
        o.inter_agent, o.w.halted = False, True

    def _resumed(self, f: mesh_facts.Facts, o: _Fold) -> None:
        o.inter_agent, o.w.halted = False, False

    def _usage(self, f: mesh_facts.Facts, o: _Fold) -> None:
        w, call, step = o.w, f.get("call", ""), f.get("step", "")
        o.inter_agent = False
        if call in w.seen_usage:
            o.done = True
            return
        w.seen_usage.add(call)
        # A failed attempt the gateway retried or handed to a fallback model is not a failure
        # of the task's work; one that reached the task counts once per logical call.
        logical = call.split("-x", 1)[0]
        if f.get("error") and not f.get("handed_on") and logical not in w.failed_calls:
            w.failed_calls.add(logical)
            w.errors.append(o.at)
            return
        attempt = _attempt_of(call) or w.step_attempt.get(step, 1)
        calls = w.llm_calls[(step, attempt)] = w.llm_calls[(step, attempt)] + 1
        cap = w.step_cap.get(step, 0)
        if cap and calls > cap:
            o.trip("iteration_cap", f"iteration cap: step {step} made {calls} model calls in attempt "
                   f"{attempt}, cap {cap}", members=(f"step:{step}",))  # fmt: skip

    def _after(self, kind: str, o: _Fold) -> None:
        """What every folded message may trip: chatter, a retry storm, a deadlock."""
        w, r = o.w, self.rules
        if o.inter_agent:
            w.chatter.append(o.at)
        self._slide(w, o.at)
        if o.inter_agent and len(w.chatter) >= r.chatter_min_messages:
            ratio = len(w.chatter) / max(1, len(w.completions))
            if ratio > r.chatter_ratio:
                o.trip("chatter", f"chatter: {len(w.chatter)} inter-agent messages for {len(w.completions)} "
                       f"completed step(s) in {r.chatter_window_s:g} s (limit {r.chatter_ratio:g} per step)")  # fmt: skip
        if len(w.errors) >= r.retry_storm_errors:
            o.trip("retry_storm", f"retry storm: {len(w.errors)} failed calls or steps in "
                   f"{r.retry_storm_window_s:g} s", action="halt")  # fmt: skip
        if kind in DEADLOCK_CHECKED and (cyc := w.cycle()):
            text = ", ".join(f"{a} waits on {b} ({why})" for a, b, why in cyc)
            o.trip("deadlock", f"deadlock: {text}", members=tuple(a for a, _, _ in cyc))

    @staticmethod
    def _seen(w: TaskWatch, *signature: Any) -> int:
        """How often this signature (a step, a call, an answer) has been seen in the task, now included."""
        sig = _digest(*signature)
        w.signatures[sig] += 1
        return w.signatures[sig]

    @staticmethod
    def _approval_over(w: TaskWatch, approval_id: str, at: float) -> None:
        started = w.approvals.pop(approval_id, None)
        if started is not None:
            w.approval_paused_s += max(0.0, at - started)

    def _slide(self, w: TaskWatch, now: float) -> None:
        r = self.rules
        for q, span in ((w.chatter, r.chatter_window_s), (w.completions, r.chatter_window_s),
                        (w.errors, r.retry_storm_window_s)):  # fmt: skip
            while q and q[0] < now - span:
                q.popleft()

    # --- the clock ------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Trip]:
        """Time-based rules: deadline and stall."""
        trips = []
        for w in self.tasks.values():
            if w.terminal or w.created_at is None:
                continue
            if w.deadline_s and now > w.created_at + w.deadline_s and "deadline" not in w.tripped:
                w.tripped.add("deadline")
                trips.append(Trip("deadline", w.tenant, w.task_id,
                                  f"deadline: {w.deadline_s:g} s since submission have passed", closed_at=now))  # fmt: skip
                continue
            if w.halted or w.approvals or not w.stall_timeout_s or "stall" in w.tripped:
                continue  # a halted task or one waiting for a human is not stalled
            if w.queued_since is not None:
                queued = w.queue_s + max(0.0, now - w.queued_since)
                if w.max_queue_s and queued > w.max_queue_s and "queue" not in w.tripped:
                    w.tripped.add("queue")
                    trips.append(Trip("queue", w.tenant, w.task_id,
                                      f"queued too long: {queued:.1f} s waiting to be taken up "
                                      f"(max_queue_s {w.max_queue_s:g})", closed_at=now))  # fmt: skip
                continue  # waiting in a queue is queue time, not a stall
            idle = now - w.last_progress
            if idle > w.stall_timeout_s:
                w.tripped.add("stall")
                trips.append(Trip("stall", w.tenant, w.task_id,
                                  f"stalled: no progress for {idle:.1f} s (stall timeout {w.stall_timeout_s:g} s)",
                                  action=w.stall_policy, closed_at=now))  # fmt: skip
        return trips

    def per_tenant(self, now: float) -> dict[str, TenantCounts]:
        """Per tenant, the tasks not ended this replica follows: ``running`` (some work taken
        up), ``queued`` (everything outstanding waits to be taken up), and ``queued_s`` (the
        queue time of those tasks so far, open spells included)."""
        out: dict[str, TenantCounts] = {}
        for w in self.tasks.values():
            if w.terminal or w.created_at is None:
                continue
            t = out.setdefault(w.tenant, {"running": 0, "queued": 0, "queued_s": 0.0})
            if w.queued_since is not None:
                t["queued"] += 1
                t["queued_s"] += w.queue_s + max(0.0, now - w.queued_since)
            else:
                t["running"] += 1
                t["queued_s"] += w.queue_s
        return {k: {**v, "queued_s": round(v["queued_s"], 3)} for k, v in sorted(out.items())}

    def forget(self, older_than: float) -> None:
        """Drop finished tasks' state (bounded memory)."""
        for key in [k for k, w in self.tasks.items() if (w.terminal and w.last_progress < older_than)]:
            del self.tasks[key]


def _attempt_of(call_id: str) -> int:
    for part in call_id.split("-"):
        if part.startswith("a") and part[1:].isdigit():
            return int(part[1:])
    return 0
