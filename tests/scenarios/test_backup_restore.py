"""Backup and restore drill through the real mesh (issue 42, item 5).

Tasks are running (held at their tool call: the tool-executor is down) when ``meshctl backup``
runs. Then the broker's whole store is destroyed and Redis restarted empty; a new broker is
provisioned and the services started (``meshctl up`` on a new machine), ``meshctl restore
--replace`` puts the backup in, and every task that was running completes, with its email sent exactly once. A task submitted after the backup is gone (that is
the recovery point); the audit chain verifies whole. The recovery time is measured and reported.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tarfile
import time
from collections.abc import Iterator

import pytest

from mesh_contracts.v1 import TaskCompleted
from mesh_testing.chaos import ChaosMesh, outbox_effects, report, started
from mesh_testing.infra import Infra, running_infra
from meshctl import backup as backup_lib
from meshctl.cli import main as cli_main
from meshctl.provision import provision_as_admin

pytestmark = pytest.mark.chaos
ENV = {"MESH_ACK_WAIT_S": "2", "MESH_LOG_LEVEL": "WARNING"}
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23, and email the answer to ops@acme.test."
RUNNING = [f"bk-run-{i}" for i in range(4)]


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme"], mode="binaries", name="backup", ack_wait_s=2.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra) -> Iterator[ChaosMesh]:
    with started(infra, ENV) as m:
        yield m


def ctl(infra: Infra, *args: str) -> int:
    return cli_main(["--home", str(infra.home), *args, "--nats-url", infra.nats_url])


async def has(infra: Infra, stream: str, subject: str) -> bool:
    return bool(await infra.stored(stream, subject))


async def until(check, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.25)


def test_a_backup_taken_while_tasks_run_restores_into_a_new_broker_and_they_complete_once(
    infra, mesh, tmp_path, capsys
):
    async def main() -> None:
        async with infra.client("acme") as c:
            assert isinstance((await c.submit(GOAL, task_id="bk-done", timeout=90)).outcome, TaskCompleted)

        # Running: the tool-executor is down, so each task waits at its tool call.
        mesh.kill("tool-executor-0")
        async with infra.client("acme") as c:
            for task in RUNNING:
                await c.submit(GOAL, task_id=task, follow=False)
        for task in RUNNING:
            await until(lambda t=task: has(infra, "TOOL", f"tool.v1.acme.{t}.>"), f"{task} reached its tool call")

        backup = tmp_path / "mesh.tar"
        capsys.readouterr()
        t0 = time.monotonic()
        assert await asyncio.to_thread(ctl, infra, "backup", "--out", str(backup), "--json") == 0
        backup_s = time.monotonic() - t0
        made = json.loads(capsys.readouterr().out)
        assert oct(backup.stat().st_mode & 0o777) == "0o600", "a backup holds every tenant's data"
        assert "OUTBOX" not in made["streams"], "the outside world is not rewound"
        assert made["streams"]["TASK"]["messages"] > 0 and made["streams"]["KV_ledger"]["consumers"] == 0
        assert list(made["streams"])[-2:] == ["KV_anchors", "AUDIT"], "the chain and its anchors last"

        # After the backup: a task the restore will not know of (the recovery point).
        async with infra.client("acme") as c:
            await c.submit(GOAL, task_id="bk-after", follow=False)
        await until(lambda: has(infra, "TASK", "task.v1.acme.bk-after.>"), "bk-after stored")
        before = await outbox_effects(infra, "acme")
        assert before["bk-done"] == 1 and not any(before[t] for t in RUNNING)

        # Disaster: the broker's store is gone, Redis restarts empty, every service stops.
        await mesh.stop()
        infra.kill_nats(0)
        shutil.rmtree(infra.home / "nats" / "jetstream")
        (infra.home / "nats" / "jetstream").mkdir()
        infra.kill_redis()
        await infra.start_redis()
        await infra.start_nats(0)

        # As ``meshctl up`` does on the new machine: provisioned (empty streams), the services up.
        await provision_as_admin(infra.ids, infra.nats_url, ack_wait_s=2.0)
        t1 = time.monotonic()
        mesh.start()
        await mesh.ready()
        ready_s = time.monotonic() - t1

        t0 = time.monotonic()
        assert await asyncio.to_thread(ctl, infra, "restore", str(backup), "--json") == 2, "not over what it holds"
        assert "already holds" in capsys.readouterr().err
        assert await asyncio.to_thread(ctl, infra, "restore", str(backup), "--replace", "--json") == 0
        restore_s = time.monotonic() - t0
        restored = json.loads(capsys.readouterr().out)["streams"]
        assert set(restored) == set(made["streams"])
        assert all(restored[n]["messages"] == made["streams"][n]["messages"] for n in restored), "every message back"
        for task in RUNNING:
            await until(lambda t=task: has(infra, "TASK", f"task.v1.acme.{t}.completed"), f"{task} completed")
        done_s = time.monotonic() - t0

        assert not await has(infra, "TASK", "task.v1.acme.bk-after.>"), "what came after the backup is not in it"
        after = await outbox_effects(infra, "acme")
        assert {t: before[t] + after[t] for t in [*RUNNING, "bk-done"]} == {t: 1 for t in [*RUNNING, "bk-done"]}, (
            before,
            after,
        )
        capsys.readouterr()
        code = await asyncio.to_thread(ctl, infra, "audit", "verify", "--tenant", "acme")
        said = capsys.readouterr().out
        assert code == 0 and "whole" in said, said
        assert "the AUDIT stream was restored at" in said and "(admin's signed statement)" in said, said

        # The same re-creation without the operator's statement is what tampering looks like.
        nc = await infra.admin()
        try:
            await backup_lib.restore(nc, backup, replace=True, only=["AUDIT"])
        finally:
            await nc.close()
        assert await asyncio.to_thread(ctl, infra, "audit", "verify", "--tenant", "acme") == 1
        assert "the stream was re-created and the record put back" in capsys.readouterr().out
        assert await asyncio.to_thread(ctl, infra, "restore", str(backup), "--stream", "AUDIT", "--replace") == 0
        assert await asyncio.to_thread(ctl, infra, "audit", "verify", "--tenant", "acme") == 0, "vouched for again"
        report(
            "backup and restore drill",
            streams=len(made["streams"]),
            backup_bytes=backup.stat().st_size,
            backup_s=round(backup_s, 2),
            restore_s=round(restore_s, 2),
            services_ready_s=round(ready_s, 2),
            restore_to_all_completed_s=round(done_s, 2),
        )

    asyncio.run(main())


def test_a_damaged_backup_restores_nothing_and_says_so(infra, mesh, tmp_path, capsys):
    backup = tmp_path / "b.tar"
    assert ctl(infra, "backup", "--out", str(backup)) == 0
    with tarfile.open(backup) as tar:
        member = tar.getmember("streams/TASK.snapshot")
    data = bytearray(backup.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF  # one bit of the TASK stream's snapshot
    backup.write_bytes(bytes(data))
    capsys.readouterr()
    assert ctl(infra, "restore", str(backup), "--replace") == 2
    assert "does not match its manifest (damaged or altered): nothing restored" in capsys.readouterr().err


def test_the_identities_go_back_into_an_empty_home_first_and_never_over_one(infra, mesh, tmp_path, capsys):
    backup = tmp_path / "with-ids.tar"
    assert ctl(infra, "backup", "--out", str(backup), "--identities") == 0
    assert "identity files (keep it as secret as the keys)" in capsys.readouterr().out
    fresh = tmp_path / "fresh-home"
    assert cli_main(["--home", str(fresh), "restore", str(backup), "--identities"]) == 0
    for name in ("secrets/creds/admin.creds", "secrets/keys/auditor.acme.key", "trust-bundle.json", "tenants.json"):
        assert (fresh / name).read_bytes() == (infra.home / name).read_bytes(), name
        assert oct((fresh / name).stat().st_mode & 0o777) == "0o600", name
    # The restored home speaks as the mesh: its admin reads the broker.
    assert cli_main(["--home", str(fresh), "audit", "verify", "--tenant", "acme", "--nats-url", infra.nats_url]) == 0
    capsys.readouterr()
    assert cli_main(["--home", str(fresh), "restore", str(backup), "--identities"]) == 2
    assert "already holds" in capsys.readouterr().err, "never over a home's keys"
    without = tmp_path / "no-ids.tar"
    assert ctl(infra, "backup", "--out", str(without)) == 0
    assert cli_main(["--home", str(tmp_path / "other"), "restore", str(without), "--identities"]) == 2
    assert "made without --identities" in capsys.readouterr().err


def test_a_home_without_the_ca_gets_one_line_not_a_hang(infra, mesh, tmp_path, capsys, monkeypatch):
    from meshctl.commands import common

    monkeypatch.setattr(common, "CONNECT_WITHIN_S", 3.0)
    partial = tmp_path / "partial-home"
    shutil.copytree(infra.home / "secrets", partial / "secrets")  # the keys, not the CA beside them
    capsys.readouterr()
    t0 = time.monotonic()
    assert cli_main(["--home", str(partial), "audit", "verify", "--tenant", "acme", "--nats-url", infra.nats_url]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - t0 < 30 and "certificate verify failed" in err and "has no CA file" in err, err
