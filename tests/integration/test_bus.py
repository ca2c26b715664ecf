"""The bus runtime against a real nats-server (JWT auth) and redis-server."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from integration_helpers import connect, counter, eventually, in_memory, running, settings_for
from nats.js.errors import KeyNotFoundError

from mesh_budget import metrics as budget_metrics
from mesh_contracts.topology import door_subject
from mesh_contracts.v1 import (
    BudgetDenied,
    BudgetGranted,
    BudgetReserve,
    CheckRequested,
    RetrievalRequested,
    TaskLimits,
    ToolRequested,
    UsageRecorded,
)
from mesh_contracts.v1.records import StatusRecord, TaskRecord
from mesh_host import Mesh
from mesh_identity import Signer, new_signing_key
from mesh_kit import PermissionViolation, ServiceSettings
from mesh_kit import envelope as env
from mesh_tenancy import tenancy
from mesh_tenancy.door import DoorRefused, read_reply
from meshctl.dlq import entries

pytestmark = pytest.mark.integration


async def dead_letters(infra, subject_filter: str, kind: str | None = None) -> list[tuple[int, dict, bytes]]:
    """(DLQ sequence, headers, body) of the in-app dead letters whose subject contains the filter."""
    async with connect(infra, "admin") as nc:
        return [
            (seq, dict(m.headers or {}), m.data or b"")
            async for seq, m in entries(nc.jetstream())
            if (m.subject or "").startswith("dlq.")
            and subject_filter in m.subject
            and kind in (None, (m.headers or {}).get(env.DLQ_KIND))
        ]


async def test_publish_is_deduplicated_and_the_consumer_sees_the_verified_sender(integration_infra, unique):
    task = unique("dedup")
    got = []

    async def handler(m: ToolRequested, d) -> None:
        if m.task_id == task:
            got.append((m, d.sender.name, d.deliveries, d.msg_id))

    consumer = Mesh(settings_for(integration_infra, "tool-executor"))
    consumer.consume(ToolRequested, handler)
    producer = Mesh(settings_for(integration_infra, "worker"))
    async with running(consumer), running(producer):
        req = ToolRequested(tenant="acme", task_id=task, step_id="s1", call_id="c1", tool="calculator")
        first = await producer.publish(req, key="c1")
        second = await producer.publish(req, key="c1")  # a retry after a timeout, say
        assert not first.duplicate and second.duplicate and second.seq == first.seq
        await eventually(lambda: got, what="delivery")
        await asyncio.sleep(0.3)  # a duplicate would arrive right behind the first
    assert len(got) == 1
    _model, sender, deliveries, msg_id = got[0]
    assert (sender, deliveries, msg_id) == ("worker", 1, f"tool.requested:acme:{task}:c1")


async def test_a_failing_handler_is_retried_then_dead_lettered_without_blocking_others(integration_infra, unique):
    poison, healthy = unique("poison"), unique("healthy")
    attempts: list[int] = []
    handled: list[str] = []

    async def handler(m: CheckRequested, d) -> None:
        if m.task_id == poison:
            attempts.append(d.deliveries)
            raise RuntimeError("judge model unavailable")
        handled.append(m.task_id)

    checker = Mesh(settings_for(integration_infra, "checker", retry_delays_s=(0.1, 0.2), max_deliver=3))
    checker.consume(CheckRequested, handler)
    planner = Mesh(settings_for(integration_infra, "planner"))
    async with running(checker), running(planner):
        await planner.publish(CheckRequested(tenant="acme", task_id=poison, goal="g", answer="a"), key="1")
        await planner.publish(CheckRequested(tenant="acme", task_id=healthy, goal="g", answer="a"), key="1")
        await eventually(lambda: healthy in handled, what="healthy message handled despite the poison one")
        letters = await eventually(lambda: dead_letters(integration_infra, poison), what="dead letter")
    assert attempts == [1, 2, 3]
    _, headers, body = letters[0]
    assert headers[env.DLQ_REASON] == "RuntimeError: judge model unavailable"
    assert headers[env.DLQ_KIND] == "failed"
    assert headers[env.DLQ_DELIVERIES] == "3"
    assert headers[env.DLQ_SUBJECT] == f"check.v1.acme.{poison}.requested"
    assert headers[env.DLQ_SERVICE] == "checker"
    assert headers[f"{env.ORIG_PREFIX}{env.IDENTITY}"], "the original token is kept so a re-drive still verifies"
    assert json.loads(body)["task_id"] == poison


@pytest.mark.parametrize("attack", ["forged", "altered"])
async def test_forged_or_altered_messages_are_rejected_by_their_consumer(integration_infra, unique, attack):
    task = unique(attack)
    handled = []

    async def handler(m: RetrievalRequested, d) -> None:
        handled.append(m.task_id)

    rag = Mesh(settings_for(integration_infra, "rag"))
    rag.consume(RetrievalRequested, handler)
    req = RetrievalRequested(tenant="acme", task_id=task, step_id="s1", call_id="c1", query="q")
    body = req.to_bytes()
    signer = (
        Signer("worker", new_signing_key())
        if attack == "forged"
        else Signer.from_file("worker", integration_infra.ids.signing_key("worker"))
    )
    token = signer.token(tenant="acme", msg_type=req.type, body=body, msg_id=task)
    if attack == "altered":
        body = body.replace(b'"call_id":"c1"', b'"call_id":"c9"')  # a clear field (the query is sealed)
    async with running(rag):
        # published with the worker's own credentials: the broker lets it through; the token must not
        async with connect(integration_infra, "worker") as nc:
            await nc.jetstream().publish(req.subject(), body, headers={env.IDENTITY: token, env.MSG_ID: task})
        letters = await eventually(lambda: dead_letters(integration_infra, task), what="dead letter")
    assert handled == []
    reason = letters[0][1][env.DLQ_REASON]
    assert reason.startswith("identity: ")
    assert ("signature invalid" in reason) if attack == "forged" else ("altered in transit" in reason)


async def test_a_permission_violation_fails_readiness(integration_infra):
    worker = Mesh(settings_for(integration_infra, "worker"))
    async with running(worker):
        assert worker.ready() == (True, "ok")
        with pytest.raises(PermissionViolation, match="not a declared producer"):
            from mesh_contracts.v1 import TaskSubmitted

            await worker.publish(TaskSubmitted(tenant="acme", task_id="x", goal="g"), key="1")
        await worker.nc.publish("task.v1.acme.x.submitted", b"{}")  # bypassing the client-side check
        await eventually(lambda: not worker.ready()[0], what="readiness to fail")
        assert "permission violation" in worker.ready()[1]


async def test_reservations_never_exceed_the_ceiling_and_usage_is_counted_once(integration_infra, unique):
    from mesh_budget.service import Budget

    task = unique("budget")
    telemetry, _, metrics = in_memory("budget")
    budget_mesh = Mesh(settings_for(integration_infra, "budget"), telemetry)
    budget = Budget(budget_mesh)
    budget.register()
    planner = Mesh(settings_for(integration_infra, "planner"))
    worker = Mesh(settings_for(integration_infra, "worker"))
    async with running(budget_mesh), running(planner), running(worker):
        await started(planner, task, TaskLimits(max_tokens=5000))

        async def reserve(i: int, tokens: int = 1000):
            return await worker.request(
                BudgetReserve(tenant="acme", task_id=task, agent="worker", call_id=f"c{i}", tokens=tokens)
            )

        answers = await asyncio.gather(*(reserve(i) for i in range(20)))
        granted = [a for a in answers if isinstance(a, BudgetGranted)]
        denied = [a for a in answers if isinstance(a, BudgetDenied)]
        assert len(granted) == 5 and len(denied) == 15, "20 concurrent asks for 1000 under a 5000 ceiling"
        assert "ceiling 5000 would be exceeded" in denied[0].reason
        again = await reserve(int(granted[0].reservation_id[1:]))  # a retried request keeps its reservation
        assert isinstance(again, BudgetGranted)

        for a in granted[:2]:
            usage = UsageRecorded(
                tenant="acme",
                task_id=task,
                agent="worker",
                call_id=a.reservation_id,
                provider="scripted",
                model="scripted-1",
                input_tokens=500,
                output_tokens=300,
                reservation_id=a.reservation_id,
            )
            await worker.publish(usage, key=a.reservation_id)
        # the same call reported again under a different message id: counted once
        dup = usage.model_copy()
        await worker.publish(dup, key=f"{dup.call_id}-replayed")
        bkv = await budget_mesh.kv("budget")

        async def spent():
            entry = await bkv.get(f"usage.acme.{task}")
            return json.loads(entry.value)

        totals = await eventually(lambda: _when(spent(), lambda s: s["total"]["calls"] == 2), what="usage rollup")
        assert totals["total"]["input_tokens"] == 1000 and totals["by_agent"]["worker/worker"]["output_tokens"] == 600
        # settled reservations are released: 1600 spent + 3 x 1000 still held leaves exactly 400
        assert isinstance(await reserve(100, tokens=401), BudgetDenied)
        assert isinstance(await reserve(101, tokens=400), BudgetGranted)
        assert isinstance(await reserve(102, tokens=1), BudgetDenied)
    # the same numbers as OpenTelemetry metrics, per tenant and agent
    who = {"tenant": "acme", "agent": "worker/worker"}
    assert counter(metrics, budget_metrics.M_BUDGET_TOKENS, **who, **{"token.type": "input"}) == 1000
    assert counter(metrics, budget_metrics.M_BUDGET_TOKENS, **who, **{"token.type": "output"}) == 600
    assert counter(metrics, budget_metrics.M_BUDGET_CALLS, **who, outcome="ok") == 2
    assert counter(metrics, budget_metrics.M_BUDGET_RESERVATIONS, tenant="acme", outcome="granted") == 5 + 1 + 1
    assert counter(metrics, budget_metrics.M_BUDGET_RESERVATIONS, outcome="denied", code="task_tokens") == 15 + 2


async def test_a_task_halted_or_ended_after_its_first_reservation_is_refused_the_next(integration_infra, unique):
    """The first reservation reads the task's status record; the next ones ask what every guard follows
    (the status bucket the planner writes, control messages, kill switches): a halt, a resume and
    an end take effect on the very next reservation."""
    from mesh_budget.service import Budget

    task = unique("halted")
    budget_mesh = Mesh(settings_for(integration_infra, "budget"))
    Budget(budget_mesh).register()
    planner = Mesh(settings_for(integration_infra, "planner"))
    worker = Mesh(settings_for(integration_infra, "worker"))
    async with running(budget_mesh), running(planner), running(worker):
        await started(planner, task, TaskLimits())
        status = await planner.kv(StatusRecord.bucket)
        calls = iter(range(100))

        async def reserve():
            ask = BudgetReserve(tenant="acme", task_id=task, agent="worker", call_id=f"c{next(calls)}", tokens=10)
            return await worker.request(ask)

        async def answers(want: type) -> object:
            return await eventually(lambda: _when(reserve(), lambda a: a if isinstance(a, want) else None),
                                    what=want.__name__)  # fmt: skip

        assert isinstance(await reserve(), BudgetGranted)
        key = TaskRecord.key("acme", task)
        await status.put(key, StatusRecord(status="halted", reason="maintenance").model_dump_json().encode())
        denied = await answers(BudgetDenied)
        assert denied.code == "stopped" and "halted: maintenance" in denied.reason, denied
        await status.put(key, StatusRecord(status="running").model_dump_json().encode())  # resumed
        assert isinstance(await answers(BudgetGranted), BudgetGranted)
        await status.put(key, StatusRecord(status="completed").model_dump_json().encode())
        denied = await answers(BudgetDenied)
        assert denied.code == "stopped" and "completed" in denied.reason, denied


async def test_an_unknown_task_is_refused_and_one_whose_record_arrives_late_is_granted(integration_infra, unique):
    """A task with no status record gets nothing (``unknown_task``). One whose record a replica
    answers late (here: written only after the reservation was asked) is read again, not refused:
    a node that just rejoined its cluster may answer a direct get without the planner's latest write."""
    from mesh_budget.service import Budget

    budget_mesh = Mesh(settings_for(integration_infra, "budget"))
    Budget(budget_mesh).register()
    planner = Mesh(settings_for(integration_infra, "planner"))
    worker = Mesh(settings_for(integration_infra, "worker"))
    async with running(budget_mesh), running(planner), running(worker):

        def reserve(task: str):
            ask = BudgetReserve(tenant="acme", task_id=task, agent="worker", call_id="c1", tokens=10)
            return worker.request(ask, timeout=30)

        denied = await reserve(unique("nobody"))
        assert isinstance(denied, BudgetDenied) and denied.code == "unknown_task", denied
        late = unique("late")
        asked = asyncio.create_task(reserve(late))
        await asyncio.sleep(0.3)
        await started(planner, late, TaskLimits())
        assert isinstance(await asked, BudgetGranted)


