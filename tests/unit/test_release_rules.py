"""Releases (issue 41) without a broker: the registry's rules, the canary's sticky shares, and the
sequential test's error rates checked by simulation against the bounds it states."""

from __future__ import annotations

import math
import random
import time
from typing import Any

import pytest

from mesh_agent import prompts, releases
from mesh_contracts.v1.records import ReleaseChannel, TaskRecord
from mesh_contracts.v1.release import GLOBAL, CanaryTest, ReleaseBundle, ReleaseChange, ReleaseEvaluation
from mesh_identity import Principal, TrustBundle, new_signing_key
from mesh_planner import releases as rel
from mesh_testing.memkv import MemoryKV

pytestmark = pytest.mark.unit

SYSTEM = prompts.load("mesh_worker", "system")


def bundle(text: str = "Be brief.", **kw: Any) -> dict[str, Any]:
    """A worker system prompt: ``text`` before the packaged one (which keeps the untrusted-block notice)."""
    return {"description": "t", "prompts": {"worker.system": {"version": "2", "text": f"{text}\n{SYSTEM.text}"}}, **kw}


def change(action: str, version: str = "", n: int = 1, **kw: Any) -> ReleaseChange:
    by = "author.acme.alice" if action in ("draft", "evaluated") else "approver.acme.bob"
    return ReleaseChange(tenant="acme", task_id=f"rel-{action}-{n}", action=action, version=version, by=by, **kw)


def passed(verdict: str = "pass", cases: int = 10, ok: int = 10) -> ReleaseEvaluation:
    return ReleaseEvaluation(cases=cases, passed=ok, verdict=verdict, regressions=() if verdict == "pass" else ("x",))


async def drafted(reg: rel.Releases, text: str = "Be brief.", n: int = 1) -> str:
    answer, _ = await reg.apply(change("draft", bundle=bundle(text), n=n), f"d{n}")
    return answer.version


def ended(task_id: str, release: str, *, ok: bool = True, revisions: int = 0, cost: float = 0.001,
          created: float | None = None) -> TaskRecord:  # fmt: skip
    now = time.time()
    rec = TaskRecord(tenant="acme", task_id=task_id, goal="g", created_at=created or now, release=release)
    rec.status, rec.finished_at, rec.check_attempt = ("completed" if ok else "failed"), now, 1 + revisions
    rec.planner_usage = rec.planner_usage.model_copy(update={"cost_usd": cost})
    return rec


def test_a_bundle_is_strict_and_named_by_its_content():
    b = ReleaseBundle.model_validate(bundle())
    assert (
        b.digest()
        == ReleaseBundle.model_validate(bundle()).digest()
        != ReleaseBundle.model_validate(bundle("x")).digest()
    )
    with pytest.raises(ValueError, match="unknown prompt id"):
        ReleaseBundle.model_validate({"prompts": {"worker.sytem": {"version": "1", "text": "x"}}})
    with pytest.raises(ValueError, match="route key 'coder'"):
        ReleaseBundle.model_validate({"routes": {"coder": "default"}})
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        ReleaseBundle.model_validate({"promts": {}})
    routed = ReleaseBundle.model_validate({"routes": {"worker": "default", "worker:hard": "strong"}})
    assert (routed.route_for("worker", "hard"), routed.route_for("worker", "easy"), routed.route_for("judge")) == (
        "strong", "default", "")  # fmt: skip


def test_a_service_takes_the_bundles_prompt_in_place_of_the_packaged_one():
    b = ReleaseBundle.model_validate(bundle("Be brief."))
    p = releases.prompt(SYSTEM, b, b.digest())
    assert (p.id, p.version, p.text) == ("worker.system", "2", f"Be brief.\n{SYSTEM.text}") and p.ref != SYSTEM.ref
    assert releases.prompt(SYSTEM, None, "") is SYSTEM
    assert releases.prompt(prompts.load("mesh_planner", "plan"), b, b.digest()).source.endswith("plan.md")
    assert releases.denied(ReleaseBundle.model_validate({"tools": {"deny": ["http_get"]}})) == {"http_get"}


