"""Releases of agent behaviour through the real mesh (issue 41): a prompt change goes draft ->
eval -> canary -> promote from the commands the README gives; a regressive one is refused by
the eval gate and, forced into a 30% canary, rolled back by the sequential test within the
tasks its error rates predict, after which no new task runs it. Rights are named people of the
tenant; every change is on the audit chain; a planner restarted mid-canary serves the same shares.

The scripted model stands in for the provider: a worker system prompt carrying ``#careless``
makes it answer every step off-topic (``mesh_llm.scripted.CARELESS_CUE``), which the checker
rejects; any other prompt text leaves its answers as they were.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml

from mesh_agent import prompts
from mesh_contracts.registry import open_body
from mesh_contracts.v1 import ReleaseChange, TaskCompleted, TaskFailed, TaskRejected, ToolCompleted, ToolRequested
from mesh_contracts.v1.records import ReleaseChannel
from mesh_contracts.v1.release import GLOBAL, CanaryTest
from mesh_identity import Signer
from mesh_kit import envelope as env
from mesh_planner import releases as rel
from mesh_tenancy.door import DoorRefused
from mesh_testing.chaos import ChaosMesh, started
from mesh_testing.infra import Infra, running_infra
from meshctl.cli import main as cli_main
from meshctl.client import TenantClient

pytestmark = pytest.mark.chaos
ENV = {"MESH_ACK_WAIT_S": "2", "MESH_LOG_LEVEL": "WARNING"}
ALICE, BOB = "author.acme.alice", "approver.acme.bob"
GOALS = ("How does the budget service enforce cost ceilings?", "How are identity tokens checked?")
"""Questions the sample documents every tenant starts with answer (the judge grades them: an
off-topic answer shares no word with them)."""
DATASET = [
    {"id": "budget", "tenant": "acme", "goal": GOALS[0], "expect": {"must_cite": ["budget.md"]}},
    {"id": "identity", "tenant": "acme", "goal": GOALS[1], "expect": {"must_cite": ["identity.md"]}},
    {"id": "other-tenant", "tenant": "globex", "goal": "What is 9 + 10?", "expect": {"must_contain": ["19"]}},
]


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme", "globex"], name="releases", ack_wait_s=2.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra) -> Iterator[ChaosMesh]:
    with started(infra, ENV) as m:
        yield m


@pytest.fixture(scope="module")
def people(infra, mesh) -> None:
    """alice drafts acme's releases, bob decides them; carol and dave are globex's."""
    assert ctl(infra, "authors", "add", "alice", "--tenant", "acme") == 0
    assert ctl(infra, "approvers", "add", "bob", "--tenant", "acme") == 0
    assert ctl(infra, "authors", "add", "carol", "--tenant", "globex") == 0
    assert ctl(infra, "approvers", "add", "dave", "--tenant", "globex") == 0


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The bundles and the dataset, as a team would keep them in its repository."""
    d = tmp_path_factory.mktemp("release")
    system = prompts.load("mesh_worker", "system").text
    bundles = {
        "neutral": {"description": "a friendlier system prompt",
                    "prompts": {"worker.system": {"version": "2", "text": "Be friendly and brief.\n" + system}}},
        "regressive": {"description": "a careless system prompt",
                       "prompts": {"worker.system": {"version": "3", "text": system + "\n#careless"}}},
        "stranger": {"description": "routes nobody has", "routes": {"worker": "no-such-route"}},
    }  # fmt: skip
    out = {}
    for name, bundle in bundles.items():
        out[name] = d / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump(bundle))
    out["dataset"] = d / "golden.jsonl"
    out["dataset"].write_text("".join(json.dumps(c) + "\n" for c in DATASET))
    return out


def ctl(infra: Infra, *args: str) -> int:
    return cli_main(["--home", str(infra.home), *args, "--nats-url", infra.nats_url])


def ctl_json(infra: Infra, capsys: Any, *args: str) -> tuple[int, Any]:
    capsys.readouterr()
    rc = ctl(infra, *args, "--json")
    out = capsys.readouterr().out
    start = out.find("{")
    return rc, json.loads(out[start:]) if start >= 0 else None