async def started(planner: Mesh, task: str, limits: TaskLimits) -> None:
    """What the planner writes as a task starts, and all the budget knows of it: its status
    record (start, limits, labels; never the goal or the step outputs)."""
    status = StatusRecord(status="planning", created_at=time.time(), limits=limits)
    await (await planner.kv(StatusRecord.bucket)).create(TaskRecord.key("acme", task), status.to_bytes())


async def _when(coro, pred):
    try:
        value = await coro
    except Exception:  # key not there yet
        return None
    return value if pred(value) else None


async def test_requests_are_answered_several_at_a_time(integration_infra, unique):
    """A request waits for the ones being answered only up to MESH_MAX_WORKERS at a time: the
    first two handlers here answer only once both run together (one at a time, neither would)."""
    task, both = unique("serve"), asyncio.Event()
    running_now = []

    async def answer(m: BudgetReserve, d) -> BudgetGranted:
        running_now.append(m.call_id)
        if len(running_now) >= 2:
            both.set()
        await asyncio.wait_for(both.wait(), 10)
        return BudgetGranted(tenant=m.tenant, task_id=m.task_id, reservation_id=f"r{m.call_id}", remaining_tokens=0)

    server = Mesh(settings_for(integration_infra, "budget", max_workers=4))
    server.serve(BudgetReserve, answer)
    worker = Mesh(settings_for(integration_infra, "worker"))
    async with running(server), running(worker):
        asks = [BudgetReserve(tenant="acme", task_id=task, agent="worker", call_id=f"c{i}", tokens=1) for i in range(2)]
        answers = await asyncio.gather(*(worker.request(a, timeout=8) for a in asks))
    assert sorted(a.reservation_id for a in answers) == ["rc0", "rc1"]


