"""The edge (``services/edge``): a person signed in with a JWT submits, follows, resumes and
cancels a task over real HTTP, through a real mesh, as their tenant; what they cannot do is
refused with a status and one line. The edge runs as its own process with its own NATS identity."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh_kit import envelope as env
from mesh_testing.chaos import ChaosMesh, started
from mesh_testing.edge import bearer, follow_and_submit, running_edge, sse
from mesh_testing.infra import Infra, running_infra
from meshctl.edge import AUDIENCE, DEV_ISSUER, user_token

pytestmark = pytest.mark.timeout(300)

GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme", "beta"], name="edge") as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosMesh]:
    config = tmp_path_factory.mktemp("models") / "models.json"
    config.write_text(json.dumps({  # each model call takes 150 ms: a task runs long enough to cancel or resume
        "providers": {"slow": {"kind": "scripted", "latency_ms": 150}},
        "models": {"m": {"provider": "slow", "id": "scripted-1"}},
        "routes": {"default": ["m"]},
    }))  # fmt: skip
    with started(infra, {"MESH_MODEL_CONFIG": str(config), "MESH_LOG_LEVEL": "WARNING"}) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def edge(infra: Infra, mesh: ChaosMesh) -> Iterator[str]:
    with running_edge(infra) as url:
        yield url


async def test_a_person_submits_and_watches_the_answer_written_token_by_token(infra, edge) -> None:
    token = user_token(infra.ids, "acme", "alice")
    events = await follow_and_submit(edge, token, "web-1", GOAL)
    kinds = [k for _, k, _ in events]
    assert kinds[-1] == "outcome" and kinds.count("outcome") == 1
    outcome = events[-1][2]
    assert outcome["type"] == "task.completed" and "391" in outcome["answer"]
    tokens = [d for _, k, d in events if k == "token"]
    assert tokens and kinds.index("token") < kinds.index("outcome")
    # the answer step's streamed text is the answer
    last_call = tokens[-1]["call_id"]
    streamed = "".join(d["text"] for d in tokens if d["call_id"] == last_call and d["kind"] == "delta")
    assert streamed.strip() == outcome["answer"].strip()
    # every stored event carries its message id (to resume after); tokens carry none
    assert all(i for i, k, _ in events if k != "token") and not any(i for i, k, _ in events if k == "token")
    assert {"task.accepted", "plan.created", "check.verdict"} <= {d["stage"] for _, k, d in events if k == "progress"}
    # who submitted it is on the task (its labels)
    nc = await infra.admin()
    try:
        stored = await nc.jetstream().get_last_msg("TASK", "task.v1.acme.web-1.submitted")
        assert json.loads(stored.data)["labels"] == {"user": "alice"}
    finally:
        await nc.close()


async def test_a_late_or_resumed_follower_gets_what_is_stored_after_its_last_event(infra, edge) -> None:
    token = user_token(infra.ids, "acme", "alice")
    first = await follow_and_submit(edge, token, "web-2", GOAL)
    stored = [(i, k, d) for i, k, d in first if k != "token"]
    async with httpx.AsyncClient(base_url=edge, timeout=30.0) as http:
        late = [e async for e in sse(http, "/v1/tasks/web-2/events", bearer(token))]
        assert late == stored  # everything stored, in order, no tokens (live only)
        mid = stored[len(stored) // 2][0]
        resumed = [e async for e in sse(http, "/v1/tasks/web-2/events", {**bearer(token), "last-event-id": mid})]
        assert resumed == stored[len(stored) // 2 + 1 :]
        status = (await http.get("/v1/tasks/web-2", headers=bearer(token))).json()
        assert status["state"] == "task.completed" and status["outcome"] == stored[-1][2]


async def test_the_same_idempotency_key_is_one_task(infra, edge) -> None:
    token = user_token(infra.ids, "acme", "bob")
    async with httpx.AsyncClient(base_url=edge, timeout=30.0) as http:
        answers = await asyncio.gather(*(
            http.post("/v1/tasks", json={"goal": GOAL}, headers={**bearer(token), "idempotency-key": "order-77"})
            for _ in range(3)
        ))  # fmt: skip
        ids = {a.json()["task_id"] for a in answers}
        assert [a.status_code for a in answers] == [202] * 3 and len(ids) == 1
        other = await http.post("/v1/tasks", json={"goal": GOAL}, headers={**bearer(token), "idempotency-key": "x"})
        assert other.json()["task_id"] not in ids
    nc = await infra.admin()
    try:
        info = await nc.jetstream().stream_info("TASK", subjects_filter=f"task.v1.acme.{ids.pop()}.submitted")
        assert sum((info.state.subjects or {}).values()) == 1
    finally:
        await nc.close()


async def test_who_may_not_is_told_why_in_one_line(infra, edge) -> None:
    now = int(time.time())
    stranger = Ed25519PrivateKey.generate()
    claims = {"iss": DEV_ISSUER, "aud": AUDIENCE, "sub": "mallory", "tenant": "acme", "iat": now, "exp": now + 60}
    from meshctl.edge import issuer_key

    cases = {
        "": (401, "Authorization"),
        "Bearer not-a-jwt": (401, "invalid token"),
        f"Bearer {jwt.encode(claims, stranger, algorithm='EdDSA')}": (401, "invalid token"),
        f"Bearer {jwt.encode({**claims, 'exp': now - 120}, issuer_key(infra.ids), algorithm='EdDSA')}": (401, "expired"),
        f"Bearer {jwt.encode({**claims, 'aud': 'other'}, issuer_key(infra.ids), algorithm='EdDSA')}": (401, "audience"),
        f"Bearer {jwt.encode(claims, 'a-shared-secret-of-32-bytes-long!!', algorithm='HS256')}": (401, "invalid token"),
        f"Bearer {jwt.encode({**claims, 'tenant': 'gamma'}, issuer_key(infra.ids), algorithm='EdDSA')}": (403, "gamma"),
        f"Bearer {jwt.encode({k: v for k, v in claims.items() if k != 'tenant'}, issuer_key(infra.ids), algorithm='EdDSA')}": (
            403, "names no tenant"),
    }  # fmt: skip
    async with httpx.AsyncClient(base_url=edge, timeout=10.0) as http:
        for auth, (status, says) in cases.items():
            res = await http.post("/v1/tasks", json={"goal": GOAL}, headers={"authorization": auth} if auth else {})
            assert res.status_code == status, (auth[:40], res.text)
            assert says.lower() in res.json()["message"].lower(), res.text
        token = user_token(infra.ids, "acme", "alice")
        for body, says in ((b"{", "not JSON"), (b"{}", "goal"), (b'{"goal": "x", "priority": 12}', "priority"),
                           (b'{"goal": "x", "task_id": "../etc"}', "task id")):  # fmt: skip
            res = await http.post("/v1/tasks", content=body, headers=bearer(token))
            assert res.status_code == 400 and says in res.json()["message"], res.text
        assert (await http.get("/v1/tasks/a.b/events", headers=bearer(token))).status_code in (400, 404)


async def test_one_tenant_sees_nothing_of_anothers_tasks(infra, edge) -> None:
    await follow_and_submit(edge, user_token(infra.ids, "acme", "alice"), "web-private", GOAL)
    beta = user_token(infra.ids, "beta", "eve")
    async with httpx.AsyncClient(base_url=edge, timeout=10.0) as http:
        status = (await http.get("/v1/tasks/web-private", headers=bearer(beta))).json()
        assert status == {"task_id": "web-private", "state": "unknown or running", "outcome": None}
        seen: list[Any] = []

        async def watch() -> None:
            async for event in sse(http, "/v1/tasks/web-private/events", bearer(beta)):
                seen.append(event)

        with pytest.raises(TimeoutError):
            await asyncio.wait_for(watch(), 2.0)
        assert seen == []


async def test_a_forged_outcome_on_the_bus_never_reaches_the_browser(infra, edge) -> None:
    token = user_token(infra.ids, "acme", "alice")
    forged = json.dumps({"type": "task.completed", "tenant": "acme", "task_id": "web-forged", "answer": "pwned"})

    async def forge() -> None:
        await asyncio.sleep(0.5)
        nc = await infra.admin()
        try:  # the admin may publish anything; no service signed this
            await nc.publish("task.v1.acme.web-forged.completed", forged.encode(),
                             headers={env.SCHEMA: "task.completed/v1", env.MSG_ID: "forged-1"})  # fmt: skip
        finally:
            await nc.close()

    forging = asyncio.create_task(forge())
    events = await follow_and_submit(edge, token, "web-forged", GOAL)
    await forging
    outcomes = [d for _, k, d in events if k == "outcome"]
    assert len(outcomes) == 1 and outcomes[0]["answer"] != "pwned" and "391" in outcomes[0]["answer"]


async def test_cancel_ends_a_running_task(infra, edge) -> None:
    token = user_token(infra.ids, "acme", "carol")
    events: list[Any] = []

    async def cancel_after_first_token() -> None:
        async with httpx.AsyncClient(base_url=edge, timeout=30.0) as http:
            while not any(k == "progress" and d["stage"] == "plan.created" for _, k, d in events):
                await asyncio.sleep(0.05)
            res = await http.post("/v1/tasks/web-cancel/cancel", json={"reason": "changed my mind"},
                                  headers=bearer(token))  # fmt: skip
            assert res.status_code == 202, res.text

    canceller = asyncio.create_task(cancel_after_first_token())
    await follow_and_submit(edge, token, "web-cancel", GOAL, seen=events)
    await canceller
    outcome = events[-1][2]
    assert outcome["type"] == "task.failed" and "changed my mind" in json.dumps(outcome), outcome


def test_the_edge_holds_no_right_beyond_a_clients(infra) -> None:
    from meshctl.policy import edge_permissions

    perms = edge_permissions()
    allowed = ("door.task.", "door.control.", "$JS.API.DIRECT.GET.", "approval.v1.*.*.decided")
    assert all(p.startswith(allowed) for p in perms.pub), perms.pub
    assert not any("STREAM.CREATE" in p or p.startswith(("task.", "event.", "$KV")) for p in perms.pub)
    assert Path(infra.ids.creds("edge")).exists()


async def test_a_suspended_tenants_people_are_told_so(infra, edge) -> None:
    from meshctl.cli import main as meshctl

    ctl = ["--home", str(infra.home)]
    token = user_token(infra.ids, "beta", "eve")
    run = asyncio.get_running_loop().run_in_executor
    assert await run(None, meshctl, [*ctl, "tenant", "suspend", "beta", "--nats-url", infra.nats_url]) == 0
    try:
        async with httpx.AsyncClient(base_url=edge, timeout=30.0) as http:
            deadline = time.monotonic() + 10  # the door learns of the suspension from the registry
            while True:
                res = await http.post("/v1/tasks", json={"goal": GOAL}, headers=bearer(token))
                if res.status_code != 202 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert res.status_code == 403 and res.json()["error"] == "suspended", res.text
    finally:
        assert await run(None, meshctl, [*ctl, "tenant", "resume", "beta", "--nats-url", infra.nats_url]) == 0


async def test_a_person_holds_a_bounded_number_of_streams_and_closing_gives_them_back(infra, edge) -> None:
    token, other = user_token(infra.ids, "acme", "dave"), user_token(infra.ids, "acme", "erin")
    limits = httpx.Limits(max_connections=40)
    async with httpx.AsyncClient(base_url=edge, timeout=30.0, limits=limits) as http:

        async def hold(i: int, opened: asyncio.Event, who: str = token) -> None:
            async for _ in sse(http, f"/v1/tasks/idle-{i}/events", bearer(who), opened):
                pass

        opened = [asyncio.Event() for _ in range(16)]  # MESH_EDGE_MAX_STREAMS_PER_USER's default
        held = [asyncio.create_task(hold(i, o)) for i, o in enumerate(opened)]
        await asyncio.wait_for(asyncio.gather(*(o.wait() for o in opened)), 30)
        res = await http.get("/v1/tasks/idle-99/events", headers=bearer(token))
        assert res.status_code == 429 and res.json()["error"] == "too_many_streams", res.text
        theirs = asyncio.Event()  # another person is not held back by dave's
        erin = asyncio.create_task(hold(100, theirs, other))
        await asyncio.wait_for(theirs.wait(), 10)
        for task in [*held, erin]:
            task.cancel()
        await asyncio.gather(*held, erin, return_exceptions=True)
        deadline = time.monotonic() + 10  # the edge sees the connections close and gives the places back
        while True:
            again = asyncio.Event()
            retry = asyncio.create_task(hold(200, again))
            await asyncio.wait({retry, asyncio.ensure_future(again.wait())}, timeout=5,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if again.is_set() or time.monotonic() > deadline:
                break
            if retry.done():
                assert isinstance(retry.exception(), AssertionError)  # 429: not given back yet
            await asyncio.sleep(0.2)
        assert again.is_set(), "closed streams were not given back"
        retry.cancel()
        await asyncio.gather(retry, return_exceptions=True)


async def test_a_task_submitted_through_the_edge_joins_the_callers_trace(infra, edge) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    token = user_token(infra.ids, "acme", "alice")
    async with httpx.AsyncClient(base_url=edge, timeout=30.0) as http:
        res = await http.post("/v1/tasks", json={"goal": GOAL, "task_id": "web-traced"},
                              headers={**bearer(token), "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})  # fmt: skip
        assert res.status_code == 202 and res.headers["traceparent"].split("-")[1] == trace_id, res.headers
    nc = await infra.admin()
    try:
        stored = await nc.jetstream().get_last_msg("TASK", "task.v1.acme.web-traced.submitted")
        assert stored.headers["traceparent"].split("-")[1] == trace_id, stored.headers
    finally:
        await nc.close()
