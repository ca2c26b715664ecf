"""A tenant's releases of behaviour (issue 41): versions, the channel, the canary and its test.

People change a tenant's releases with signed ``release.change`` messages handed in at the
tenant's door; the planner applies them here:

- ``draft`` (an author: ``author.<tenant>.<person>``): the bundle is validated strictly
  (``ReleaseBundle``: known prompt ids, route keys; routes the planner's model gateway does not
  have are refused), its version is its digest, its record is created, never overwritten.
- ``evaluated`` (an author): the result of ``meshctl release eval`` (the golden set through the
  real mesh with the version pinned, compared with the current version's evaluation) is added
  to the version's record. The gate reads the latest one.
- ``canary`` (an approver: ``approver.<tenant>.<person>``): the version serves ``share`` of the
  tenant's new tasks, chosen by a hash of the task id (sticky: a redelivered submission picks the
  same), until its sequential test or a person decides. Refused when its latest evaluation did not
  pass, or it has none, unless forced (with a reason, on the chain).
- ``promote`` (an approver): the version is current: every new task runs it. The same gate.
- ``rollback`` (an approver): the canary ends, or (no canary) the current version goes back to
  the one before it. No new task runs the version rolled back; running tasks finish on theirs.

**The canary's test** is Wald's sequential probability ratio test on whether a task went badly
(``bad``: it did not complete, the checker rejected an answer of it, a tool call of it was
refused (the policy, an approver, the release's tool rules), or it cost more than
``max_cost_ratio`` times the current version's mean). H0: the candidate's bad rate is the current
version's, ``p0``; H1: it is ``p1 = p0 + min_effect``. Each canary task adds
``log(p1/p0)`` (bad) or ``log((1-p1)/(1-p0))`` (good) to the log-likelihood ratio; at
``log((1-beta)/alpha)`` the canary is rolled back, at ``log(beta/(1-alpha))`` promoted. Wald's
bounds: P(rollback | H0) <= alpha, P(promote | H1) <= beta, with no fixed sample size. ``p0`` is
estimated: the current version's evaluated bad rate as a prior worth ``PRIOR_WEIGHT`` tasks, updated
by the current version's own tasks during the canary (so both versions see the same load); with
an estimated ``p0`` the error rates are approximate, not exact.

Tasks are observed when they end (``observe``, from the transition that ended them): once each
(the channel keeps the last task ids it counted). A crash between the end's write and the
observation loses that one observation: the test waits for one more task.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from mesh_contracts.base import ADMIN, APPROVER, AUTHOR
from mesh_contracts.v1.records import (
    ArmStats,
    ReleaseChannel,
    ReleaseEvent,
    ReleaseVersion,
    TaskRecord,
    TrailPoint,
)
from mesh_contracts.v1.release import GLOBAL, CanaryTest, ReleaseBundle, ReleaseChange, ReleaseChanged
from mesh_guardrails.injection import UNTRUSTED_NOTICE
from mesh_identity import Principal, TrustBundle
from mesh_kit import state as st
from mesh_planner.errors import PlannerError

RIGHTS = {"draft": AUTHOR, "evaluated": AUTHOR, "canary": APPROVER, "promote": APPROVER, "rollback": APPROVER}
"""Who may make each change: a tenant's author drafts and evaluates, one of its approvers decides."""
PRIOR_WEIGHT = 20
SEEN_KEPT = 512
TRAIL_KEPT = 2000
HISTORY_KEPT = 200
LATENCIES_KEPT = 200
DECIDED_BY_TEST = "sequential-test"


class Refused(PlannerError):
    """A release change (or a pinned release of a submission) the registry will not take."""


def may_change(bundle: TrustBundle, sender: Principal, tenant: str, action: str) -> str | None:
    """Why ``sender`` may not make ``action`` to ``tenant``'s releases under ``bundle``, or None.
    The mesh's default (``GLOBAL``) is the operators' (the admin identity's) alone."""
    now = bundle.principals.get(sender.name)
    if tenant == GLOBAL or (now is not None and now.role == ADMIN):
        if now is None or now.role != ADMIN or tenant != GLOBAL:
            return (f"{sender.name} may not {action} the mesh's default release: that is the operators' right (admin)"
                    if tenant == GLOBAL else f"{sender.name} changes the mesh's default release ({GLOBAL}), not {tenant}'s")  # fmt: skip
        return "a canary runs in a tenant: canary the version there (the mesh's default changes by promotion)" if (
            action == "canary") else None  # fmt: skip
    role = RIGHTS.get(action, "")
    if now is None or now.role != role:
        who = "an author (author.<tenant>.<person>)" if role == AUTHOR else "an approver (approver.<tenant>.<person>)"
        return (
            f"{sender.name} may not {action} a release: that is {who}'s right (trust bundle revision {bundle.revision})"
        )
    if now.tenant != tenant:
        return f"{sender.name} acts for tenant {now.tenant!r}, not {tenant!r}"
    return None