async def test_sigterm_lets_in_flight_work_finish_and_ack(integration_infra, unique):
    """A real SIGTERM to the serving process: the handler in flight completes and is acked once."""
    import os
    import signal

    from mesh_host.runtime import serve

    task = unique("drain")
    started = asyncio.Event()
    finished: list[int] = []

    async def build(mesh: Mesh, settings: ServiceSettings) -> None:
        async def slow(m: CheckRequested, d) -> None:
            if m.task_id == task:
                started.set()
                await asyncio.sleep(1.5)  # a long model call, say
                finished.append(d.deliveries)

        mesh.consume(CheckRequested, slow)

    server = asyncio.create_task(serve(settings_for(integration_infra, "checker", graceful_timeout_s=10), build))
    planner = Mesh(settings_for(integration_infra, "planner"))
    async with running(planner):
        await planner.publish(CheckRequested(tenant="acme", task_id=task, goal="g", answer="a"), key="1")
    await asyncio.wait_for(started.wait(), 15)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(server, 20)
    assert finished == [1], "the in-flight handler ran to completion exactly once"
    async with connect(integration_infra, "admin") as nc:
        info = await nc.jetstream().consumer_info("CHECK", "checker--check-requested")
    assert info.num_ack_pending == 0 and info.num_pending == 0, "acked before the connection drained"


