"""The budget follows every task without being able to read what any task is about (issue 36).

Its monitor needs ids, statuses, plan dependencies and whether a call repeats itself; it must not
be able to read a tenant's documents, retrieved passages, tool arguments and results, step
outputs, goals or answers. This is checked through a real broker with the budget's own
generated credentials, as a compromised budget process would try: every stream the broker holds,
every request body a direct get accepts (by sequence, batch, ``next_by_subj``, ``last_by_subj``,
``multi_last``), the stored-message get, and every republished feed it may subscribe to, while
another tenant's content is published by the services and clients that really produce it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import nats
import pytest

from mesh_contracts import topology as topo
from mesh_contracts.v1 import (
    ApprovalRequested,
    CheckRequested,
    IngestRequested,
    PlanCreated,
    PlanStep,
    RetrievalCompleted,
    RetrievalHit,
    RetrievalRequested,
    StepCompleted,
    StepRequested,
    TaskSubmitted,
    ToolCompleted,
    ToolRequested,
)
from mesh_contracts.v1.records import StatusRecord, StepState, TaskRecord
from mesh_identity import Signer
from mesh_kit import envelope as env
from mesh_testing.infra import Infra, running_infra
from mesh_testing.rights import INTENDED

pytestmark = pytest.mark.integration
TENANT = "globex"
SECRET = "SECRET-GLOBEX-7f3a"
MARKERS = (SECRET.encode(), base64.b64encode(SECRET.encode() * 3)[:16])
"""The secret as published, and as it sits inside an ingested document's base64."""


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme", TENANT], name="budget-reads") as infra:
        yield infra


def contents(task: str) -> list[tuple[str, Any]]:
    """(producer, message) for every kind of tenant content that travels on a stream."""
    step = PlanStep(step_id="s1", instruction=f"summarise {SECRET}", tools=("search_docs",))
    hit = RetrievalHit(doc_id="d1", version="v1", chunk_id="c1", chunk_hash="h1", text=f"passage {SECRET}", score=0.9)
    common = {"tenant": TENANT, "task_id": task}
    return [
        ("client", TaskSubmitted(**common, goal=f"goal {SECRET}")),
        (
            "client",
            IngestRequested(
                **common,
                doc_id="d1",
                media_type="text/plain",
                content_b64=base64.b64encode(SECRET.encode() * 3).decode(),
            ),
        ),
        ("planner", PlanCreated(**common, steps=(step,))),
        ("planner", StepRequested(**common, step=step, inputs={"s0": f"input {SECRET}"})),
        ("worker", RetrievalRequested(**common, step_id="s1", call_id="s1-r1", query=f"query {SECRET}")),
        ("rag", RetrievalCompleted(**common, step_id="s1", call_id="s1-r1", hits=(hit,))),
        (
            "worker",
            ToolRequested(
                **common, step_id="s1", call_id="s1-t1", tool="note_write", arguments={"text": f"argument {SECRET}"}
            ),
        ),
        (
            "tool-executor",
            ApprovalRequested(
                **common, approval_id="ap1", step_id="s1", tool="note_write", arguments={"text": f"argument {SECRET}"}
            ),
        ),
        (
            "tool-executor",
            ToolCompleted(
                **common, step_id="s1", call_id="s1-t1", tool="note_write", ok=True, result=f"result {SECRET}"
            ),
        ),
        ("worker", StepCompleted(**common, step_id="s1", output=f"output {SECRET}")),
        ("planner", CheckRequested(**common, goal=f"goal {SECRET}", answer=f"answer {SECRET}")),
    ]