def version_of(path: Path) -> str:
    from meshctl.release import load_bundle

    return load_bundle(path).digest()


async def channel(infra: Infra, tenant: str = "acme") -> ReleaseChannel:
    async with TenantClient.of(infra.ids, infra.nats_url, tenant) as client:
        found = await client.registry("channel", bucket="releases")
    return ReleaseChannel.model_validate(found or {"tenant": tenant})


async def run_tasks(infra: Infra, prefix: str, n: int, concurrency: int = 3) -> list[Any]:
    """``n`` tasks of acme, ``concurrency`` at a time; their outcomes in submission order."""
    gate = asyncio.Semaphore(concurrency)
    async with TenantClient.of(infra.ids, infra.nats_url, "acme") as client:

        async def one(i: int) -> Any:
            async with gate:
                seen = await client.submit(GOALS[i % 2], task_id=f"{prefix}-{i}", timeout=60, progress=False)
                assert isinstance(seen.outcome, TaskCompleted | TaskFailed), seen.outcome
                return seen.outcome

        return list(await asyncio.gather(*(one(i) for i in range(n))))


async def chain(infra: Infra, tenant: str) -> list[dict[str, Any]]:
    return await infra.audit_chain(tenant)


def test_draft_validates_and_rights_are_named_people_of_the_tenant(infra, mesh, people, files, capsys):
    # A bundle naming a route the mesh's model config lacks is refused, saying which.
    capsys.readouterr()
    assert ctl(infra, "release", "draft", str(files["stranger"]), "--as", ALICE) == 1
    assert "routes ['no-such-route'] are not in the mesh's model config" in capsys.readouterr().err
    rc, answer = ctl_json(infra, capsys, "release", "draft", str(files["neutral"]), "--as", ALICE)
    assert rc == 0 and answer["accepted"] and answer["version"] == version_of(files["neutral"])
    # Drafting it again writes nothing.
    rc, again = ctl_json(infra, capsys, "release", "draft", str(files["neutral"]), "--as", ALICE)
    assert rc == 0 and not again["changed"]
    # An author may not decide; an approver may not draft.
    assert ctl(infra, "release", "promote", answer["version"], "--as", ALICE) == 2  # --as names the role
    assert ctl(infra, "release", "draft", str(files["neutral"]), "--as", BOB) == 2

    async def hand_in(signer: Signer, tenant: str, **fields: Any) -> Any:
        change = ReleaseChange(tenant=tenant, task_id=f"rel-{signer.principal.split('.')[-1]}-{fields['action']}",
                               by=signer.principal, **fields)  # fmt: skip
        async with TenantClient.of(infra.ids, infra.nats_url, tenant) as client:
            return await client.change_release(change, signer, timeout=30)

    async def main() -> None:
        alice = Signer.from_file(ALICE, infra.ids.signing_key(ALICE))
        refused = await hand_in(alice, "acme", action="promote", version=answer["version"], force=True, reason="x")
        assert not refused.accepted and "that is an approver" in refused.reason
        # globex's approver cannot touch acme's releases: refused at acme's door...
        dave = Signer.from_file("approver.globex.dave", infra.ids.signing_key("approver.globex.dave"))
        with pytest.raises(DoorRefused, match=re.escape("approver.globex.dave may speak only for tenant 'globex'")):
            await hand_in(dave, "acme", action="promote", version=answer["version"], force=True, reason="x")
        # ... and in its own tenant acme's version does not exist.
        other = await hand_in(dave, "globex", action="promote", version=answer["version"], force=True, reason="x")
        assert not other.accepted and other.reason.startswith(f"tenant globex has no release {answer['version']}")

    asyncio.run(main())
    assert asyncio.run(channel(infra)).current == ""  # nothing was promoted
    kinds = [(r["kind"], r["actor"]) for r in asyncio.run(chain(infra, "acme")) if r["kind"].startswith("release.")]
    assert ("release.draft", ALICE) in kinds and ("release.change-refused", ALICE) in kinds