# --- choosing a task's version --------------------------------------------------------------------


def share_point(tenant: str, task_id: str) -> float:
    """Where a task falls in [0, 1): a canary of share s serves the tasks below s (sticky per task)."""
    digest = hashlib.sha256(f"{tenant}/{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick(ch: ReleaseChannel | None, task_id: str, default: str = "") -> str:
    """The version a new task runs: the canary for a task under its share, else the tenant's current
    release, else ``default`` (the mesh's current one)."""
    if ch is None:
        return default
    if ch.canary and ch.share > 0 and share_point(ch.tenant, task_id) < ch.share:
        return ch.canary
    return ch.current or default


# --- the sequential test ------------------------------------------------------------------------


def p0_of(ch: ReleaseChannel, t: CanaryTest) -> float:
    """The current version's bad rate: its evaluated rate as a prior, updated by its tasks so far."""
    cur = ch.arms.get(ch.against, ArmStats())
    p = (t.baseline_bad * PRIOR_WEIGHT + cur.bad) / (PRIOR_WEIGHT + cur.tasks)
    return min(max(p, 0.01), 0.98 - t.min_effect)


def step(bad: bool, p0: float, p1: float) -> float:
    return math.log(p1 / p0) if bad else math.log((1 - p1) / (1 - p0))


def expected_tasks(t: CanaryTest, p: float, p0: float | None = None) -> float:
    """Wald's approximation of the canary tasks the test takes to decide when the candidate's
    true bad rate is ``p`` (``p0``: the current version's, default ``baseline_bad``)."""
    p0 = min(max(t.baseline_bad if p0 is None else p0, 0.01), 0.98 - t.min_effect)
    p1 = p0 + t.min_effect
    lower, upper = t.boundaries()
    drift = p * step(True, p0, p1) + (1 - p) * step(False, p0, p1)
    if abs(drift) < 1e-12:
        return -lower * upper / (step(True, p0, p1) * -step(False, p0, p1))
    # P(rollback) by Wald's identity, for the two boundaries
    h = _h(t, p, p0, p1)
    rollback = (1 - math.exp(h * lower)) / (math.exp(h * upper) - math.exp(h * lower)) if h else 0.5
    return (rollback * upper + (1 - rollback) * lower) / drift


def _h(t: CanaryTest, p: float, p0: float, p1: float) -> float:
    """The non-zero root h of p (p1/p0)^h + (1-p) ((1-p1)/(1-p0))^h = 1 (bisection)."""
    a, b = p1 / p0, (1 - p1) / (1 - p0)

    def f(h: float) -> float:
        value: float = p * a**h + (1 - p) * b**h - 1  # a, b > 0: a real power (typeshed says Any)
        return value

    lo, hi = (1e-6, 50.0) if p * math.log(a) + (1 - p) * math.log(b) < 0 else (-50.0, -1e-6)
    if f(lo) * f(hi) > 0:
        return 0.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if f(lo) * f(mid) <= 0:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class Outcome:
    """What one ended task tells the canary."""

    version: str
    completed: bool
    checks_passed: bool
    judge: float | None
    cost_usd: float
    latency_s: float
    tool_denials: int = 0

    @staticmethod
    def of(rec: TaskRecord) -> Outcome:
        return Outcome(
            version=rec.release,
            completed=rec.status == "completed",
            checks_passed=rec.status == "completed" and rec.check_attempt <= 1,
            judge=rec.judge_score,
            cost_usd=rec.total_usage().cost_usd,
            latency_s=max(0.0, (rec.finished_at or time.time()) - rec.created_at),
            tool_denials=sum(s.tool_denials for s in rec.steps.values()),
        )

    def bad(self, mean_cost_now: float, t: CanaryTest) -> bool:
        over = mean_cost_now > 0 and self.cost_usd > t.max_cost_ratio * mean_cost_now
        return not self.completed or not self.checks_passed or self.tool_denials > 0 or over


def _add(arm: ArmStats, o: Outcome, bad: bool) -> None:
    arm.tasks += 1
    arm.bad += int(bad)
    arm.checks_passed += int(o.checks_passed)
    if o.judge is not None:
        arm.judge_sum += o.judge
        arm.judge_n += 1
    arm.cost_usd += o.cost_usd
    arm.tool_denials += o.tool_denials
    arm.latencies = [*arm.latencies, round(o.latency_s, 4)][-LATENCIES_KEPT:]


# --- the registry -------------------------------------------------------------------------------


class Releases:
    def __init__(self, kv: Any, routes: frozenset[str] | None = None, view: Any = None) -> None:
        self.kv = kv
        self.routes = routes
        """The model gateway's routes (a bundle naming another is refused); None: not checked."""
        self.view = view
        """A ``mesh_durable.view.KeyView`` of the bucket: the channels as stored, kept current from the
        bucket's feed (a rollback another replica wrote is seen within milliseconds), so choosing
        a new task's version reads nothing most of the time. None: read the bucket each time."""

    async def channel(self, tenant: str) -> ReleaseChannel | None:
        """The tenant's channel as stored now (from the view when there is one)."""
        if self.view is None:
            rec, _ = await st.load(self.kv, ReleaseChannel.key(tenant), ReleaseChannel)
            return rec
        raw = await self.view.get(ReleaseChannel.key(tenant))
        return ReleaseChannel.model_validate_json(raw) if raw else None

    async def version(self, tenant: str, version: str) -> ReleaseVersion | None:
        """A version of the tenant's, or of the mesh's default releases (which every tenant may run)."""
        rec, _ = await st.load(self.kv, ReleaseVersion.key(tenant, version), ReleaseVersion)
        if rec is None and tenant != GLOBAL:
            rec, _ = await st.load(self.kv, ReleaseVersion.key(GLOBAL, version), ReleaseVersion)
        return rec

    async def current(self, tenant: str, ch: ReleaseChannel | None = None) -> str:
        """What the tenant's tasks run outside a canary: its own current release, else the mesh's."""
        ch = ch if ch is not None else await self.channel(tenant)
        if ch is not None and ch.current:
            return ch.current
        mesh = await self.channel(GLOBAL) if tenant != GLOBAL else None
        return mesh.current if mesh is not None else ""

    async def choose(self, tenant: str, task_id: str, pinned: str = "") -> tuple[str, str]:
        """The version a new task runs and why: the one its submission pins (a drafted version of
        its tenant's or of the mesh's: ``meshctl release eval``), else the channel's pick (canary,
        the tenant's current release, or the mesh's default)."""
        if pinned:
            if await self.version(tenant, pinned) is None:
                raise Refused(f"tenant {tenant} has no release {pinned} (meshctl release list)")
            return pinned, "pinned by its submission"
        ch = await self.channel(tenant)
        version = pick(ch, task_id, await self.current(tenant, ch))
        if ch is not None and ch.canary and version == ch.canary:
            return version, f"the tenant's canary, {ch.share:.0%} of new tasks"
        if ch is not None and ch.current:
            return version, "the tenant's current release"
        return version, ("the mesh's default release" if version else "the packaged behaviour")

    # --- changes ---------------------------------------------------------------------------------

    async def apply(self, m: ReleaseChange, change_id: str) -> tuple[ReleaseChanged, list[ReleaseEvent]]:
        """Apply a person's change (their right already judged): the answer, and the decisions it
        made (a rollback or promotion of a canary) to announce. ``Refused`` says why not."""
        if m.action == "draft":
            return await self._draft(m, change_id), []
        if not m.version and m.action != "rollback":
            raise Refused(f"{m.action} names a version (meshctl release list)")
        if m.action == "evaluated":
            return await self._evaluated(m, change_id), []
        return await self._steer(m, change_id)

    async def _draft(self, m: ReleaseChange, change_id: str) -> ReleaseChanged:
        if m.bundle is None:
            raise Refused("draft needs a bundle")
        try:
            bundle = ReleaseBundle.model_validate(m.bundle)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'bundle'}: {e['msg']}" for e in exc.errors())
            raise Refused(f"not a valid release bundle: {problems}"[:1500]) from None
        system = bundle.prompts.get("worker.system")
        if system is not None and UNTRUSTED_NOTICE not in system.text:
            raise Refused(
                "prompt worker.system: it must keep the notice on untrusted blocks, verbatim (the model is told "
                f"that delimited content is data): {UNTRUSTED_NOTICE!r}"
            )
        if self.routes is not None:
            unknown = sorted({r for r in bundle.routes.values() if r not in self.routes})
            if unknown:
                raise Refused(f"routes {unknown} are not in the mesh's model config (it has {sorted(self.routes)})")
        version = bundle.digest()
        if m.version and m.version != version:
            raise Refused(f"the bundle's version here is {version}, the author computed {m.version}")
        now = time.time()
        event = ReleaseEvent(action="draft", version=version, by=m.by, at=now, reason=m.reason, change_id=change_id)

        def create(rec: ReleaseVersion | None) -> ReleaseVersion | None:
            if rec is not None:
                return None  # the same bundle, drafted before: a version cannot change
            return ReleaseVersion(tenant=m.tenant, version=version, bundle=bundle.canonical(), drafted_by=m.by,
                                  drafted_at=now, history=[event])  # fmt: skip

        _, created = await st.update(self.kv, ReleaseVersion.key(m.tenant, version), ReleaseVersion, create)

        def listed(ch: ReleaseChannel | None) -> ReleaseChannel | None:
            ch = ch or ReleaseChannel(tenant=m.tenant)
            if version in ch.versions:
                return None
            ch.versions = [*ch.versions, version]
            return ch

        ch, _ = await st.update(self.kv, ReleaseChannel.key(m.tenant), ReleaseChannel, listed)
        ch = ch or ReleaseChannel(tenant=m.tenant)
        return self._answer(m, version, ch, changed=created, current=await self.current(m.tenant, ch))

    async def _evaluated(self, m: ReleaseChange, change_id: str) -> ReleaseChanged:
        if m.evaluation is None:
            raise Refused("evaluated needs the evaluation (meshctl release eval records it)")
        event = ReleaseEvent(action="evaluated", version=m.version, by=m.by, at=time.time(),
                             reason=f"{m.evaluation.verdict}: {m.evaluation.passed}/{m.evaluation.cases} cases passed",
                             change_id=change_id)  # fmt: skip

        def add(rec: ReleaseVersion | None) -> ReleaseVersion | None:
            if rec is None:
                raise Refused(f"tenant {m.tenant} has no release {m.version}")
            if change_id in {e.change_id for e in rec.history}:
                return None
            kept = [e.model_copy(update={"report": {}}) for e in rec.evaluations[-9:]]  # reports: the latest only
            rec.evaluations = [*kept, m.evaluation]  # type: ignore[list-item]
            rec.history = [*rec.history, event][-HISTORY_KEPT:]
            return rec

        _, changed = await st.update(self.kv, ReleaseVersion.key(m.tenant, m.version), ReleaseVersion, add)
        ch = await self.channel(m.tenant) or ReleaseChannel(tenant=m.tenant)
        return self._answer(m, m.version, ch, changed=changed, current=await self.current(m.tenant, ch))

    async def _gate(self, m: ReleaseChange) -> bool:
        """Whether the version's latest evaluation passed; ``Refused`` (unless forced) if not."""
        rec = await self.version(m.tenant, m.version)
        if rec is None:
            raise Refused(f"tenant {m.tenant} has no release {m.version} (meshctl release list)")
        ev = rec.evaluation()
        if ev is not None and ev.verdict == "pass":
            return False
        if ev is not None:
            said = "; ".join(ev.regressions[:3]) + (
                f"; and {len(ev.regressions) - 3} more" if len(ev.regressions) > 3 else ""
            )
            names = [f.split(":", 1)[0] for f in ev.failing]
            cases = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            why = (f"its evaluation failed ({said or 'regressions'}; failing cases: {cases or 'none listed'}; "
                   f"meshctl release show {m.version} --tenant {m.tenant})")  # fmt: skip
        else:
            why = "it has no evaluation (meshctl release eval)"
        if not m.force:
            raise Refused(f"release {m.version} may not {m.action}: {why}; --force with a --reason overrides")
        if not m.reason.strip():
            raise Refused(f"a forced {m.action} says why (--reason): {why}")
        return True

    async def _steer(self, m: ReleaseChange, change_id: str) -> tuple[ReleaseChanged, list[ReleaseEvent]]:
        forced = False
        if m.action in ("canary", "promote"):
            forced = await self._gate(m)
        if m.action == "canary" and not 0 < m.share < 1:
            raise Refused("a canary serves a share of new tasks between 0 and 1 (exclusive): --share 0.1")
        now = time.time()
        decided: list[ReleaseEvent] = []
        baseline = await self._current_bad(m.tenant) if m.action == "canary" else 0.05
        against = await self.current(m.tenant) if m.action == "canary" else ""

        def change(ch: ReleaseChannel | None) -> ReleaseChannel | None:
            decided.clear()
            ch = ch or ReleaseChannel(tenant=m.tenant)
            if change_id in {e.change_id for e in ch.history}:
                return None  # applied before (a redelivery)
            event = ReleaseEvent(action=m.action, version=m.version, by=m.by, at=now, reason=m.reason,
                                 change_id=change_id, forced=forced)  # fmt: skip
            if m.action == "canary":
                if m.version == against:
                    raise Refused(f"release {m.version} is what the tenant's tasks run already")
                if ch.canary and ch.canary != m.version:
                    raise Refused(f"release {ch.canary} is in canary: promote or roll it back first")
                test = m.test or CanaryTest()
                if "baseline_bad" not in (m.test.model_fields_set if m.test else set()):
                    test = test.model_copy(update={"baseline_bad": baseline})
                ch.canary, ch.share, ch.canary_since, ch.canary_by, ch.test = m.version, m.share, now, m.by, test
                ch.against = against
                ch.llr, ch.arms, ch.trail, ch.seen = 0.0, {}, [], []
            elif m.action == "promote":
                if ch.canary and ch.canary != m.version:
                    raise Refused(f"release {ch.canary} is in canary: promote or roll it back first")
                if ch.canary == m.version:
                    decided.append(_decision(ch, "promoted", m.by, m.reason or "promoted by an approver", now))
                if m.version != ch.current:
                    ch.before = [*ch.before, ch.current][-HISTORY_KEPT:]
                ch.current, ch.canary, ch.share = m.version, "", 0.0
            else:  # rollback
                if ch.canary and (not m.version or m.version == ch.canary):
                    event.version = ch.canary
                    decided.append(_decision(ch, "rolled_back", m.by, m.reason or "rolled back by an approver", now))
                    ch.canary, ch.share = "", 0.0
                elif not m.version or m.version == ch.current:
                    if not ch.current:
                        raise Refused(
                            "nothing to roll back: no canary, and no current release of the tenant's own (it "
                            "runs the mesh's default, or the packaged behaviour)"
                        )
                    event.version = ch.current
                    ch.current, ch.before = (ch.before[-1], ch.before[:-1]) if ch.before else ("", [])
                else:
                    raise Refused(f"release {m.version} is neither in canary nor current")
            ch.history = [*ch.history, event][-HISTORY_KEPT:]
            ch.unannounced = [*ch.unannounced, *decided]
            return ch

        ch, changed = await st.update(self.kv, ReleaseChannel.key(m.tenant), ReleaseChannel, change)
        ch = ch or ReleaseChannel(tenant=m.tenant)
        if not changed:  # applied before: the version it changed is in its event
            done = next((e for e in ch.history if e.change_id == change_id), None)
            changed_version = done.version if done is not None else m.version
        else:
            changed_version = ch.history[-1].version
        return self._answer(m, changed_version, ch, changed=changed, current=await self.current(m.tenant, ch)), (
            list(decided) if changed else []
        )

    async def _current_bad(self, tenant: str) -> float:
        """The current version's bad rate by its latest evaluation (the canary's prior), else 0.05."""
        cur = await self.current(tenant)
        rec = await self.version(tenant, cur) if cur else None
        ev = rec.evaluation() if rec is not None else None
        if ev is None or not ev.cases:
            return 0.05
        return min(max(1 - ev.passed / ev.cases, 0.01), 0.5)

    @staticmethod
    def _answer(m: ReleaseChange, version: str, ch: ReleaseChannel, *, changed: bool, current: str) -> ReleaseChanged:
        """``current``: what the tenant's tasks run now (its own release, else the mesh's)."""
        return ReleaseChanged(tenant=m.tenant, task_id=m.task_id, action=m.action, version=version, accepted=True,
                              changed=changed, current=current, canary=ch.canary, share=ch.share)  # fmt: skip

    # --- observations ------------------------------------------------------------------------------

    async def observe(self, rec: TaskRecord) -> list[ReleaseEvent]:
        """Count an ended task of a tenant with a canary running; decide the canary when its test
        crosses a boundary. The decisions to announce (with those a crash left unannounced)."""
        if rec.status == "cancelled":
            return []  # a person's decision, not the release's doing
        seen = await self.channel(rec.tenant)
        if seen is None or not (seen.canary or seen.unannounced):
            return []  # no canary: nothing to count (the common case: no write, and from the view no read)
        outcome = Outcome.of(rec)
        decided: list[ReleaseEvent] = []

        def count(ch: ReleaseChannel | None) -> ReleaseChannel | None:
            decided.clear()
            if ch is None or not ch.canary or rec.task_id in ch.seen:
                return None
            if outcome.version not in (ch.canary, ch.against) or rec.created_at < ch.canary_since:
                return None  # a pinned evaluation task, or one admitted before this canary
            t = ch.test or CanaryTest()
            cur = ch.arms.get(ch.against, ArmStats())
            bad = outcome.bad(cur.mean_cost() if cur.tasks >= 5 else 0.0, t)
            arm = ch.arms.get(outcome.version, ArmStats()).model_copy(deep=True)
            _add(arm, outcome, bad)
            ch.arms = {**ch.arms, outcome.version: arm}
            ch.seen = [*ch.seen, rec.task_id][-SEEN_KEPT:]
            if outcome.version == ch.canary:
                p0 = p0_of(ch, t)
                ch.llr += step(bad, p0, min(0.99, p0 + t.min_effect))
            ch.trail = [*ch.trail, TrailPoint(at=time.time(), version=outcome.version, bad=bad, llr=round(ch.llr, 4),
                                              cost_usd=outcome.cost_usd, latency_s=round(outcome.latency_s, 4),
                                              judge=outcome.judge)][-TRAIL_KEPT:]  # fmt: skip
            lower, upper = t.boundaries()
            now = time.time()
            if ch.llr >= upper:
                decided.append(_decision(ch, "rolled_back", DECIDED_BY_TEST, _why(ch, t, "worse"), now))
                ch.canary, ch.share = "", 0.0
            elif ch.llr <= lower:
                decided.append(_decision(ch, "promoted", DECIDED_BY_TEST, _why(ch, t, "no worse"), now))
                ch.before = [*ch.before, ch.current][-HISTORY_KEPT:]
                ch.current, ch.canary, ch.share = ch.canary, "", 0.0
            ch.history = [*ch.history, *decided][-HISTORY_KEPT:]
            ch.unannounced = [*ch.unannounced, *decided]
            return ch

        ch, _ = await st.update(self.kv, ReleaseChannel.key(rec.tenant), ReleaseChannel, count)
        return list(ch.unannounced) if ch is not None else []

    async def announced(self, tenant: str, events: list[ReleaseEvent]) -> None:
        done = {e.change_id for e in events}

        def clear(ch: ReleaseChannel | None) -> ReleaseChannel | None:
            if ch is None or not any(e.change_id in done for e in ch.unannounced):
                return None
            ch.unannounced = [e for e in ch.unannounced if e.change_id not in done]
            return ch

        await st.update(self.kv, ReleaseChannel.key(tenant), ReleaseChannel, clear)