async def publish_contents(infra: Infra, task: str) -> None:
    """Each message published by its real producer, signed, with every header it sends. A
    client's message is stored as its door stores it: by the service that keeps the door, with
    the client's own headers (no door keeper runs here)."""
    client = Signer.from_file(f"client.{TENANT}", infra.ids.signing_key(f"client.{TENANT}"))
    for producer, model in contents(task):
        if producer == "client":
            door = topo.door_of(type(model))
            assert door is not None
            body = model.to_bytes()
            headers = env.headers_for(client, model, body, env.message_id(model.type, TENANT, task, model.type))
            async with infra.connected_as(door.service) as keeper:
                await keeper.nc.jetstream().publish(model.subject(), body, headers=headers, stream=door.stream)
        else:
            async with infra.connected_as(producer) as mesh:
                await mesh.publish(model, key=model.type)
    # The planner's records of the task: the task record (goal, step outputs, answer) and the
    # content-free status record the budget reads instead (its start, limits and labels).
    async with infra.connected_as("planner") as planner:
        js = planner.nc.jetstream()
        record = TaskRecord(tenant=TENANT, task_id=task, goal=f"goal {SECRET}", created_at=time.time())
        step = PlanStep(step_id="s1", instruction=f"summarise {SECRET}")
        record.steps["s1"] = StepState(step=step, status="completed", output=f"output {SECRET}")
        await (await js.key_value(TaskRecord.bucket)).put(
            TaskRecord.key(TENANT, task), record.to_bytes(TaskRecord.key(TENANT, task))
        )
        status = StatusRecord(status="planning", created_at=record.created_at, limits=record.limits)
        await (await js.key_value(StatusRecord.bucket)).put(TaskRecord.key(TENANT, task), status.to_bytes())


def records(task: str) -> list[str]:
    """The subjects the planner's records of ``task`` are stored under (in KV_tasks and KV_status)."""
    return [f"$KV.{b}.{TaskRecord.key(TENANT, task)}" for b in (TaskRecord.bucket, StatusRecord.bucket)]


def leaks(data: bytes, headers: dict[str, str] | None) -> bool:
    blob = data + json.dumps(headers or {}, default=str).encode()
    return any(m in blob for m in MARKERS)


async def connect(infra: Infra, principal: str, errors: list[str]) -> nats.NATS:
    async def on_error(e: Exception) -> None:
        errors.append(str(e).lower())

    return await nats.connect(
        infra.nats_url, **infra.ids.connect_options(principal), error_cb=on_error, max_reconnect_attempts=0,
        name=f"reads-{principal}",
    )  # fmt: skip


async def ask_all(
    nc: nats.NATS, requests: list[tuple[str, bytes]], quiet_s: float = 1.0
) -> list[list[tuple[dict[str, str], bytes]]]:
    """Every message answering each request, all sent at once (a refused request gets none; a
    batch ends with a status): collected until nothing has arrived for ``quiet_s``."""
    inbox = nc.new_inbox()
    got: list[list[tuple[dict[str, str], bytes]]] = [[] for _ in requests]

    async def on_answer(msg: Any) -> None:
        got[int(msg.subject.rsplit(".", 1)[1])].append((dict(msg.headers or {}), msg.data))

    sub = await nc.subscribe(f"{inbox}.*", cb=on_answer)
    try:
        for i, (subject, body) in enumerate(requests):
            await nc.publish(subject, body, reply=f"{inbox}.{i}")
        await nc.flush()
        seen, quiet_since = -1, time.monotonic()
        while time.monotonic() - quiet_since < quiet_s:
            await asyncio.sleep(0.05)
            if (n := sum(map(len, got))) != seen:
                seen, quiet_since = n, time.monotonic()
        return got
    finally:
        await sub.unsubscribe()


async def streams(infra: Infra) -> list[str]:
    nc = await infra.admin()
    try:
        return sorted(si.config.name for si in await nc.jetstream().streams_info())
    finally:
        await nc.close()