def test_the_gate_refuses_a_regressive_prompt_and_passes_a_neutral_one(infra, mesh, people, files, tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    assert ctl(infra, "eval", str(files["dataset"]), "--report", str(baseline)) == 0
    assert json.loads(baseline.read_text())["summary"]["passed"] == 3  # the packaged behaviour passes them all
    assert ctl(infra, "release", "draft", str(files["regressive"]), "--as", ALICE) == 0
    bad, good = version_of(files["regressive"]), version_of(files["neutral"])

    capsys.readouterr()
    rc = ctl(infra, "release", "eval", bad, "--as", ALICE, "--dataset", str(files["dataset"]),
             "--baseline", str(baseline))  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 1 and "gate: FAIL" in out
    # the failing cases are listed by name (acme's two: the globex case is not acme's to run)
    assert "failing: budget" in out and "failing: identity" in out and "other-tenant" not in out
    assert "case budget passed before and fails now" in out
    assert ctl(infra, "release", "canary", bad, "--share", "0.3", "--as", BOB) == 1  # refused by the gate
    assert ctl(infra, "release", "promote", bad, "--as", BOB) == 1

    rc = ctl(infra, "release", "eval", good, "--as", ALICE, "--dataset", str(files["dataset"]),
             "--baseline", str(baseline))  # fmt: skip
    assert rc == 0 and "gate: pass" in capsys.readouterr().out


def test_a_forced_regressive_canary_is_rolled_back_by_its_test(infra, mesh, people, files, capsys):
    """Forced into a 30% canary, the careless prompt is rolled back after the canary tasks the
    test's boundaries predict; every task admitted after the rollback runs the current version."""
    bad = version_of(files["regressive"])
    test = CanaryTest()  # the defaults the command uses
    before = asyncio.run(channel(infra))
    assert ctl(infra, "release", "canary", bad, "--share", "0.3", "--as", BOB, "--force",
               "--reason", "test the rollback") == 0  # fmt: skip
    started_at = time.time()
    outcomes: list[Any] = []
    for batch in range(20):
        outcomes += asyncio.run(run_tasks(infra, f"rb{batch}", 6))
        ch = asyncio.run(channel(infra))
        if not ch.canary:
            break
    assert not ch.canary and ch.current == before.current
    decision = next(e for e in reversed(ch.history) if e.action == "rolled_back")
    assert decision.by == rel.DECIDED_BY_TEST and decision.version == bad
    # Every canary task went badly (the careless answer fails the checker) and none of the others did.
    on_bad = [o for o in outcomes if o.release == bad]
    assert on_bad and all(isinstance(o, TaskFailed) or o.revisions > 0 for o in on_bad)
    assert all(isinstance(o, TaskCompleted) and o.revisions == 0 for o in outcomes if o.release != bad)
    # The test decided after exactly the bad canary tasks its upper boundary needs: each adds
    # log(p1/p0) with p0 at most the prior (the current version's tasks only lower it).
    _, upper = test.boundaries()
    p0 = min(max(test.baseline_bad, 0.01), 0.98 - test.min_effect)
    most = math.ceil(upper / math.log((p0 + test.min_effect) / p0))
    assert 1 <= decision.tasks <= most and decision.bad == decision.tasks and decision.llr >= upper
    # Every message a canary task's services made says which release made it (history shows it).
    rc, story = ctl_json(infra, capsys, "history", on_bad[0].task_id, "--tenant", "acme")
    assert rc == 0 and story["totals"]["releases"] == {bad: story["totals"]["releases"][bad]}
    kinds = {m["type"] for m in story["messages"]}
    assert {"plan.created", "step.requested", "step.completed", "check.verdict", "usage.recorded"} <= kinds
    seconds = decision.at - started_at
    print(
        f"\nrollback: {decision.tasks} canary tasks of {len(outcomes)} (bound {most}), {seconds:.1f} s after the canary began"
    )
    # After the rollback no new task runs the careless prompt.
    after = asyncio.run(run_tasks(infra, "after-rb", 12))
    assert all(o.release == ch.current for o in after) and all(isinstance(o, TaskCompleted) for o in after)
    kinds = {r["kind"] for r in asyncio.run(chain(infra, "acme"))}
    assert {"release.canary", "release.rolled_back"} <= kinds


def test_a_neutral_canary_is_promoted_and_a_restarted_planner_serves_the_same_shares(infra, mesh, people, files):
    good = version_of(files["neutral"])
    share = 0.5
    assert ctl(infra, "release", "canary", good, "--share", str(share), "--as", BOB) == 0
    since = asyncio.run(channel(infra)).canary_since
    outcomes = asyncio.run(run_tasks(infra, "nc-a", 6))
    (planner,) = mesh.names("planner")
    mesh.kill(planner)
    asyncio.run(mesh.replace(planner))
    for batch in range(30):
        outcomes += asyncio.run(run_tasks(infra, f"nc{batch}", 6))
        ch = asyncio.run(channel(infra))
        if not ch.canary:
            break
    assert ch.current == good and not ch.canary
    decision = next(e for e in reversed(ch.history) if e.action == "promoted")
    assert decision.by == rel.DECIDED_BY_TEST and decision.bad == 0
    # Sticky and exact shares, before and after the restart: a task runs the canary iff its
    # point falls under the share (until the promotion, when every new task runs it).
    for o in outcomes:
        admitted_in_canary = o.release == good or rel.share_point("acme", o.task_id) >= share
        assert admitted_in_canary, (o.task_id, o.release)
    on_canary = [o for o in outcomes if o.release == good]
    assert on_canary and all(isinstance(o, TaskCompleted) for o in outcomes)
    assert since < decision.at
    # Every new task now runs it.
    assert all(o.release == good for o in asyncio.run(run_tasks(infra, "after-promote", 6)))


def test_a_release_that_denies_a_tool_takes_it_away_in_the_worker_and_the_tool_executor(infra, mesh, people, tmp_path):
    system = prompts.load("mesh_worker", "system").text
    path = tmp_path / "no-calculator.yaml"
    path.write_text(yaml.safe_dump({"description": "no calculator", "tools": {"deny": ["calculator"]},
                                    "prompts": {"worker.system": {"version": "4", "text": system}}}))  # fmt: skip
    assert ctl(infra, "release", "draft", str(path), "--as", ALICE) == 0
    v = version_of(path)

    async def main() -> None:
        # A submission may pin a drafted version of its tenant's (what release eval does).
        async with TenantClient.of(infra.ids, infra.nats_url, "acme") as client:
            seen = await client.submit("What is 12 * 12?", task_id="no-calc", release=v, timeout=60)
            wrong = await client.submit("What is 12 * 12?", task_id="no-such", release="0" * 16, timeout=60)
        assert seen.outcome.release == v and "calculator" not in seen.outcome.tools
        assert (
            isinstance(wrong.outcome, TaskRejected)
            and "tenant acme has no release 0000000000000000" in wrong.outcome.reason
        )
        # The second wall: a call that names the tool anyway (signed as the worker) is refused.
        worker = Signer.from_file("worker", infra.ids.signing_key("worker"))
        msg = ToolRequested(tenant="acme", task_id="deny-probe", step_id="s1", call_id="s1-c1", tool="calculator",
                            arguments={"expression": "1 + 1"}, release=v)  # fmt: skip
        body = msg.to_bytes()
        headers = env.headers_for(worker, msg, body, env.message_id(msg.type, "acme", "deny-probe", "s1-c1"))
        nc = await infra.admin()
        try:
            await nc.jetstream().publish(msg.subject(), body, headers=headers)
        finally:
            await nc.close()
        for _ in range(100):
            answers = await infra.stored("TOOL", "tool.v1.acme.deny-probe.completed")
            if answers:
                break
            await asyncio.sleep(0.1)
        answer = ToolCompleted.parse(answers[0].data)
        assert (
            not answer.ok and answer.denied and answer.error == f"refused by policy: release {v} denies tool calculator"
        )
        assert answer.release == v

    asyncio.run(main())


def test_a_releases_route_takes_the_agents_calls_to_another_chain_of_the_gateway(infra, mesh, people, tmp_path):
    """The mesh's model config has a ``default`` and a ``judge`` route (the scripted models
    scripted-1 and scripted-judge): a release that routes the worker to ``judge`` moves its calls."""
    path = tmp_path / "routed.yaml"
    path.write_text(yaml.safe_dump({"description": "the worker on the judge's chain", "routes": {"worker": "judge"}}))
    assert ctl(infra, "release", "draft", str(path), "--as", ALICE) == 0
    v = version_of(path)

    async def main() -> dict[str, set[str]]:
        async with TenantClient.of(infra.ids, infra.nats_url, "acme") as client:
            for task, release in (("routed", v), ("unrouted", "")):
                seen = await client.submit(GOALS[0], task_id=task, release=release, timeout=60, progress=False)
                assert isinstance(seen.outcome, TaskCompleted), seen.outcome
        models: dict[str, set[str]] = {}
        for task in ("routed", "unrouted"):
            for msg in await infra.stored("USAGE", f"usage.v1.acme.{task}.>"):
                u = open_body(msg.subject, msg.data)
                if u["agent"] == "worker":
                    models.setdefault(task, set()).add(u["model"])
        return models

    assert asyncio.run(main()) == {"routed": {"scripted-judge"}, "unrouted": {"scripted-1"}}


def test_the_meshs_default_release_is_the_operators_and_serves_tenants_without_their_own(
    infra, mesh, people, files, tmp_path, capsys
):
    system = prompts.load("mesh_worker", "system").text
    path = tmp_path / "mesh-default.yaml"
    path.write_text(yaml.safe_dump({"description": "the mesh's default",
                                    "prompts": {"worker.system": {"version": "5", "text": "Be exact.\n" + system}}}))  # fmt: skip
    v = version_of(path)
    rc, answer = ctl_json(infra, capsys, "release", "draft", str(path), "--global")
    assert rc == 0 and answer["version"] == v and answer["tenant"] == GLOBAL
    baseline = tmp_path / "baseline.json"
    assert ctl(infra, "eval", str(files["dataset"]), "--report", str(baseline)) == 0
    # Its gate runs one tenant's cases with the version pinned; the evaluation is the version's.
    assert ctl(infra, "release", "eval", v, "--global", "--tenant", "acme", "--dataset", str(files["dataset"]),
               "--baseline", str(baseline)) == 0  # fmt: skip
    rc, answer = ctl_json(infra, capsys, "release", "promote", v, "--global")
    assert rc == 0 and answer["current"] == v

    async def main() -> None:
        # globex has no release of its own: its tasks run the mesh's default; acme's run acme's own.
        async with TenantClient.of(infra.ids, infra.nats_url, "globex") as client:
            seen = await client.submit("What is 9 + 10?", task_id="g-default", timeout=60, progress=False)
        assert isinstance(seen.outcome, TaskCompleted) and seen.outcome.release == v
        acme = await channel(infra)
        assert acme.current and acme.current != v
        assert all(o.release == acme.current for o in await run_tasks(infra, "a-own", 2))
        # A tenant's people cannot change the mesh's default: its client may not even send to it
        # (the broker refuses the subject: no answer ever comes).
        bob = Signer.from_file(BOB, infra.ids.signing_key(BOB))
        change = ReleaseChange(tenant=GLOBAL, task_id="rel-bob-global", action="rollback", by=BOB)
        async with TenantClient.of(infra.ids, infra.nats_url, "acme") as client:
            with pytest.raises((nats.errors.Error, TimeoutError)):
                await client.change_release(change, bob, timeout=5)

    asyncio.run(main())
    rc, listed = ctl_json(infra, capsys, "release", "list", "--global")
    assert rc == 0 and listed["current"] == v and listed["versions"][0]["evaluation"].startswith("pass")
    kinds = {r["kind"] for r in asyncio.run(chain(infra, GLOBAL))}
    assert {"release.draft", "release.evaluated", "release.promote"} <= kinds
    assert ctl(infra, "audit", "verify", "--tenant", GLOBAL) == 0


def test_every_release_change_and_decision_verifies_on_the_chain(infra, mesh):
    assert ctl(infra, "audit", "verify", "--tenant", "acme") == 0
    kinds = [r["kind"] for r in asyncio.run(chain(infra, "acme")) if r["kind"].startswith("release.")]
    for kind in ("release.draft", "release.evaluated", "release.canary", "release.rolled_back", "release.promoted",
                 "release.change-refused"):  # fmt: skip
        assert kind in kinds, kind