def _decision(ch: ReleaseChannel, decision: str, by: str, reason: str, now: float) -> ReleaseEvent:
    arm = ch.arms.get(ch.canary, ArmStats())
    lower, upper = (ch.test or CanaryTest()).boundaries()
    return ReleaseEvent(
        action=decision, version=ch.canary, by=by, at=now, reason=reason,
        change_id=f"{decision}-{ch.canary}-{int(ch.canary_since * 1000)}",
        tasks=arm.tasks, bad=arm.bad, llr=round(ch.llr, 4), lower=round(lower, 4), upper=round(upper, 4),
        current=ch.canary if decision == "promoted" else (ch.current or ch.against),
    )  # fmt: skip


def _why(ch: ReleaseChannel, t: CanaryTest, verdict: str) -> str:
    arm = ch.arms.get(ch.canary, ArmStats())
    cur = ch.arms.get(ch.against, ArmStats())
    return (
        f"{verdict} than {ch.against or 'the packaged behaviour'}: {arm.bad} of {arm.tasks} canary tasks went badly "
        f"({cur.bad} of {cur.tasks} on the current version); log-likelihood ratio {ch.llr:.2f} "
        f"(boundaries {t.boundaries()[0]:.2f} / {t.boundaries()[1]:.2f}; alpha {t.alpha}, beta {t.beta}, "
        f"effect {t.min_effect})"
    )
