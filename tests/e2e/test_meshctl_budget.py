"""`meshctl budget` and `meshctl kill-switch` against a real nats-server (binaries).

The records are written as the budget service writes them (JSON in the ``budget`` bucket);
the kill switch is read back through the same guard every service consults.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from nats.js.errors import KeyNotFoundError

from mesh_durable.guard import CONTROL_BUCKET, GLOBAL_KEY, Guard, tenant_key
from mesh_durable.view import KeyView
from mesh_testing.infra import Infra, running_infra
from meshctl.cli import main

pytestmark = pytest.mark.e2e

DAY = "20260101"


def usage(inp: int, out: int, cost: float, calls: int) -> dict:
    return {"input_tokens": inp, "output_tokens": out, "cached_input_tokens": 0, "cost_usd": cost, "calls": calls}


TASK = {
    "tenant": "acme",
    "task_id": "t1",
    "total": usage(1234, 567, 0.0123456, 3),
    "by_agent": {"planner/planner": usage(234, 67, 0.0023456, 1), "worker/worker": usage(1000, 500, 0.01, 2)},
    "by_step": {"plan": usage(234, 67, 0.0023456, 1), "s1": usage(1000, 500, 0.01, 2)},
    "by_model": {"scripted/fast": usage(1234, 567, 0.0123456, 3)},
    "errors": 0,
    "call_ids": ["c1", "c2", "c3"],
    "updated_at": 1767225600.0,
}
CHEAP = {**TASK, "task_id": "t2", "total": usage(10, 5, 0.0001, 1), "by_agent": {}, "by_step": {}, "by_model": {}}
DAY_USAGE = {
    "tenant": "acme",
    "day": DAY,
    "total": usage(1244, 572, 0.0124456, 4),
    "by_agent": {"worker/worker": usage(1010, 505, 0.0101, 3), "planner/planner": usage(234, 67, 0.0023456, 1)},
    "by_model": {"scripted/fast": usage(1244, 572, 0.0124456, 4)},
    "tasks": 2,
}


async def put(infra: Infra, bucket: str, records: dict[str, dict]) -> None:
    nc = await infra.admin()
    try:
        kv = await nc.jetstream().key_value(bucket)
        for key, value in records.items():
            await kv.put(key, json.dumps(value).encode())
    finally:
        await nc.close()


async def switch(infra: Infra, tenant: str) -> tuple[dict | None, str | None]:
    """The stored global switch, and what a service's guard decides for ``tenant``."""
    nc = await infra.admin()
    try:
        kv = await nc.jetstream().key_value(CONTROL_BUCKET)
        try:
            stored = json.loads((await kv.get(GLOBAL_KEY)).value or b"null")
        except KeyNotFoundError:  # never written, or deleted
            stored = None
        guard = Guard(mesh=None)  # type: ignore[arg-type]
        guard.switch_view = KeyView(nc, kv, CONTROL_BUCKET, max_age_s=0)  # no memory: reads the bucket
        stop = await guard.kill_switch(tenant)
        return stored, stop.reason if stop else None
    finally:
        await nc.close()


async def audited(infra: Infra, tenant: str, kind: str) -> dict:
    """The last record of ``kind`` in the tenant's audit chain."""
    from meshctl import audit

    nc = await infra.admin()
    try:
        records = await audit.chain_opened(nc, tenant, infra.ids.auditor_key(tenant))
    finally:
        await nc.close()
    return next(r for r in reversed(records) if r["kind"] == kind)


@pytest.fixture(scope="module")
def infra():
    with running_infra(["acme", "globex"], mode="binaries", name="budget") as infra:
        yield infra


def row(text: str, section: str, name: str) -> list[str]:
    """The cells of ``name``'s row in the table headed ``section``."""
    block = text.split(section, 1)[1].split("\n\n", 1)[0]
    return next(line.split() for line in block.splitlines() if line.split()[:1] == [name])