async def test_a_dead_letter_is_redriven_after_a_fix_even_once_its_token_expired(integration_infra, unique):
    import time

    from meshctl.dlq import redrive

    task = unique("redrive")
    broken = True
    handled: list[tuple[str, int]] = []

    async def handler(m: CheckRequested, d) -> None:
        if m.task_id != task:
            return
        if broken:
            raise RuntimeError("judge prompt template missing")
        handled.append((d.sender.name, d.deliveries))

    checker = Mesh(settings_for(integration_infra, "checker", retry_delays_s=(0.1, 0.2), max_deliver=3))
    checker.consume(CheckRequested, handler)
    short_lived = Signer.from_file("planner", integration_infra.ids.signing_key("planner"), ttl_s=1)
    planner = Mesh(settings_for(integration_infra, "planner"), signer=short_lived)
    async with running(checker), running(planner):
        published = time.time()
        await planner.publish(CheckRequested(tenant="acme", task_id=task, goal="g", answer="a"), key="1")
        letters = await eventually(lambda: dead_letters(integration_infra, task, "failed"), what="dead letter")
        seq, headers, _ = letters[0]
        assert float(headers[env.DLQ_STORED_AT]) == pytest.approx(published, abs=2)
        # let the token expire (1 s validity + the verifier's 5 s clock leeway)
        await asyncio.sleep(max(0.0, published + 7.0 - time.time()))
        broken = False  # the fix is deployed
        async with connect(integration_infra, "admin") as admin:
            # control: the same signed message published afresh is now rejected as expired
            original = {k[len(env.ORIG_PREFIX) :]: v for k, v in headers.items() if k.startswith(env.ORIG_PREFIX)}
            body = (await admin.jetstream().get_msg("DLQ", seq)).data
            await admin.jetstream().publish(
                headers[env.DLQ_SUBJECT], body, headers={**original, env.MSG_ID: f"{task}-replay"}
            )
            operator = Signer.from_file("admin", integration_infra.ids.signing_key("admin"))
            print(await redrive(admin, seq, operator))
            await eventually(lambda: handled, what="re-driven message handled")
            rejected = await eventually(lambda: _rejected_as_expired(integration_infra, task), what="control rejected")
            assert seq not in [s for s, _, _ in await dead_letters(integration_infra, task)], "entry removed"
    assert handled == [("planner", 1)], "handled once, and believed: signed by the planner"
    assert "expired" in rejected