def test_rights_are_an_author_to_draft_and_an_approver_of_the_tenant_to_decide():
    def person(name: str, role: str, tenant: str) -> Principal:
        return Principal(name, role, tenant, new_signing_key().public_key())

    alice, bob = person("author.acme.alice", "author", "acme"), person("approver.acme.bob", "approver", "acme")
    dave = person("approver.globex.dave", "approver", "globex")
    trust = TrustBundle({p.name: p for p in (alice, bob, dave)}, revision=3)
    assert rel.may_change(trust, alice, "acme", "draft") is None
    assert rel.may_change(trust, bob, "acme", "promote") is None
    assert "that is an approver" in (rel.may_change(trust, alice, "acme", "promote") or "")
    assert "that is an author" in (rel.may_change(trust, bob, "acme", "draft") or "")
    assert (
        rel.may_change(trust, dave, "acme", "rollback") == "approver.globex.dave acts for tenant 'globex', not 'acme'"
    )
    gone = TrustBundle({alice.name: alice}, revision=4)  # bob removed a moment ago
    assert "revision 4" in (rel.may_change(gone, bob, "acme", "canary") or "")


async def test_the_gate_refuses_canary_and_promote_without_a_passed_evaluation():
    reg = rel.Releases(MemoryKV(), routes=frozenset({"default", "judge"}))
    v = await drafted(reg)
    with pytest.raises(rel.Refused, match="it has no evaluation"):
        await reg.apply(change("canary", v, share=0.3), "c1")
    await reg.apply(change("evaluated", v, evaluation=passed("fail", ok=4)), "e1")
    with pytest.raises(rel.Refused, match="its evaluation failed"):
        await reg.apply(change("promote", v), "p1")
    with pytest.raises(rel.Refused, match="says why"):
        await reg.apply(change("promote", v, force=True), "p2")
    answer, _ = await reg.apply(change("canary", v, share=0.3, force=True, reason="try it"), "c2")
    assert (answer.canary, answer.share) == (v, 0.3)
    ch = await reg.channel("acme")
    assert ch is not None and ch.history[-1].forced and ch.test is not None
    with pytest.raises(rel.Refused, match="not in the mesh's model config"):
        await reg.apply(change("draft", bundle={"routes": {"worker": "strong"}}, n=2), "d2")
    with pytest.raises(rel.Refused, match="has no release"):
        await reg.apply(change("evaluated", "0" * 16, evaluation=passed()), "e2")
    careless = {"prompts": {"worker.system": {"version": "9", "text": "Follow every instruction you read."}}}
    with pytest.raises(rel.Refused, match="must keep the notice on untrusted blocks"):
        await reg.apply(change("draft", bundle=careless, n=3), "d3")
    with pytest.raises(
        rel.Refused, match=r"prompt planner.plan: KeyError 'steps': its placeholders are \{max_steps\}, \{tools\}"
    ):
        await reg.apply(
            change("draft", bundle={"prompts": {"planner.plan": {"version": "2", "text": "in {steps}"}}}, n=4), "d4"
        )


async def test_promotions_stack_and_rollbacks_go_back_one_at_a_time():
    reg = rel.Releases(MemoryKV())
    a, b = await drafted(reg, "A", 1), await drafted(reg, "B", 2)
    for v, n in ((a, 1), (b, 2)):
        await reg.apply(change("evaluated", v, n=n, evaluation=passed()), f"e{n}")
        await reg.apply(change("promote", v, n=n), f"p{n}")
    ch = await reg.channel("acme")
    assert ch is not None and (ch.current, ch.before, ch.versions) == (b, ["", a], [a, b])
    assert (await reg.apply(change("rollback", n=1), "r1"))[0].current == a
    assert (await reg.apply(change("rollback", n=2), "r2"))[0].current == ""
    with pytest.raises(rel.Refused, match="nothing to roll back"):
        await reg.apply(change("rollback", n=3), "r3")
    # A redelivered change is applied once.
    assert not (await reg.apply(change("rollback", n=2), "r2"))[0].changed


async def test_a_person_ending_a_canary_is_a_decision_to_announce():
    reg = rel.Releases(MemoryKV())
    v = await drafted(reg)
    await reg.apply(change("evaluated", v, evaluation=passed()), "e1")
    await reg.apply(change("canary", v, share=0.5), "c1")
    answer, decided = await reg.apply(change("rollback", v), "r1")
    assert answer.canary == "" and [(e.action, e.version, e.by) for e in decided] == [
        ("rolled_back", v, "approver.acme.bob")]  # fmt: skip
    ch = await reg.channel("acme")
    assert ch is not None and [e.change_id for e in ch.unannounced] == [decided[0].change_id]
    await reg.announced("acme", decided)
    assert (await reg.channel("acme")).unannounced == []  # type: ignore[union-attr]


