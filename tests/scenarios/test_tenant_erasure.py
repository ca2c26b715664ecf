"""Erasing a tenant through the real mesh (issue 42, item 3).

Two tenants put marker strings in everything they can: a document, a goal, a tool call's
arguments (an email to an address that carries the marker). The operator erases one of them
(``meshctl tenant erase``). Then every message of every stream (bodies and headers), every Redis
key and value, and every span the services exported are scanned: nothing of the erased tenant's
marker is readable anywhere; the other tenant's marker is where it was; both audit chains verify;
the erased tenant's chain is whole but its content fields are unreadable for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from nats.js.errors import NotFoundError

from mesh_contracts import ContractError
from mesh_contracts.v1 import TaskCompleted, TaskSubmitted
from mesh_durable import sealing
from mesh_identity import TrustBundle
from mesh_testing.chaos import ChaosMesh, outbox_effects, started
from mesh_testing.infra import Infra, running_infra
from mesh_testing.otlp import TraceBackend
from meshctl import audit
from meshctl.cli import main as cli_main

pytestmark = pytest.mark.chaos
ENV = {"MESH_ACK_WAIT_S": "2", "MESH_LOG_LEVEL": "WARNING", "MESH_PLAN_REVIEW": "initech"}
MARK = {"acme": "qzmarkacme", "globex": "qzmarkglobex"}


def goal(tenant: str) -> str:
    m = MARK[tenant]
    return (f"How does AgentMesh avoid duplicate side effects with the {m} procedure? Also compute 17 * 23, "
            f"and email the answer to {m}@{tenant}.test.")  # fmt: skip


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme", "globex", "initech"], name="erasure", ack_wait_s=2.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def backend() -> Iterator[TraceBackend]:
    with TraceBackend() as b:
        yield b


@pytest.fixture(scope="module")
def mesh(infra, backend) -> Iterator[ChaosMesh]:
    with started(infra, {**ENV, **backend.exporting()}) as m:  # spans exported as to a collector
        yield m


def ctl(infra: Infra, *args: str) -> int:
    return cli_main(["--home", str(infra.home), *args, "--nats-url", infra.nats_url])


async def broker_holds(infra: Infra) -> dict[str, set[str]]:
    """Marker -> the places (stream and subject) any stored message shows it in, body or headers."""
    found: dict[str, set[str]] = {m: set() for m in MARK.values()}
    nc = await infra.admin()
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1 if info.state.messages else 0):
                try:
                    msg = await js.get_msg(info.config.name, seq)
                except NotFoundError:
                    continue  # purged, deleted, or a gap
                blob = ((msg.data or b"") + json.dumps(msg.headers or {}).encode()).lower()
                for m in found:
                    if m.encode() in blob:
                        found[m].add(f"{info.config.name} {msg.subject}")
    finally:
        await nc.close()
    return found


async def redis_holds(infra: Infra) -> dict[str, set[str]]:
    """Marker -> the Redis keys whose name or value shows it."""
    found: dict[str, set[str]] = {m: set() for m in MARK.values()}
    r = aioredis.from_url((infra.ids.secrets / "redis" / "admin.url").read_text().strip())
    try:
        async for key in r.scan_iter(count=1000):
            kind = (await r.type(key)).decode()
            value: Any = {
                "string": r.get, "hash": r.hgetall, "set": r.smembers,
                "list": lambda k: r.lrange(k, 0, -1), "zset": lambda k: r.zrange(k, 0, -1, withscores=True),
            }.get(kind, lambda k: asyncio.sleep(0, ""))  # fmt: skip
            blob = (key + repr(await value(key)).encode()).lower()
            for m in found:
                if m.encode() in blob:
                    found[m].add(key.decode())
    finally:
        await r.aclose()
    return found


async def opened_chain(infra: Infra, tenant: str) -> list[dict[str, Any]]:
    nc = await infra.admin()
    try:
        return await audit.chain_opened(nc, tenant, infra.ids.auditor_key(tenant))
    finally:
        await nc.close()


async def raw_chain(infra: Infra, tenant: str) -> list[dict[str, Any]]:
    nc = await infra.admin()
    try:
        return [json.loads(s.data) for s in await audit.chain(nc, tenant)]
    finally:
        await nc.close()


def test_erasing_a_tenant_leaves_nothing_of_it_readable_and_the_other_tenant_whole(infra, mesh, backend, capsys):
    async def seed(tenant: str) -> None:
        m = MARK[tenant]
        async with infra.client(tenant) as c:
            got = await c.ingest(f"notes/{m}.md", f"# The {m} procedure\n\nThe {m} procedure keeps side effects "
                                 "exactly once: every effect has an idempotency key.".encode(), "text/markdown")  # fmt: skip
            assert got is not None and got.ok, got
            run = await c.submit(goal(tenant), task_id=f"{tenant}-e1", timeout=90)
        assert isinstance(run.outcome, TaskCompleted), run.outcome

    async def main() -> None:
        for tenant in MARK:
            await seed(tenant)
        await asyncio.sleep(1.5)  # the budget's settlement, the spans' export
        assert (await outbox_effects(infra, "acme"))["acme-e1"] == 1, (
            "the email went out: its arguments hold the marker"
        )

        # Before: the scan finds each marker where it is kept clear (it can find them), and nowhere
        # the tenant's content is sealed at rest.
        before, rbefore = await broker_holds(infra), await redis_holds(infra)
        for tenant, m in MARK.items():
            streams = {p.split()[0] for p in before[m]}
            # the sent email (the outside world), a document's name (its id, in the ingest answer)
            assert {"OUTBOX", "RAG"} <= streams, (tenant, sorted(streams))
            sealed_places = {"TASK", "STEP", "TOOL", "CHECK", "AUDIT", "KV_tasks", "KV_steps", "KV_calls", "KV_ledger",
                             "KV_evidence", "KV_approvals", "KV_rag"}  # fmt: skip
            assert not streams & sealed_places, (tenant, sorted(streams & sealed_places))
        done = await infra.stored("TASK", "task.v1.acme.acme-e1.submitted")
        assert done and MARK["acme"] in cast(TaskSubmitted, TaskSubmitted.parse(done[-1].data)).goal.lower()
        assert not rbefore[MARK["acme"]], "the retrieval cache holds the passages sealed (the erasure deletes its keys)"
        chain = await opened_chain(infra, "acme")
        args = [r["detail"]["arguments"] for r in chain if "arguments" in r["detail"]]
        assert args and MARK["acme"] in json.dumps(args), "with the auditor key, the sealed arguments open"
        raw = [r for r in await raw_chain(infra, "acme") if "arguments" in r["detail"]]
        assert raw and all(sealing.is_sealed(r["detail"]["arguments"]) for r in raw)

        # Bad input: one line, nothing erased.
        capsys.readouterr()
        with pytest.raises(SystemExit):
            ctl(infra, "tenant", "erase", "acme")
        assert "cannot be undone: confirm with --confirm acme" in capsys.readouterr().err
        assert await asyncio.to_thread(ctl, infra, "tenant", "erase", "nobody", "--confirm", "nobody") == 2
        assert "unknown tenant 'nobody'" in capsys.readouterr().err
        assert (await broker_holds(infra))[MARK["acme"]] == before[MARK["acme"]]

        key_before = TrustBundle.from_file(infra.ids.trust_bundle).data_keys["acme"].split(".")[0]
        assert await asyncio.to_thread(ctl, infra, "tenant", "erase", "acme", "--confirm", "acme", "--json") == 0
        report = json.loads(capsys.readouterr().out)
        assert report["key_destroyed"] and report["purged"] > 50 and report["redis_keys"] >= 1, report
        assert report["data_key_destroyed"], report
        assert await asyncio.to_thread(ctl, infra, "tenant", "show", "acme", "--json") == 0
        assert json.loads(capsys.readouterr().out)["data_key"] not in (None, key_before), "a new key, not the old"
        with pytest.raises(ContractError, match=r"does not hold \(the tenant was erased"):
            TaskSubmitted.parse(done[-1].data)  # a copy kept anywhere (a backup) no longer opens
        assert not infra.ids.auditor_key("acme").exists()
        assert "acme" not in TrustBundle.from_file(infra.ids.trust_bundle).auditors
        stored = json.loads(Path(report["report"]).read_text())
        assert stored["sha256"] == report["sha256"] and stored["purged"] == report["purged"]
        await asyncio.sleep(1.0)  # the services' spans of the last moments exported

        # After: nothing of acme readable anywhere; globex's where it was.
        after, rafter = await broker_holds(infra), await redis_holds(infra)
        assert not after[MARK["acme"]], sorted(after[MARK["acme"]])
        assert not rafter[MARK["acme"]], sorted(rafter[MARK["acme"]])
        assert MARK["acme"] not in json.dumps(backend.spans).lower(), "exported spans carry no tenant content"
        assert MARK["acme"] not in json.dumps(report).lower()
        assert after[MARK["globex"]] >= before[MARK["globex"]] and rafter[MARK["globex"]] == rbefore[MARK["globex"]]

        # Both chains verify; acme's is whole, ends with the erasure, and its content is unreadable.
        for tenant in MARK:
            assert await asyncio.to_thread(ctl, infra, "audit", "verify", "--tenant", tenant) == 0
            assert "whole" in capsys.readouterr().out
        chain = await opened_chain(infra, "acme")
        assert chain[-1]["kind"] == "tenant.erased" and chain[-1]["detail"]["report_sha256"] == report["sha256"]
        assert MARK["acme"] not in json.dumps(chain)
        assert {r["detail"]["arguments"] for r in chain if "arguments" in r["detail"]} == {sealing.CLOSED}
        assert MARK["globex"] in json.dumps(await opened_chain(infra, "globex")), "globex's chain still opens"

        # acme goes on (an erasure is of its data, not of its access): a new task's links withhold
        # its content (no key to seal to), and nothing of the erased document comes back.
        async with infra.client("acme") as c:
            run = await c.submit("How does AgentMesh avoid duplicate side effects? Also compute 17 * 23, and email "
                                 "the answer to ops@acme.test.", task_id="acme-e2", timeout=90)  # fmt: skip
        assert isinstance(run.outcome, TaskCompleted), run.outcome
        new = [r for r in await raw_chain(infra, "acme") if r["task_id"] == "acme-e2" and "arguments" in r["detail"]]
        assert new and all(r["detail"]["arguments"] == {"sealed": ""} for r in new), new
        assert not (await broker_holds(infra))[MARK["acme"]]

    asyncio.run(main())


def test_an_erasure_refuses_a_tenant_with_tasks_running_unless_told(infra, mesh, capsys):
    async def main() -> None:
        async with infra.client("initech") as c:
            waiting = asyncio.create_task(c.submit(goal("globex"), task_id="initech-w", timeout=90))
            deadline = time.monotonic() + 60
            while not await infra.stored("TASK", "task.v1.initech.initech-w.drafted"):  # waits for its reviewer
                assert time.monotonic() < deadline, "the plan under review was not drafted"
                await asyncio.sleep(0.2)
            capsys.readouterr()
            assert await asyncio.to_thread(ctl, infra, "tenant", "erase", "initech", "--confirm", "initech") == 2
            assert "initech has 1 tasks running (initech-w)" in capsys.readouterr().err
            assert "initech" in TrustBundle.from_file(infra.ids.trust_bundle).auditors, "nothing erased"
            assert await infra.stored("TASK", "task.v1.initech.initech-w.drafted")

            # Redis out of reach: the rest is done and reported, the exit says it is not complete.
            wrong = f"redis://admin:wrong@127.0.0.1:{infra.redis_port}/0"
            args = ("tenant", "erase", "initech", "--confirm", "initech", "--even-running")
            assert await asyncio.to_thread(ctl, infra, *args, "--redis-url", wrong) == 1
            said = capsys.readouterr()
            assert "the erasure of initech is not complete: Redis not reached" in said.err, said
            assert "erased initech:" in said.out and "auditor key destroyed" in said.out
            assert not await infra.stored("TASK", "task.v1.initech.initech-w.drafted")
            # Run again to finish: every step is idempotent (the key is gone already).
            assert await asyncio.to_thread(ctl, infra, *args, "--json") == 0
            again = json.loads(capsys.readouterr().out)
            assert again["complete"] and not again["key_destroyed"] and again["redis"].startswith("127.0.0.1:")
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting

    asyncio.run(main())


def test_a_backup_from_before_an_erasure_restores_the_tenants_data_still_sealed(infra, mesh, tmp_path, capsys):
    """A backup taken before the erasure holds the tenant's messages sealed and the trust bundle of
    its time (with the tenant's old wrapped key). Restored, its messages come back and stay
    unreadable: the restore keeps the home's bundle, not the backup's, and no older revision of it."""

    async def main() -> None:
        async with infra.client("globex") as c:
            run = await c.submit(goal("globex"), task_id="globex-b1", timeout=90)
        assert isinstance(run.outcome, TaskCompleted), run.outcome
        old = TrustBundle.from_file(infra.ids.trust_bundle).data_keys["globex"]
        out = tmp_path / "before.tar"
        assert await asyncio.to_thread(ctl, infra, "backup", "--out", str(out)) == 0
        assert await asyncio.to_thread(ctl, infra, "tenant", "erase", "globex", "--confirm", "globex") == 0
        assert not await infra.stored("TASK", "task.v1.globex.globex-b1.submitted")

        args = ("restore", str(out), "--replace", "--stream", "KV_trust", "--stream", "TASK")
        assert await asyncio.to_thread(ctl, infra, *args) == 0
        capsys.readouterr()
        (back,) = await infra.stored("TASK", "task.v1.globex.globex-b1.submitted")
        assert MARK["globex"].encode() not in back.data.lower()
        with pytest.raises(ContractError, match=r"does not hold \(the tenant was erased"):
            TaskSubmitted.parse(back.data)
        nc = await infra.admin()
        try:
            kv = await nc.jetstream().key_value("trust")
            history = await kv.history("bundle")
            published = TrustBundle.from_json(json.loads(history[-1].value)["bundle"])
        finally:
            await nc.close()
        assert len(history) == 1, "no revision of the bundle holding the old key is left"
        assert published.data_keys["globex"] == TrustBundle.from_file(infra.ids.trust_bundle).data_keys["globex"]
        assert published.data_keys["globex"] != old
        async with infra.client("acme") as c:  # the mesh goes on: another tenant's task after the restore
            run = await c.submit("What is 6 * 7?", task_id="acme-after-restore", timeout=90)
        assert isinstance(run.outcome, TaskCompleted), run.outcome

    asyncio.run(main())
