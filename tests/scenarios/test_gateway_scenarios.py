"""Provider trouble through the real mesh: local HTTP servers speak the OpenAI and Anthropic
wire protocols (answering like the scripted model), the services reach them over HTTP.

- Outage: the primary (OpenAI-compatible) returns 503 to everything; tasks complete through
  the fallback (Anthropic) with the primary's breaker open, every failed attempt accounted.
- Streaming: tokens reach a following client while the provider produces them; the client's
  time to first token is measured against the provider's own in the same run.
- A stream that dies half-way: the client is told to discard the partial text, and the text
  it ends up with equals the durable answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh_contracts.registry import open_body
from mesh_contracts.v1 import TaskCompleted
from mesh_testing.chaos import ChaosMesh, report
from mesh_testing.fake_llm import Fault
from mesh_testing.infra import Infra, running_infra
from mesh_testing.llm_servers import ServerThread, fake_llm_servers

pytestmark = pytest.mark.chaos
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
PRIMARY = "gpt-4o-mini-2024-07-18"
SPARE = "claude-haiku-4-5-20251001"
ENV = {"MESH_ACK_WAIT_S": "5", "MESH_LOG_LEVEL": "WARNING", "MESH_BUDGET_PROVIDER_COOLDOWN_S": "60"}


def gateway_config(path: Path, primary: str, spare: str) -> Path:
    path.write_text(
        json.dumps(
            {
                "providers": {
                    "primary": {"kind": "openai", "base_url": primary, "api_key_env": "FAKE_OPENAI_KEY"},
                    "spare": {"kind": "anthropic", "base_url": spare, "api_key_env": "FAKE_ANTHROPIC_KEY"},
                },
                "models": {
                    "main": {"provider": "primary", "id": PRIMARY, "context_window": 128000},
                    "backup": {"provider": "spare", "id": SPARE, "context_window": 200000},
                },
                "routes": {"default": ["main", "backup"]},
                "retry": {"max_attempts": 2, "base_s": 0.05, "max_s": 0.2},
                "breaker": {"window_s": 60, "min_calls": 3, "failure_rate": 0.5, "cooldown_s": 120},
                "timeouts": {"connect_s": 2, "first_token_s": 10, "idle_s": 5, "total_s": 30},
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme"], name="gateway", ack_wait_s=5.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def servers() -> Iterator[ServerThread]:
    with fake_llm_servers() as st:
        yield st


@pytest.fixture(scope="module")
def mesh(infra, servers, tmp_path_factory) -> Iterator[ChaosMesh]:
    primary = servers.serve(api_key="k-primary", token_delay_s=0.01)
    spare = servers.serve(api_key="k-spare", token_delay_s=0.01)
    cfg = gateway_config(tmp_path_factory.mktemp("gw") / "models.json", primary.openai_base, spare.anthropic_base)
    env = {**ENV, "MESH_MODEL_CONFIG": str(cfg), "FAKE_OPENAI_KEY": "k-primary", "FAKE_ANTHROPIC_KEY": "k-spare"}
    m = ChaosMesh(infra, env=env)
    m.start()
    asyncio.run(m.ready())
    m.primary, m.spare = primary, spare  # type: ignore[attr-defined]
    yield m
    asyncio.run(m.stop())


async def test_tokens_stream_to_the_client_as_the_provider_produces_them(infra, mesh):
    primary = mesh.primary
    before = len(primary.requests)
    clock_offset = time.time() - time.monotonic()
    async with infra.client("acme") as c:
        seen = await c.submit(GOAL, task_id="stream-1", timeout=60)
    assert isinstance(seen.outcome, TaskCompleted), seen.outcome
    deltas = [t for t in seen.tokens if t.kind == "delta"]
    assert len(deltas) >= 10, "the answer arrived in many pieces, not one"
    answer_calls = [t.call_id for t in deltas if t.step_id == "s3"]
    assert answer_calls, "the answer step streamed"
    assert seen.streamed_text(answer_calls[-1]) == seen.outcome.answer, "streamed text == the durable answer"
    assert seen.first_token_at < seen.finished_at, "tokens arrived before the result"
    # Time to first token: the provider's own (request in -> first chunk out, on the server)
    # against what the client saw (first worker request in -> first delta at the client).
    worker_calls = [r for r in primary.requests[before:] if r.stream]
    assert worker_calls and all(r.first_chunk_at for r in worker_calls)
    first = min(worker_calls, key=lambda r: r.received_at)
    provider_ttft = first.first_chunk_at - first.received_at
    client_ttft = (seen.first_token_at - clock_offset) - first.received_at
    assert client_ttft >= provider_ttft, "a client cannot see a token before the provider made it"
    report("gateway streaming", provider_ttft_ms=round(provider_ttft * 1000, 2),
           client_ttft_ms=round(client_ttft * 1000, 2), deltas=len(deltas))  # fmt: skip


async def test_a_stream_that_dies_half_way_is_discarded_and_the_answer_still_arrives(infra, mesh):
    # One plan (the planner's call, not streamed, gets no fault), one step: the worker's own
    # retrieval first (no model call), then the step's one model call, the answer, whose streamed
    # call dies after three chunks.
    step = {"step_id": "s1", "kind": "answer", "tools": ["search_docs"],
            "instruction": "Find what the documentation says about: duplicate side effects"}  # fmt: skip
    mesh.primary.push(Fault.slow_first_token(0), Fault.disconnect(after_chunks=3))
    async with infra.client("acme") as c:
        seen = await c.submit("PLAN: " + json.dumps({"steps": [step]}), task_id="reset-1", timeout=60)
    assert isinstance(seen.outcome, TaskCompleted), getattr(seen.outcome, "reason", seen.outcome)
    resets = [t for t in seen.tokens if t.kind == "reset"]
    assert len(resets) == 1, "the client was told to discard the partial text once"
    call = resets[0].call_id
    before_reset = [t for t in seen.tokens if t.call_id == call and t.kind == "delta" and t.seq < resets[0].seq]
    assert len(before_reset) >= 2, "part of the answer had streamed before the connection died"
    assert seen.streamed_text(call) == seen.outcome.answer, "after the reset, the client holds exactly the answer"


async def test_a_primary_outage_completes_tasks_through_the_fallback_with_the_breaker_open(infra, mesh):
    primary, spare = mesh.primary, mesh.spare
    primary.default = Fault.http(503, retry_after="0")
    try:
        p0, s0 = len(primary.requests), len(spare.requests)
        outcomes = []
        async with infra.client("acme") as c:
            for i in range(3):
                seen = await c.submit(GOAL, task_id=f"outage-{i}", timeout=60)
                outcomes.append(seen)
                if i == 0:
                    after_first = len(primary.requests)
        assert all(isinstance(s.outcome, TaskCompleted) for s in outcomes), [s.outcome for s in outcomes]
        assert all("391" in s.outcome.answer for s in outcomes), "the fallback answered the same question"
        hits_on_primary = len(primary.requests) - p0
        # One breaker per process (planner, worker): each opens after min_calls (3) failures,
        # plus the retries of calls already in flight; then the primary is left alone.
        assert 3 <= hits_on_primary <= 2 * (3 + 2), hits_on_primary
        assert len(primary.requests) == after_first, "with the breaker open, later tasks never touch the primary"
        assert len(spare.requests) - s0 >= 3 * 4, "every model call of the three tasks went to the fallback"
        usage = await infra.spent("acme", "outage-0")
        assert usage["errors"] >= 3, "every failed attempt was accounted"
        models = set(usage.get("by_model", {}))
        assert f"anthropic/{SPARE}" in models, models
        stages = {e.stage for e in outcomes[0].events}
        assert "task.halted" not in stages, "an outage with a working fallback never halts the task"
        report("gateway outage", primary_requests=hits_on_primary, spare_requests=len(spare.requests) - s0,
               failed_attempts=usage["errors"], latency_s=[round(s.latency_s, 2) for s in outcomes])  # fmt: skip
    finally:
        primary.default = None


async def test_a_provider_answering_under_another_model_id_has_every_paid_call_accounted(infra, mesh):
    """Providers answer a pinned id with another (a dated snapshot). The price and the account
    follow the configured model the call was reserved for; the echo is recorded beside it. (Both
    providers echo: an earlier test may have left the primary's breaker open.)"""
    from mesh_contracts.v1 import TaskLimits

    servers = {PRIMARY: mesh.primary, SPARE: mesh.spare}
    for model, server in servers.items():
        server.report_model = f"{model}-snapshot"  # in no price table
    try:
        before = sum(len(s.requests) for s in servers.values())
        async with infra.client("acme") as c:
            runs = [await c.submit(GOAL, task_id=f"echo-{i}", timeout=60) for i in range(3)]
            paid = sum(len(s.requests) for s in servers.values()) - before
            tight = await c.submit(GOAL, task_id="echo-ceiling", limits=TaskLimits(max_cost_usd=0.006), timeout=60)
        assert all(isinstance(r.outcome, TaskCompleted) for r in runs), [r.outcome for r in runs]
        accounted = [await infra.spent("acme", r.task_id) for r in runs]
        calls = sum(a["total"]["calls"] for a in accounted)
        cost = sum(a["total"]["cost_usd"] for a in accounted)
        usage = [
            open_body(m.subject, m.data)
            for r in runs
            for m in await infra.stored("USAGE", f"usage.v1.acme.{r.task_id}.recorded")
        ]
        ceiling = await infra.spent("acme", "echo-ceiling")
    finally:
        for server in servers.values():
            server.report_model = None
    report("model id echo", paid_calls=paid, accounted_calls=calls, accounted_cost_usd=round(cost, 6),
           ceiling_usd=0.006, spent_under_ceiling_usd=ceiling["total"]["cost_usd"])  # fmt: skip
    assert calls == paid and cost > 0, "every call a provider was paid for is in the account"
    answered = {(u["model"], u["response_model"]) for u in usage if not u.get("error")}
    assert answered and all(echo == f"{model}-snapshot" for model, echo in answered), answered
    assert not isinstance(tight.outcome, TaskCompleted) and ceiling["total"]["cost_usd"] <= 0.006, "zero overshoot"
