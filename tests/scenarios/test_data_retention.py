"""Retention per tenant and per data class through the real mesh (issue 42, item 1).

Two tenants run the same task in the same streams. The operator shortens one tenant's retention
(``meshctl tenant retention``, on its audit chain); the keeper (its own identity) removes that
tenant's data older than it, class by class, in every place the class lives, and nothing of the
other tenant. A task that has not ended keeps all of its data whatever the retention. The keeper
is run with its clock moved forward (``enforce(now=...)``): a day's retention is not waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import tarfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mesh_contracts import lifecycle, sealing
from mesh_contracts.v1 import TaskCompleted, TaskPolicy
from mesh_testing.chaos import ChaosMesh, started
from mesh_testing.infra import Infra, running_infra
from meshctl import keeper
from meshctl.cli import main as cli_main

pytestmark = pytest.mark.chaos
ENV = {"MESH_ACK_WAIT_S": "2", "MESH_LOG_LEVEL": "WARNING", "MESH_PLAN_REVIEW": "initech"}
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23, and email the answer to ops@acme.test."
DAY = 86400.0


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme", "globex", "initech"], name="retention", ack_wait_s=2.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra) -> Iterator[ChaosMesh]:
    with started(infra, ENV) as m:
        yield m


def ctl(infra: Infra, *args: str) -> int:
    return cli_main(["--home", str(infra.home), *args, "--nats-url", infra.nats_url])


async def held(infra: Infra, tenant: str) -> dict[str, int]:
    """How many messages and records of ``tenant`` each place of each class holds (as admin)."""
    nc = await infra.admin()
    out: dict[str, int] = {}
    try:
        for c in lifecycle.DATA_CLASSES:
            for p in [*c.places(), *([lifecycle.STATUS] if c.name == "tasks" else [])]:
                body = json.dumps({"subjects_filter": p.of(tenant)}).encode()
                info = json.loads((await nc.request(f"$JS.API.STREAM.INFO.{p.stream}", body, timeout=5)).data)
                out[f"{c.name if p != lifecycle.STATUS else 'status'} {p.stream} {p.filter}"] = sum(
                    (info["state"].get("subjects") or {}).values()
                )
    finally:
        await nc.close()
    return out


def of(counts: dict[str, int], cls: str) -> dict[str, int]:
    return {k: v for k, v in counts.items() if k.startswith(f"{cls} ")}


def kept(now: dict[str, int], before: dict[str, int]) -> bool:
    """Nothing of ``before`` removed (a record rewritten since may hold one more revision)."""
    return all(now[k] >= v for k, v in before.items())


async def enforce(infra: Infra, now: float) -> keeper.KeeperReport:
    nc = await keeper.connect(infra.ids, infra.nats_url)
    try:
        return await keeper.enforce(nc, now=now, signer=keeper.signer(infra.ids))
    finally:
        await nc.close()


async def run(infra: Infra, tenant: str, task_id: str, **kw: Any) -> Any:
    async with infra.client(tenant) as c:
        return (await c.submit(GOAL, task_id=task_id, timeout=90, **kw)).outcome


def test_a_tenants_retention_removes_its_old_data_class_by_class_and_nothing_of_another_tenant(infra, mesh, capsys):
    async def main() -> None:
        for tenant in ("acme", "globex"):
            assert isinstance(await run(infra, tenant, f"{tenant}-r1"), TaskCompleted)
        await asyncio.sleep(1.5)  # the budget's settlement of the last usage
        acme, globex = await held(infra, "acme"), await held(infra, "globex")
        for cls in ("tasks", "tools", "usage", "status"):
            assert sum(of(acme, cls).values()) > 0, (cls, acme)
        for place in ("TASK", "STEP", "EVENTS", "TOOL", "USAGE", "KV_tasks", "KV_steps", "ENVELOPES"):
            assert any(place in k and v for k, v in acme.items()), (place, acme)

        # Bad input: one line, nothing changed.
        capsys.readouterr()
        with pytest.raises(SystemExit):
            ctl(infra, "tenant", "retention", "acme", "--tasks", "0.001")
        assert "at least an hour" in capsys.readouterr().err
        assert await asyncio.to_thread(ctl, infra, "tenant", "retention", "acme", "--tasks", "30") == 2
        assert "longer than the deployment keeps tasks data (7 days" in capsys.readouterr().err
        assert await asyncio.to_thread(ctl, infra, "tenant", "retention", "nobody", "--tasks", "1") == 2
        assert "unknown tenant 'nobody'" in capsys.readouterr().err

        # acme keeps task payloads a day; the rest as the deployment (7 days).
        assert await asyncio.to_thread(ctl, infra, "tenant", "retention", "acme", "--tasks", "1") == 0
        assert "tasks 1 days, tools as the deployment, usage as the deployment" in capsys.readouterr().out
        assert await asyncio.to_thread(ctl, infra, "tenant", "show", "acme", "--json") == 0
        shown = {c["class"]: c for c in json.loads(capsys.readouterr().out)["classes"]}
        assert shown["tasks"]["retention_s"] == DAY and shown["tasks"]["set_by"] == "tenant"
        assert shown["tools"]["retention_s"] == 7 * DAY and shown["tools"]["set_by"] == "deployment"
        assert shown["audit"]["retention_s"] == 365 * DAY
        t0 = shown["tasks"]["oldest_at"]
        assert abs(t0 - time.time()) < 600 and shown["tasks"]["oldest_removed_at"] == pytest.approx(t0 + DAY)

        # Now: nothing is a day old, nothing goes (the keeper's own command, as the keeper).
        assert await asyncio.to_thread(ctl, infra, "keeper", "--json") == 0
        assert json.loads(capsys.readouterr().out)["removed"] and kept(await held(infra, "acme"), acme)

        # Two days on: acme's task payloads are gone from every place; its tool calls, usage and
        # status records stay; globex loses nothing.
        before = await held(infra, "acme")
        report = await enforce(infra, time.time() + 2 * DAY)
        # Each place gave up at least what it held a moment before (more: a late write).
        purged = {f"{r.data_class} {r.stream} {r.filter}": r.purged for r in report.removed}
        short = {
            k: (v, purged.get(k.replace("{t}", "acme"))) for k, v in of(before, "tasks").items()
            if v and (purged.get(k.replace("{t}", "acme")) or 0) < v
        }  # fmt: skip
        assert not report.skipped and not short, (short, report)
        after = await held(infra, "acme")
        assert sum(of(after, "tasks").values()) == 0, of(after, "tasks")
        for cls in ("tools", "usage", "status"):
            assert kept(of(after, cls), of(acme, cls)), cls
        assert kept(await held(infra, "globex"), globex)

        # Tools and usage kept two and three days: at four days on, everything purgeable is gone,
        # status records included (kept as long as the longest class).
        assert await asyncio.to_thread(ctl, infra, "tenant", "retention", "acme", "--tools", "2", "--usage", "3") == 0
        await enforce(infra, time.time() + 2.5 * DAY)
        after = await held(infra, "acme")
        assert sum(of(after, "tools").values()) == 0 and kept(of(after, "usage"), of(acme, "usage"))
        await enforce(infra, time.time() + 4 * DAY)
        after = await held(infra, "acme")
        assert sum(v for k, v in after.items() if not k.startswith("audit ")) == 0, after
        assert kept(of(after, "audit"), of(acme, "audit")) and sum(of(after, "audit").values()) > 0, "the chain stays"
        assert kept(await held(infra, "globex"), globex)

        # The audit chain is untouched and still verifies; the change is on it.
        capsys.readouterr()
        assert await asyncio.to_thread(ctl, infra, "audit", "verify", "--tenant", "acme") == 0
        assert "retention.removed 3" in capsys.readouterr().out, "the keeper's links verify as the keeper's"
        assert await asyncio.to_thread(ctl, infra, "audit", "chain", "--tenant", "acme", "--json") == 0
        chain = json.loads(capsys.readouterr().out)
        assert [r["kind"] for r in chain].count("control.retention-set") == 2
        removed = [r for r in chain if r["kind"] == "retention.removed"]
        assert len(removed) == 3 and all(r["actor"] == "keeper" for r in removed), "one link per pass that removed"
        assert (
            removed[0]["detail"]["removed"]["tasks"] == report.purged and "tools" not in removed[0]["detail"]["removed"]
        )
        # acme still works: a new task runs and its data is kept.
        assert isinstance(await run(infra, "acme", "acme-r2"), TaskCompleted)

    asyncio.run(main())


def test_a_task_that_has_not_ended_keeps_its_data_whatever_the_retention(infra, mesh, capsys):
    async def main() -> None:
        waiting = asyncio.create_task(run(infra, "initech", "initech-w1", policy=TaskPolicy(judge=False)))
        deadline = time.monotonic() + 60
        while not await infra.stored("TASK", "task.v1.initech.initech-w1.drafted"):
            assert time.monotonic() < deadline, "the plan under review was not drafted"
            await asyncio.sleep(0.2)
        for cls in ("tasks", "tools", "usage"):
            assert await asyncio.to_thread(ctl, infra, "tenant", "retention", "initech", f"--{cls}", "1") == 0
        before = await held(infra, "initech")
        report = await enforce(infra, time.time() + 3 * DAY)

        assert not report.skipped and kept(await held(infra, "initech"), before), "a waiting task keeps its data"
        assert sum(of(before, "tasks").values()) > 0
        assert await asyncio.to_thread(ctl, infra, "tenant", "show", "initech") == 0
        out = capsys.readouterr().out
        assert "tasks not ended yet: everything of the tenant since" in out and "tasks     1 days" in out
        waiting.cancel()  # the client stops following it (closing its connection); the task waits on
        with contextlib.suppress(asyncio.CancelledError):
            await waiting

    asyncio.run(main())


def test_an_export_holds_the_tenants_data_only_and_its_chain_verifies_offline_and_tampering_shows(
    infra, mesh, tmp_path, capsys
):
    """Issue 42, item 4: ``meshctl tenant export`` and ``meshctl audit verify --archive``."""

    async def main() -> None:
        assert isinstance(await run(infra, "globex", "globex-x1"), TaskCompleted)
        await asyncio.sleep(1.5)  # the budget's settlement of the last usage
        out = tmp_path / "globex.tar.gz"
        capsys.readouterr()
        assert await asyncio.to_thread(ctl, infra, "tenant", "export", "globex", "--out", str(out)) == 0
        assert f"wrote {out}" in capsys.readouterr().out
        assert oct(out.stat().st_mode & 0o777) == "0o600", "an export is tenant data: the owner's alone"

        with tarfile.open(out) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        rows = [json.loads(line) for name, data in files.items() if "/places/" in name for line in data.splitlines()]
        assert rows and all(".globex." in r["subject"] for r in rows), "globex's data only"
        assert not [r for r in rows if ".acme." in r["subject"] or ".initech." in r["subject"]]
        tasks = {t["task_id"]: t for t in json.loads(files["globex/tasks.json"])}
        assert tasks["globex-x1"]["outcome"] == "completed" and tasks["globex-x1"]["messages"] > 10
        subjects = {r["subject"] for r in rows}
        for wanted in ("task.v1.globex.globex-x1.submitted", "tool.v1.globex.globex-x1.", "usage.v1.globex.globex-x1.",
                       "audit.v1.globex.", "$KV.tasks.globex.globex-x1", "$KV.status.globex.globex-x1"):  # fmt: skip
            assert any(s.startswith(wanted) for s in subjects), wanted
        assert any(s.startswith("$KV.rag.globex.") for s in subjects), "its documents and their index"
        # As stored (sealed with globex's data key: the signatures are over those bytes), and opened.
        (sub,) = [r for r in rows if r["subject"] == "task.v1.globex.globex-x1.submitted" and r["stream"] == "TASK"]
        assert sealing.is_sealed(json.loads(sub["body"])["goal"]) and sub["opened"]["goal"] == GOAL
        unopened = [(r["subject"], r["opened"]) for r in rows if str(r.get("opened", "")).startswith("(sealed")]
        assert not unopened, "every sealed row of the tenant's export opens with its key"
        assert any(r["stream"] == "KV_ledger" and "opened" in r for r in rows), "recorded results too"
        (rec,) = [r for r in rows if r["subject"] == "$KV.tasks.globex.globex-x1"][-1:]
        assert sealing.is_sealed(json.loads(rec["body"])["goal"]) and rec["opened"]["goal"] == GOAL

        # Offline: no mesh is asked (a wrong URL would fail a connection); the chain is whole.
        assert await asyncio.to_thread(cli_main, ["audit", "verify", "--archive", str(out)]) == 0
        text = capsys.readouterr().out
        assert "files match its manifest (tenant globex" in text and "audit chain of globex: whole" in text

        # One audit record altered, and the manifest re-hashed to match: the chain shows it.
        forged = tmp_path / "forged.tar.gz"
        rewrite(out, forged, alter_audit=True)
        assert await asyncio.to_thread(cli_main, ["audit", "verify", "--archive", str(forged)]) == 1
        assert "audit chain of globex: BROKEN at record" in capsys.readouterr().out
        # A file altered without the manifest: refused before the chain is read.
        rewrite(out, forged, alter_audit=False)
        assert await asyncio.to_thread(cli_main, ["audit", "verify", "--archive", str(forged)]) == 2
        assert "does not match the manifest" in capsys.readouterr().err

    asyncio.run(main())


def rewrite(src, dst, *, alter_audit: bool) -> None:
    """A copy of an export with one change: an audit record's decision (manifest re-hashed), or
    a task's file (manifest left as it was)."""
    with tarfile.open(src) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    (audit_name,) = [n for n in files if "/places/audit/AUDIT." in n]
    if alter_audit:
        lines = files[audit_name].decode().splitlines()
        row = json.loads(lines[0])
        row["body"] = row["body"].replace('"actor":"', '"actor":"x', 1)
        files[audit_name] = ("\n".join([json.dumps(row, sort_keys=True), *lines[1:]]) + "\n").encode()
        (manifest_name,) = [n for n in files if n.endswith("manifest.json")]
        manifest = json.loads(files[manifest_name])
        manifest["sha256"][audit_name.split("/", 1)[1]] = hashlib.sha256(files[audit_name]).hexdigest()
        files[manifest_name] = json.dumps(manifest).encode()
    else:
        name = next(n for n in files if "/places/tasks/TASK." in n)
        files[name] += b'{"subject": "task.v1.globex.planted.submitted"}\n'
    with tarfile.open(dst, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