async def test_the_budget_reads_no_tenants_content_from_any_stream(infra):
    """With the budget's own credentials: no direct get, stored-message get or feed it can
    reach returns another tenant's document, passage, argument, result, output, goal or answer."""
    errors: list[str] = []
    nc = await connect(infra, "budget", errors)
    fed: list[tuple[str, dict[str, str], bytes]] = []
    try:

        async def on_feed(msg: Any) -> None:
            fed.append((msg.subject, dict(msg.headers or {}), msg.data))

        names = await streams(infra)
        for name in names:  # every feed it might hold, live while the content is published
            await nc.subscribe(f"$MESH.WATCH.{name}.>", cb=on_feed)
        await nc.flush()
        await publish_contents(infra, "reads-1")
        await asyncio.sleep(0.5)
        assert fed, "the feeds it may follow delivered what was published (so silence is not a dead subscription)"
        leaked = [f"feed {s}" for s, h, d in fed if leaks(d, h)]

        stored = [m.subject() for _, m in contents("reads-1")] + records("reads-1")
        bodies = [
            {"seq": 1, "batch": 1024},
            {"seq": 1, "next_by_subj": ">", "batch": 1024},
            {"seq": 1, "next_by_subj": f"*.*.{TENANT}.>", "batch": 1024},
            {"multi_last": [">"]},
            {"start_time": "2000-01-01T00:00:00Z", "batch": 1024},
            *({"last_by_subj": s} for s in stored),
        ]
        requests = [(f"$JS.API.DIRECT.GET.{name}", json.dumps(body).encode()) for name in names for body in bodies]
        requests += [(f"$JS.API.DIRECT.GET.{name}.{s}", b"") for name in names for s in stored]
        requests += [
            (f"$JS.API.STREAM.MSG.GET.{name}", json.dumps({"last_by_subj": s}).encode())
            for name in names
            for s in stored
        ]
        for (subject, body), got in zip(requests, await ask_all(nc, requests), strict=True):
            if any(leaks(d, h) for h, d in got):
                leaked.append(f"{subject} {body.decode()}")
        where = sorted({x.split(" ", 1)[0] for x in leaked})
        assert not leaked, f"the budget read {TENANT}'s content {len(leaked)} ways, through {where}: {leaked[:6]}"
        assert nc.is_connected, "refusals do not cost the connection"
    finally:
        await nc.close()


async def test_the_budget_still_sees_every_message_it_follows(infra):
    """What it may read is enough to follow a task: each message of the seven content streams
    reaches its feed and its store, with no body and with the facts its producer signed."""
    granted = [g for g in INTENDED["budget"] if g.startswith("$JS.API.DIRECT.GET.") and g.count(".") == 4]
    readable = [g.rsplit(".", 1)[1] for g in granted]
    assert "USAGE" in readable and not {"TASK", "STEP", "TOOL", "RAG", "CHECK", "CONTROL", "APPROVAL"} & set(readable)
    errors: list[str] = []
    nc = await connect(infra, "budget", errors)
    try:
        fed: list[dict[str, str]] = []

        async def on_feed(msg: Any) -> None:
            assert msg.data == b"", "the feed carries no body"
            fed.append(dict(msg.headers or {}))

        await nc.subscribe("$MESH.WATCH.ENVELOPES.>", cb=on_feed)
        await nc.flush()
        await publish_contents(infra, "reads-2")
        want = {m.subject() for _, m in contents("reads-2")}
        deadline = time.monotonic() + 10
        while {h.get("Nats-Subject") for h in fed} < want and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert {h.get("Nats-Subject") for h in fed} >= want
        assert all(h.get("Mesh-Facts") and h.get("Mesh-Identity") for h in fed if h.get("Nats-Subject") in want)
        request = json.dumps({"seq": 1, "next_by_subj": "*.*.*.reads-2.>", "batch": 100}).encode()
        (got,) = await ask_all(nc, [("$JS.API.DIRECT.GET.ENVELOPES", request)])
        stored = [(h, d) for h, d in got if not h.get("Status")]
        assert {h["Nats-Subject"] for h, _ in stored} == want
        assert all(d == b"" for _, d in stored)
        assert not errors, errors
    finally:
        await nc.close()
