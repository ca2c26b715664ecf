"""One tenant must not be able to take the mesh down (issue 36), through the real mesh.

The attack that found the hole: with its own client credentials and no valid token, a tenant
published 487 messages of 1.1 MB on its own ``task.submitted`` subject; TASK and the DLQ filled and
every tenant's submissions were refused for a week. Here the streams' caps are 16 MiB, so a
tenant's default quota (an eighth of a cap) is 2 MiB, and a flooding tenant (``evil``):

- without a valid token, stores nothing at all: every message is refused at the door;
- with valid messages, fills each stream it writes to (TASK: submissions; CONTROL: halts and
  cancels; RAG: ingests) up to its own quota and no further, and is refused with
  ``quota_exceeded`` and a ``retry_after_s``; a tenant whose ingest rate is 1 MiB a minute is
  refused with ``rate_limited``;

while another tenant (``quiet``) submits, ingests and cancels as if nothing happened. (How long
its tasks take during a flood is measured by ``bench/bench_flood.py``, not asserted here: a
wall-clock ratio on a shared machine is a benchmark, not a test.)
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections import Counter
from collections.abc import Iterator

import nats
import pytest

from mesh_contracts import Contract
from mesh_contracts.topology import door_subject
from mesh_contracts.v1 import (
    ControlHalt,
    IngestRequested,
    TaskCompleted,
    TaskFailed,
    TaskSubmitted,
)
from mesh_kit import envelope as env
from mesh_tenancy.door import DoorRefused
from mesh_testing.chaos import ChaosMesh, report, started
from mesh_testing.infra import Infra, running_infra
from meshctl.client import TenantClient

pytestmark = pytest.mark.e2e
EVIL, QUIET, SLOW = "evil", "quiet", "slow"
MIB = 1 << 20
CAP = 16 * MIB
QUOTA = CAP // 8  # MESH_QUOTA_SHARE's default
ENV = {
    "MESH_LOG_LEVEL": "WARNING",
    "MESH_RAG_SEED_TENANTS": "",
    # Held bytes are what is under test: the per-minute rates out of the way (but for SLOW's ingests).
    "MESH_QUOTA_MIB_PER_MIN": json.dumps({"TASK": 64, "CONTROL": 64, "RAG": 64, "DLQ": 64}),
    "MESH_QUOTA_TENANTS": json.dumps({SLOW: {"RAG": {"mib_per_min": 1}}}),
    # The flooder's valid submissions are stored (and charged), then refused by admission: they
    # would otherwise run, and this test is about what a tenant can make the mesh store.
    "MESH_ADMISSION_TENANTS": json.dumps({EVIL: {"max_in_flight": 1}}),
}
STREAMS = ("TASK", "CONTROL", "RAG", "DLQ")
GOAL = "What is 6 * 7?"


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra([EVIL, QUIET, SLOW], name="quotas") as infra:
        asyncio.run(_cap_streams(infra))
        yield infra


@pytest.fixture(scope="module")
def mesh(infra) -> Iterator[ChaosMesh]:
    with started(infra, ENV) as m:
        yield m


async def _cap_streams(infra: Infra) -> None:
    nc = await infra.admin()
    try:
        js = nc.jetstream()
        for stream in STREAMS:
            info = await js.stream_info(stream)
            info.config.max_bytes = CAP
            await js.update_stream(info.config)
    finally:
        await nc.close()


async def _levels(infra: Infra) -> dict[str, int]:
    nc = await infra.admin()
    try:
        return {s: (await nc.jetstream().stream_info(s)).state.bytes for s in STREAMS}
    finally:
        await nc.close()


async def _flood(client: TenantClient, messages: list[Contract], concurrency: int = 16) -> tuple[int, Counter[str]]:
    """Hand every message in at its door; (bytes stored, refusals by code)."""
    stored, refused, gate = 0, Counter[str](), asyncio.Semaphore(concurrency)

    async def one(m: Contract) -> None:
        nonlocal stored
        async with gate:
            try:
                ack = await client.publish(m, key=uuid.uuid4().hex[:12], within_s=5.0)
            except DoorRefused as exc:
                refused[exc.code] += 1
                assert exc.code in ("rate_limited", "busy") or exc.retry_after_s > 0 or "whole quota" in exc.reason
                return
            if not ack.duplicate:
                stored += len(m.to_bytes())

    await asyncio.gather(*(one(m) for m in messages))
    return stored, refused


async def _a_quiet_task_completes(infra: Infra, task_id: str) -> None:
    async with infra.client(QUIET) as c:
        run = await c.submit(GOAL, task_id=task_id, progress=False, timeout=120)
    assert isinstance(run.outcome, TaskCompleted), run.outcome


async def test_a_tenant_without_a_valid_token_stores_nothing_at_all(infra, mesh):
    """The issue's attack, as it was made: the tenant's own credentials, its own subject, no valid
    token, bodies of 1.1 MB (and valid bodies of 9 KB). Every one is refused at the door, with the
    reason (the contract's limit, the token); TASK and the DLQ hold not one byte more."""
    before = await _levels(infra)
    nc = await nats.connect(infra.nats_url, **infra.ids.connect_options(f"client.{EVIL}"))
    refused: Counter[str] = Counter()
    try:
        js = nc.jetstream(timeout=5)
        for i in range(60):
            size = 1_100_000 if i % 2 else 9_000
            body = json.dumps({"type": "task.submitted", "tenant": EVIL, "task_id": f"big-{i}", "goal": "x" * size})
            headers = {env.MSG_ID: f"big-{i}", env.SCHEMA: "task.submitted/v1", env.IDENTITY: "not-a-token"}
            with pytest.raises(nats.js.errors.APIError) as exc:  # JetStream's own error shape
                await js.publish(door_subject(f"task.v1.{EVIL}.big-{i}.submitted"), body.encode(), headers=headers)
            refused[exc.value.description.split(":")[0]] += 1
            if i < 4:
                with pytest.raises(nats.errors.TimeoutError):  # and onto the stream itself: denied
                    await js.publish(f"task.v1.{EVIL}.big-{i}.submitted", body.encode(), headers=headers, timeout=0.5)
    finally:
        await nc.close()
    after = await _levels(infra)
    report("quota: no valid token", refused=dict(refused), task_bytes=after["TASK"] - before["TASK"])
    assert refused == {"invalid": 30, "forbidden": 30}, refused  # 1.1 MB: over the contract; 9 KB: no token
    assert after["TASK"] == before["TASK"] and after["DLQ"] == before["DLQ"]
    await _a_quiet_task_completes(infra, "quiet-after-tokenless")


def _submission(i: int) -> TaskSubmitted:
    return TaskSubmitted(tenant=EVIL, task_id=f"flood-{i}", goal=f"{i} " + "Please summarise this. " * 430)


def _halt(i: int) -> ControlHalt:
    return ControlHalt(tenant=EVIL, task_id=f"ctl-{i}", reason="stop " * 3000)


def _ingest(tenant: str, i: int, size: int) -> IngestRequested:
    # Not base64: rag answers it (ok false) at once instead of embedding megabytes, and it is as big
    # in the stream as a real document.
    return IngestRequested(
        tenant=tenant, task_id=f"ing-{i}", doc_id=f"d{i}.md", media_type="text/plain", content_b64="!" * size
    )


@pytest.mark.parametrize(
    "stream, make",
    [("TASK", _submission), ("CONTROL", _halt), ("RAG", lambda i: _ingest(EVIL, i, 300_000))],
    ids=["TASK", "CONTROL", "RAG"],
)
async def test_a_flood_of_valid_messages_stops_at_the_flooders_own_quota(infra, mesh, stream, make):
    """Valid messages, as many as three quotas' worth: the door stores them up to the flooder's
    quota and refuses the rest with ``quota_exceeded``; the stream holds no more of them than the
    quota, and the quiet tenant's work goes on during the flood and after it."""
    per = len(make(0).to_bytes())
    count = 3 * QUOTA // per + 1
    before = await _levels(infra)
    async with infra.client(EVIL) as evil:
        flooding = asyncio.create_task(_flood(evil, [make(i) for i in range(count)]))
        await _a_quiet_task_completes(infra, f"quiet-during-{stream.lower()}")
        stored, refused = await flooding
        with pytest.raises(DoorRefused) as again:  # and it stays refused
            await evil.publish(make(count), key="once-more", within_s=1.0)
    after = await _levels(infra)
    report(f"quota flood {stream}", sent=count, message_bytes=per, stored_bytes=stored, quota=QUOTA,
           refused=dict(refused), grew=after[stream] - before[stream])  # fmt: skip
    assert again.value.code == "quota_exceeded" and again.value.retry_after_s > 0, again.value
    assert refused["quota_exceeded"] >= count // 2, refused
    assert 0.75 * QUOTA < stored <= QUOTA, (stored, QUOTA)  # (the quota counts headers and subjects too)
    # what the stream holds of it: the bodies, their headers and subjects (the quota charges all three)
    assert after[stream] - before[stream] <= QUOTA + 64 * 1024, (after[stream] - before[stream], QUOTA)
    assert after["DLQ"] == before["DLQ"], "nothing refused at a door is dead-lettered"
    await _the_quiet_tenant_is_untouched(infra, stream)


async def _the_quiet_tenant_is_untouched(infra: Infra, stream: str) -> None:
    """What the quiet tenant does in the stream the flooder filled its share of."""
    async with infra.client(QUIET) as quiet:
        if stream == "TASK":
            await _a_quiet_task_completes(infra, "quiet-after-task-flood")
        elif stream == "CONTROL":
            run = asyncio.create_task(quiet.submit("Wait for approval " * 3, task_id="to-cancel", timeout=180))
            await asyncio.sleep(0.2)
            answer = await quiet.control(
                "cancel", "to-cancel", "changed my mind", timeout=120
            )  # a bound on an event, not a speed
            await run
            assert isinstance(answer, TaskFailed | TaskCompleted), answer  # cancelled, or done first
        else:
            text = base64.b64encode(b"# Refunds\n\nRefunds are paid within thirty days.").decode()
            req = IngestRequested(tenant=QUIET, task_id="quiet-doc", doc_id="refunds.md", media_type="text/markdown",
                                  content_b64=text)  # fmt: skip
            ack = await quiet.publish(req, key="quiet-doc")
            assert ack.stream == "RAG" and not ack.duplicate


async def test_ingest_bytes_per_minute_are_limited_per_tenant(infra, mesh):
    """``slow`` may ingest 1 MiB a minute: four ingests of 400 KB in a row (300,000 characters, which
    the client seals with the tenant's data key into 400 KB as stored), the third is refused
    ``rate_limited`` with the seconds until its bytes are allowed; ``quiet`` is not."""
    async with infra.client(SLOW) as slow:
        stored, refused = await _flood(slow, [_ingest(SLOW, i, 300_000) for i in range(4)], concurrency=1)
    assert refused == {"rate_limited": 2} and 700_000 < stored < 1_000_000, (stored, refused)
    async with infra.client(QUIET) as quiet:
        stored, refused = await _flood(quiet, [_ingest(QUIET, 100 + i, 300_000) for i in range(4)], concurrency=1)
    assert not refused and stored > 1_500_000


async def test_a_tenant_whose_tasks_stored_too_much_in_a_stream_it_never_writes_to_is_refused(infra, mesh):
    """A tenant writes only TASK, CONTROL and RAG, but its tasks make the worker, the tool-executor
    and the planner store step outputs, tool results and check requests in STEP, TOOL and CHECK.
    Every service counts what it stores for a tenant in the quota book; when a tenant's share of a
    stream is used up (here: the worker's record says 70 MiB of STEP, over an eighth of its 512 MiB),
    the doors refuse its new messages, naming the stream; another tenant is untouched."""
    from mesh_host import Mesh
    from mesh_tenancy.quota import Quotas, limits_from

    worker = Mesh(infra.ids.settings("worker", infra.nats_url))
    await worker.connection.connect()
    try:
        book = Quotas(lambda: worker.nc, await worker.kv("quotas"), "worker", limits_from(0.125, {}, {}))
        book.induced(SLOW, "STEP", 70 * MIB)  # as if its tasks' step outputs had taken that much
        await book.flush()
    finally:
        await worker.connection.close()
    async with infra.client(SLOW) as slow:
        refused = await slow.submit(GOAL, task_id="slow-after-steps", progress=False, timeout=30)
    assert refused.outcome is not None and refused.outcome.code == "quota_exceeded", refused.outcome
    assert "what its tasks stored in STEP (70.0 MiB" in refused.outcome.reason, refused.outcome.reason
    assert refused.outcome.retry_after_s and refused.outcome.retry_after_s > 3600
    await _a_quiet_task_completes(infra, "quiet-after-steps")


async def test_the_quota_book_says_what_each_tenant_holds_and_what_it_was_refused(infra, mesh):
    """What ``meshctl status`` shows (its QUOTAS table), read from KV ``quotas`` as an operator."""
    from meshctl.budget import scan
    from meshctl.quotas import summarise

    await asyncio.sleep(6)  # the services write the refusals they answered from memory every 5 s
    nc = await infra.admin()
    try:
        rows = {(q.tenant, q.stream): q for q in summarise(await scan(nc, "quotas", ">"))}
    finally:
        await nc.close()
    for stream in ("TASK", "CONTROL", "RAG"):
        q = rows[(EVIL, stream)]
        # (over it by what the services stored for it since its last charge: rejections, answers)
        assert q.limit_bytes == QUOTA and 0.75 * QUOTA < q.bytes <= QUOTA + 64 * 1024, q
        assert q.refused.get("quota_exceeded"), q
    assert rows[(SLOW, "RAG")].refused == {"rate_limited": 2}  # (the second from memory, written by the flush)
    assert not rows[(QUIET, "TASK")].refused and rows[(QUIET, "TASK")].msgs >= 3