def run(infra: Infra, capsys, *args: str) -> tuple[int, str, str]:
    code = main(["--home", str(infra.home), *args, "--nats-url", infra.nats_url])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_budget_reads_task_tenant_and_day_records(infra, capsys):
    asyncio.run(
        put(
            infra,
            "budget",
            {
                "usage.acme.t1": TASK,
                "usage.acme.t2": CHEAP,
                f"tenant.acme.{DAY}": DAY_USAGE,
                f"tenant.globex.{DAY}": {**DAY_USAGE, "tenant": "globex", "total": usage(7, 8, 0.5, 1), "tasks": 1},
            },
        )
    )

    code, out, _ = run(infra, capsys, "budget", "--tenant", "acme", "--task", "t1")
    assert code == 0
    assert out.startswith("task acme/t1: 1234 tokens in, 567 out, 3 calls, $0.012346")
    assert row(out, "BY AGENT", "worker/worker")[1:] == ["1000", "500", "2", "0.010000"]
    assert row(out, "BY AGENT", "planner/planner")[1:] == ["234", "67", "1", "0.002346"]
    assert row(out, "BY STEP", "s1")[1:] == ["1000", "500", "2", "0.010000"]
    assert row(out, "BY MODEL", "scripted/fast")[1:] == ["1234", "567", "3", "0.012346"]

    code, out, _ = run(infra, capsys, "budget", "--tenant", "acme", "--task", "t1", "--json")
    assert code == 0 and json.loads(out) == TASK

    code, out, _ = run(infra, capsys, "budget", "--tenant", "acme", "--day", DAY)
    assert code == 0
    assert out.startswith(f"tenant acme on {DAY} (UTC): 1244 tokens in, 572 out, 4 calls, $0.012446, 2 tasks")
    assert row(out, "BY MODEL", "scripted/fast")[1:] == ["1244", "572", "4", "0.012446"]
    tasks = out.split("UPDATED (UTC)")[1].split()
    assert tasks.index("t1") < tasks.index("t2"), "most expensive first"
    assert "tasks: 2 of 2" in out and row(out, "UPDATED (UTC)", "t2")[1:5] == ["10", "5", "1", "0.000100"]

    code, out, _ = run(infra, capsys, "budget", "--tenant", "acme")  # today: nothing spent, tasks retained
    assert code == 0 and out.splitlines()[0].endswith("(UTC): no spend recorded") and "tasks: 2 of 2" in out

    code, out, _ = run(infra, capsys, "budget", "--tenant", "acme", "--day", DAY, "--json")
    assert code == 0 and json.loads(out) == {"day": DAY_USAGE, "tasks": [TASK, CHEAP]}

    code, out, _ = run(infra, capsys, "budget", "--day", DAY)
    assert code == 0
    rows = [line.split() for line in out.split("TASKS")[1].strip().splitlines()]
    assert rows == [["acme", "1244", "572", "4", "0.012446", "2"], ["globex", "7", "8", "1", "0.500000", "1"]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tenant", "acme", "--task", "nope"], "no usage recorded for task acme/nope"),
        (["--tenant", "globex"], "no usage recorded for tenant globex"),
        (["--day", "19990101"], "no usage recorded on 19990101"),
    ],
)
def test_budget_without_a_record_is_one_line_and_exit_1(infra, capsys, args, message):
    code, out, err = run(infra, capsys, "budget", *args)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"meshctl: {message}"), err


def test_kill_switch_round_trips_through_the_control_bucket(infra, capsys):
    code, out, _ = run(infra, capsys, "kill-switch", "status")
    assert code == 0 and out.strip() == "no kill switch is on"

    code, out, _ = run(infra, capsys, "kill-switch", "on", "--reason", "incident 42")
    assert code == 0 and out.startswith("kill switch (global) on")
    stored, refused = asyncio.run(switch(infra, "acme"))
    assert stored is not None and stored["reason"] == "incident 42" and stored["by"] == "admin"
    assert refused == "kill switch (global) is on: incident 42"

    code, out, _ = run(infra, capsys, "kill-switch", "on", "--tenant", "globex", "--reason", "runaway spend")
    assert code == 0
    code, out, _ = run(infra, capsys, "kill-switch", "status")
    lines = out.strip().splitlines()
    assert lines[0].split() == ["SWITCH", "AGE", "BY", "REASON"]
    assert lines[1].split() == ["global", "0s", "admin", "incident", "42"]
    assert lines[2].split() == ["tenant", "globex", "0s", "admin", "runaway", "spend"]
    code, out, _ = run(infra, capsys, "kill-switch", "status", "--tenant", "acme")
    assert "globex" not in out and "global" in out

    code, out, _ = run(infra, capsys, "kill-switch", "off")
    assert code == 0 and out.strip() == "kill switch (global) off"
    stored, refused = asyncio.run(switch(infra, "acme"))
    assert stored is None and refused is None
    _, refused = asyncio.run(switch(infra, "globex"))
    assert refused == "kill switch (tenant globex) is on: runaway spend"

    code, out, _ = run(infra, capsys, "kill-switch", "off", "--tenant", "globex", "--reason", "spend capped")
    assert code == 0 and out.strip() == "kill switch (tenant globex) off"
    lifted = asyncio.run(audited(infra, "globex", "control.kill-switch-off"))
    assert lifted["detail"]["reason"] == "spend capped", "why it was lifted is in the tenant's audit chain"
    code, out, _ = run(infra, capsys, "kill-switch", "off", "--tenant", "globex")
    assert code == 0 and out.strip() == "kill switch (tenant globex) off (it was not on)"
    code, out, _ = run(infra, capsys, "kill-switch", "status")
    assert out.strip() == "no kill switch is on"
    _, refused = asyncio.run(switch(infra, "globex"))
    assert refused is None
    assert tenant_key("globex") == "kill.tenant.globex"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["budget", "--task", "t1"], "--task needs --tenant"),
        (["kill-switch", "on"], "'on' needs --reason"),
        (["kill-switch", "on", "--tenant", "initech", "--reason", "x"], "unknown tenant 'initech'"),
    ],
)
def test_bad_arguments_exit_nonzero_with_one_line(infra, capsys, args, message):
    try:
        code = main(["--home", str(infra.home), *args, "--nats-url", infra.nats_url])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