async def _rejected_as_expired(infra, task: str) -> str | None:
    for _, headers, _ in await dead_letters(infra, task, "rejected"):
        if "expired" in headers.get(env.DLQ_REASON, ""):
            return headers[env.DLQ_REASON]
    return None


async def _consumed(infra, cls, service: str, task: str):
    """A ``service`` consumer of ``cls`` that records the tasks it handled (with their senders)."""
    handled: list[tuple[str, str]] = []

    async def handler(m, d) -> None:
        if m.task_id == task:
            handled.append((m.task_id, d.sender.name))

    mesh = Mesh(settings_for(infra, service))
    tenancy.install(mesh)  # the planner keeps the doors of what it consumes
    mesh.consume(cls, handler)
    return mesh, handled


@pytest.mark.parametrize("statement", ["none", "client-signed", "other-message"])
async def test_a_forged_redrive_of_a_captured_expired_task_is_dead_lettered(integration_infra, unique, statement):
    """The attack the identity review found: a tenant's credentials, a task.submitted captured an
    hour ago (its token long expired), re-published with re-drive headers naming an old time.
    Only an operator's signed statement for exactly this message may move the time a token is
    judged at. A tenant's door refuses re-drive headers outright; published onto the stream by a
    principal that may (the planner's credentials), it is dead-lettered with the reason; nothing runs."""
    import time

    from mesh_contracts.v1 import TaskSubmitted

    task = unique("forged-redrive")
    captured_at = time.time() - 3600
    msg = TaskSubmitted(tenant="acme", task_id=task, goal="What is 6 * 7?")
    body, mid = msg.to_bytes(), env.message_id(msg.type, "acme", task, "1")
    client = Signer.from_file("client.acme", integration_infra.ids.signing_key("client.acme"))
    headers = {
        env.IDENTITY: client.token(tenant="acme", msg_type=msg.type, body=body, msg_id=mid, now=captured_at),
        env.MSG_ID: f"{task}-again",
        env.REDRIVE_OF: "1",
        env.ORIGINAL_STORED_AT: f"{captured_at:.6f}",
    }
    if statement == "client-signed":  # a statement, but not an operator's
        headers[env.REDRIVE] = client.redrive(subject=msg.subject(), body=body, dlq_seq=1, original_stored_at=captured_at,
                                              original_msg_id=mid, msg_id=f"{task}-again")  # fmt: skip
    elif statement == "other-message":  # a real operator statement, lifted from another re-drive
        operator = Signer.from_file("admin", integration_infra.ids.signing_key("admin"))
        headers[env.REDRIVE] = operator.redrive(subject=msg.subject(), body=b"{}", dlq_seq=1,
                                                original_stored_at=captured_at, original_msg_id=mid,
                                                msg_id=f"{task}-again")  # fmt: skip
    planner, handled = await _consumed(integration_infra, TaskSubmitted, "planner", task)
    async with running(planner):
        async with connect(integration_infra, "client.acme") as nc:  # the tenant's own NATS credentials
            # At the door (the only way a tenant writes): refused there, nothing stored.
            reply = await nc.request(
                door_subject(msg.subject()), body, headers={**headers, env.SCHEMA: msg.schema_id()}
            )
            with pytest.raises(DoorRefused) as refused:
                read_reply(reply.data)
            assert refused.value.code == "forbidden" and "only an operator re-drives" in refused.value.reason
        # The planner may store task.submitted (it keeps the door): captured by whoever holds its
        # credentials, the forged re-drive is still judged by the consumer, and dead-lettered.
        async with connect(integration_infra, "planner") as nc:
            await nc.jetstream().publish(msg.subject(), body, headers=headers)
        letters = await eventually(lambda: dead_letters(integration_infra, task), what="dead letter")
    assert handled == []
    assert len(letters) == 1, "the tenant's copy was never stored"
    reason = letters[0][1][env.DLQ_REASON]
    expected = {
        "none": "without an operator's signed re-drive statement",
        "client-signed": "client.acme may not re-drive messages",
        "other-message": "re-drive statement is for another message",
    }[statement]
    assert reason.startswith("identity: re-drive: ") and expected in reason, reason