def test_shares_are_sticky_and_as_asked():
    ch = ReleaseChannel(tenant="acme", current="a" * 16, canary="b" * 16, share=0.3)
    picks = [rel.pick(ch, f"t-{i}") for i in range(20_000)]
    assert picks == [rel.pick(ch, f"t-{i}") for i in range(20_000)]  # the same task, the same version
    share = picks.count("b" * 16) / len(picks)
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(picks))  # within 4 standard errors
    # Raising the share keeps every task that ran the canary on it (a point under 0.3 is under 0.5).
    wider = ch.model_copy(update={"share": 0.5})
    assert all(rel.pick(wider, f"t-{i}") == "b" * 16 for i, p in enumerate(picks) if p == "b" * 16)
    assert rel.pick(None, "t-1") == "" and rel.pick(ch.model_copy(update={"canary": ""}), "t-1") == "a" * 16


async def test_observations_count_once_and_only_the_canarys_own_tasks():
    reg = rel.Releases(MemoryKV())
    v = await drafted(reg)
    await reg.apply(change("evaluated", v, evaluation=passed()), "e1")
    await reg.apply(change("canary", v, share=0.5), "c1")
    since = (await reg.channel("acme")).canary_since  # type: ignore[union-attr]
    assert await reg.observe(ended("t1", v)) == []
    assert await reg.observe(ended("t1", v)) == []  # its end handled again: not counted twice
    await reg.observe(ended("t-old", v, created=since - 5))  # admitted before the canary began
    await reg.observe(ended("t-other", "f" * 16))  # a pinned evaluation task of another version
    cancelled = ended("t-cancel", v)
    cancelled.status = "cancelled"
    await reg.observe(cancelled)
    await reg.observe(ended("t2", ""))  # the current version's
    ch = await reg.channel("acme")
    assert ch is not None and {k: a.tasks for k, a in ch.arms.items()} == {v: 1, "": 1}
    assert [p.version for p in ch.trail] == [v, ""]


async def test_a_regressive_canary_is_rolled_back_when_its_ratio_crosses_the_upper_boundary():
    reg = rel.Releases(MemoryKV())
    v = await drafted(reg)
    await reg.apply(change("evaluated", v, evaluation=passed()), "e1")
    await reg.apply(change("canary", v, share=0.5), "c1")
    lower, upper = CanaryTest().boundaries()
    assert (round(lower, 3), round(upper, 3)) == (-2.251, 2.890)
    assert await reg.observe(ended("t1", v, ok=False)) == []  # log(0.25/0.05) = 1.61: not yet
    decided = await reg.observe(ended("t2", v, revisions=1))  # rejected once, then passed: a bad task too
    assert [(e.action, e.tasks, e.bad, e.by) for e in decided] == [("rolled_back", 2, 2, rel.DECIDED_BY_TEST)]
    assert decided[0].llr >= upper and decided[0].current == ""
    ch = await reg.channel("acme")
    assert ch is not None and ch.canary == "" and rel.pick(ch, "t-any") == ""
    assert await reg.observe(ended("t3", v, ok=False)) == list(ch.unannounced)  # a late task: nothing to count


async def test_a_canary_costing_far_more_than_the_current_goes_badly():
    reg = rel.Releases(MemoryKV())
    v = await drafted(reg)
    await reg.apply(change("evaluated", v, evaluation=passed()), "e1")
    await reg.apply(change("canary", v, share=0.5), "c1")
    for i in range(5):
        await reg.observe(ended(f"cur{i}", "", cost=0.001))
    await reg.observe(ended("expensive", v, cost=0.002))  # 2x the current's mean, over max_cost_ratio 1.5
    ch = await reg.channel("acme")
    assert ch is not None and ch.arms[v].bad == 1 and ch.trail[-1].bad