async def test_a_door_refuses_a_submission_that_tells_the_budget_other_limits_than_the_planner(
    integration_infra, unique
):
    """The budget follows a task from its ``Mesh-Facts`` (it reads no body). A tenant that signs
    facts saying another deadline than its body is refused at the door, nothing stored; facts that
    agree with the body are stored with it."""
    from mesh_contracts import facts as mf
    from mesh_contracts.v1 import TaskLimits, TaskSubmitted

    client = Signer.from_file("client.acme", integration_infra.ids.signing_key("client.acme"))
    tasks = {case: unique(f"facts-{case}") for case in ("lies", "agrees")}
    planner, handled = await _consumed(integration_infra, TaskSubmitted, "planner", tasks["agrees"])
    async with running(planner), connect(integration_infra, "client.acme") as nc:
        for case, task in tasks.items():
            msg = TaskSubmitted(tenant="acme", task_id=task, goal="g", limits=TaskLimits(deadline_s=30))
            body, mid = msg.to_bytes(), env.message_id(msg.type, "acme", task, "1")
            limits = TaskLimits(deadline_s=9999 if case == "lies" else 30).model_dump(mode="json")
            told = mf.encode({"labels": {}, "limits": limits})
            headers = {
                env.SCHEMA: msg.schema_id(), env.MSG_ID: mid, env.FACTS: told,
                env.IDENTITY: client.token(tenant="acme", msg_type=msg.type, body=body, msg_id=mid, facts=told),
            }  # fmt: skip
            reply = await nc.request(door_subject(msg.subject()), body, headers=headers)
            if case == "lies":
                with pytest.raises(DoorRefused) as refused:
                    read_reply(reply.data)
                assert refused.value.code == "invalid" and "limits" in refused.value.reason, refused.value
            else:
                assert read_reply(reply.data).stream == "TASK"
        # ... and its consumer, which checks them against the body too, takes it.
        await eventually(lambda: handled, what="the agreeing submission handled")