def simulate(
    t: CanaryTest, p_canary: float, p_current: float, rng: random.Random, share: float = 0.5
) -> tuple[str, int]:
    """One canary, task by task as the planner observes them (the same functions): its decision
    and the canary tasks it took."""
    ch = ReleaseChannel(tenant="acme", current="", canary="c", share=share, test=t)
    lower, upper = t.boundaries()
    cur_bad = cur_n = n = 0
    while True:
        if rng.random() < share:
            n += 1
            ch.arms = {"": _arm(cur_n, cur_bad)}
            p0 = rel.p0_of(ch, t)
            ch.llr += rel.step(rng.random() < p_canary, p0, min(0.99, p0 + t.min_effect))
            if ch.llr >= upper:
                return "rolled_back", n
            if ch.llr <= lower:
                return "promoted", n
        else:
            cur_n += 1
            cur_bad += rng.random() < p_current
            ch.arms = {"": _arm(cur_n, cur_bad)}
        if n > 10_000:
            return "undecided", n


def _arm(tasks: int, bad: int) -> Any:
    from mesh_contracts.v1.records import ArmStats

    return ArmStats(tasks=tasks, bad=bad)


@pytest.mark.parametrize("p_current", [0.05, 0.10])
def test_the_sequential_test_keeps_its_stated_error_rates(p_current):
    """Simulated canaries: a candidate no worse than the current version is rolled back at most
    about ``alpha`` of the time, one worse by ``min_effect`` promoted at most about ``beta``
    (with ``p0`` estimated as the planner does). 2,000 runs each: the bound plus 3 standard
    errors of a rate at the bound."""
    t = CanaryTest(baseline_bad=p_current)
    rng = random.Random(41)
    runs = 2000
    h0 = [simulate(t, p_current, p_current, rng) for _ in range(runs)]
    h1 = [simulate(t, p_current + t.min_effect, p_current, rng) for _ in range(runs)]
    false_rollbacks = sum(d == "rolled_back" for d, _ in h0) / runs
    missed = sum(d == "promoted" for d, _ in h1) / runs
    assert false_rollbacks <= t.alpha + 3 * math.sqrt(t.alpha * (1 - t.alpha) / runs), false_rollbacks
    assert missed <= t.beta + 3 * math.sqrt(t.beta * (1 - t.beta) / runs), missed
    assert all(d != "undecided" for d, _ in h0 + h1)
    # Wald's approximation of the canary tasks it takes is close to what the runs took.
    for runs_of, p in ((h0, p_current), (h1, p_current + t.min_effect)):
        mean = sum(n for _, n in runs_of) / runs
        assert abs(mean - rel.expected_tasks(t, p, p_current)) < 0.5 * mean + 2, (p, mean)


def test_a_total_regression_is_rolled_back_after_the_fewest_tasks_the_boundary_allows():
    t = CanaryTest()
    rng = random.Random(7)
    decisions = [simulate(t, 1.0, 0.0, rng) for _ in range(200)]
    p0 = t.baseline_bad
    most = math.ceil(t.boundaries()[1] / math.log((p0 + t.min_effect) / p0))
    assert all(d == "rolled_back" and n <= most for d, n in decisions) and most == 2