async def test_a_captured_message_replayed_inside_its_tokens_lifetime_has_no_second_effect(integration_infra, unique):
    """Tokens are bound to the message id they were issued for, and live shorter than the
    streams' deduplication window: replayed under its own id the message is dropped by the
    server, under a new id it is dead-lettered; either way the handler ran once."""
    task = unique("replay")
    executor, handled = await _consumed(integration_infra, ToolRequested, "tool-executor", task)
    worker = Mesh(settings_for(integration_infra, "worker"))
    req = ToolRequested(tenant="acme", task_id=task, step_id="s1", call_id="c1", tool="send_email",
                        arguments={"to": "ops@acme.test", "subject": "s", "body": "b"})  # fmt: skip
    async with running(executor), running(worker):
        await worker.publish(req, key="c1")
        await eventually(lambda: handled, what="the original handled")
        async with connect(integration_infra, "admin") as admin:
            stored = await admin.jetstream().get_last_msg("TOOL", req.subject())
        captured = dict(stored.headers or {})
        async with connect(integration_infra, "worker") as nc:  # the captured bytes, the worker's credentials
            js = nc.jetstream()
            same = await js.publish(req.subject(), stored.data, headers=captured)
            assert same.duplicate, "under its own id: dropped by the server's deduplication"
            await js.publish(req.subject(), stored.data, headers={**captured, env.MSG_ID: f"{task}-replay"})
        letters = await eventually(lambda: dead_letters(integration_infra, task), what="dead letter")
        await asyncio.sleep(0.5)
    assert handled == [(task, "worker")], "one effect"
    assert "token was issued for message id" in letters[0][1][env.DLQ_REASON]


async def test_a_graceful_stop_writes_the_spend_folded_since_the_last_checkpoint(integration_infra, unique):
    """The last round of spend records is written while the budget is still connected: with
    checkpoints an hour apart, the only write of this task's record is the one made on stop."""
    from mesh_budget.service import Budget
    from mesh_budget.settings import BudgetSettings

    task = unique("stop-checkpoint")
    budget_mesh = Mesh(settings_for(integration_infra, "budget"))
    budget = Budget(budget_mesh, BudgetSettings.defaults().model_copy(update={"budget_checkpoint_s": 3600.0}))
    budget.register()
    planner, worker = Mesh(settings_for(integration_infra, "planner")), Mesh(settings_for(integration_infra, "worker"))
    async with running(planner), running(worker):
        await started(planner, task, TaskLimits())
        async with running(budget_mesh):
            usage = UsageRecorded(tenant="acme", task_id=task, agent="worker", call_id="c1", provider="scripted",
                                  model="scripted-1", input_tokens=70, output_tokens=30)  # fmt: skip
            await worker.publish(usage, key="c1")
            assert budget.accounts is not None
            folded = budget.accounts.tasks
            await eventually(lambda: (f := folded.get(("acme", task))) is not None and "c1" in f.rec.call_ids,
                             what="the call folded")  # fmt: skip
            with pytest.raises(KeyNotFoundError):  # not checkpointed: the next round is an hour away
                await (await budget_mesh.kv("budget")).get(f"usage.acme.{task}")
    async with connect(integration_infra, "admin") as nc:
        stored = json.loads((await (await nc.jetstream().key_value("budget")).get(f"usage.acme.{task}")).value)
    assert stored["total"]["input_tokens"] == 70 and stored["total"]["calls"] == 1