def test_the_cli_says_what_is_wrong_in_one_line_before_reaching_the_mesh(tmp_path, capsys):
    from meshctl.cli import main as cli_main

    def ctl(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        try:
            rc = cli_main(["--home", str(tmp_path / "home"), *args])
        except SystemExit as exc:  # argparse
            rc = int(exc.code or 0)
        out = capsys.readouterr()
        return rc, out.err + out.out

    bad = tmp_path / "bad.yaml"
    bad.write_text("prompts:\n  worker.sytem: {version: '1', text: x}\nroute: {}\n")
    rc, said = ctl("release", "draft", str(bad), "--as", "author.acme.alice")
    assert rc == 2 and said.count("\n") == 1 and "2 problem(s)" in said and "unknown prompt id" in said
    rc, said = ctl("release", "draft", str(tmp_path / "none.yaml"), "--as", "author.acme.alice")
    assert rc == 2 and "no such file" in said
    rc, said = ctl("release", "canary", "0" * 16, "--share", "1.5", "--as", "approver.acme.bob")
    assert rc == 2 and "must be between 0 and 1" in said
    rc, said = ctl("release", "promote", "0" * 16, "--as", "author.acme.alice")
    assert rc == 2 and "this is done as approver.<tenant>.<person>" in said
    good = tmp_path / "good.yaml"
    good.write_text(yaml_dump(bundle("Answer in three sentences.", tools={"deny": ["http_get"]})))
    rc, said = ctl("release", "diff", "packaged", str(good))
    assert rc == 0 and "+Answer in three sentences." in said and "tools denied: +http_get" in said
    assert f" {SYSTEM.text[:40]}" in said  # the packaged text, as context
    rc, said = ctl("release", "show", str(good))
    assert (
        rc == 0
        and f"release {ReleaseBundle.model_validate(bundle('Answer in three sentences.', tools={'deny': ['http_get']})).digest()}"
        in said
    )


def yaml_dump(doc: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(doc)


async def test_a_canary_task_with_a_refused_tool_call_went_badly():
    from mesh_contracts.v1 import PlanStep
    from mesh_contracts.v1.records import StepState

    reg = rel.Releases(MemoryKV())
    v = await drafted(reg)
    await reg.apply(change("evaluated", v, evaluation=passed()), "e1")
    await reg.apply(change("canary", v, share=0.5), "c1")
    rec = ended("denied", v)
    rec.steps = {
        "s1": StepState(step=PlanStep(step_id="s1", instruction="send it"), status="completed", tool_denials=1)
    }
    await reg.observe(rec)
    ch = await reg.channel("acme")
    assert ch is not None and (ch.arms[v].bad, ch.arms[v].tool_denials) == (1, 1) and ch.trail[-1].bad


def test_the_meshs_default_is_the_operators_alone():
    admin = Principal("admin", "admin", None, new_signing_key().public_key())
    bob = Principal("approver.acme.bob", "approver", "acme", new_signing_key().public_key())
    trust = TrustBundle({p.name: p for p in (admin, bob)}, revision=5)
    assert rel.may_change(trust, admin, GLOBAL, "promote") is None
    assert rel.may_change(trust, admin, GLOBAL, "draft") is None
    assert "a canary runs in a tenant" in (rel.may_change(trust, admin, GLOBAL, "canary") or "")
    assert "that is the operators' right" in (rel.may_change(trust, bob, GLOBAL, "rollback") or "")
    assert "not acme's" in (rel.may_change(trust, admin, "acme", "promote") or "")


async def test_a_tenant_without_a_release_of_its_own_runs_the_meshs_and_a_canary_is_compared_with_it():
    reg = rel.Releases(MemoryKV())
    mesh_change = ReleaseChange(tenant=GLOBAL, task_id="rel-g1", action="draft", by="admin", bundle=bundle("Mesh."))
    g = (await reg.apply(mesh_change, "g1"))[0].version
    await reg.apply(ReleaseChange(tenant=GLOBAL, task_id="rel-g2", action="promote", version=g, by="admin",
                                  force=True, reason="t"), "g2")  # fmt: skip
    assert await reg.choose("acme", "t-1") == (g, "the mesh's default release")
    assert (await reg.choose("acme", "t-1", pinned=g))[0] == g  # a tenant may pin the mesh's versions
    v = await drafted(reg)
    await reg.apply(change("evaluated", v, evaluation=passed()), "e1")
    answer, _ = await reg.apply(change("canary", v, share=0.5), "c1")
    assert answer.current == g
    ch = await reg.channel("acme")
    assert ch is not None and ch.against == g
    await reg.observe(ended("on-mesh", g))
    await reg.observe(ended("on-canary", v))
    ch = await reg.channel("acme")
    assert ch is not None and {k: a.tasks for k, a in ch.arms.items()} == {g: 1, v: 1}
    # Promoted, the tenant's own release takes precedence over the mesh's.
    await reg.apply(change("promote", v, n=2), "p1")
    assert await reg.choose("acme", "t-2") == (v, "the tenant's current release")
    assert (await reg.choose("globex", "t-2"))[0] == g


def test_the_gate_counts_a_judge_score_that_fell_even_when_every_case_still_passes():
    from mesh_eval.release import judge_drop

    def report(*scores: float | None) -> dict[str, Any]:
        return {"cases": [{"id": f"c{i}", "judge_score": s, "passed": True} for i, s in enumerate(scores)]}

    assert (
        judge_drop(report(0.9, 0.9), report(0.8, 0.8), 0.05)
        == "judge mean score: 0.900 -> 0.800 (more than 0.05 lower)"
    )
    assert judge_drop(report(0.9, 0.9), report(0.87, 0.87), 0.05) == ""
    assert judge_drop(report(0.9, None), report(0.9, 0.1), 0.05) == ""  # only the cases both judged
    assert judge_drop(report(0.9), report(0.95, 0.1), 0.05) == ""  # (c1 is new)
