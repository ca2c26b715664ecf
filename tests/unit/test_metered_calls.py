"""The mesh side of a model call (mesh_agent.metered): per-attempt reservations, usage records,
GenAI spans and redacted content capture, driven through a real Gateway."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mesh_agent.metered import Models, call_model
from mesh_contracts.v1 import UsageRecorded
from mesh_llm import Message, ModelRequest, ScriptedModel
from mesh_llm.gateway import Gateway
from mesh_llm.resilience import RetryPolicy
from mesh_testing.fakes import FakeMesh

T = {"tenant": "acme", "task_id": "t1"}


def models(capture: bool = False) -> Models:
    failing = ScriptedModel("scripted-judge", scripts={"*": [{"fail": "503"}]})
    gateway = Gateway(
        {"default": [failing, ScriptedModel("scripted-1")]},
        retry=RetryPolicy(max_attempts=2, base_s=0.0, max_s=0.0),
    )
    return Models(gateway, capture_content=capture)


REQUEST = ModelRequest(
    (Message("user", "Write the final answer to: reach ops@acme.test about the outage"),), agent="worker"
)


async def test_every_attempt_is_reserved_spanned_and_accounted_and_the_fallback_answers():
    mesh = FakeMesh()
    response, usage = await call_model(mesh, models(), REQUEST, step_id="s1", call_id="s1-a1-i0", **T)  # type: ignore[arg-type]
    assert response.model == "scripted-1" and usage.calls == 1
    assert [(r.model, r.call_id) for r in mesh.reserved] == [
        ("scripted-judge", "s1-a1-i0"),
        ("scripted-judge", "s1-a1-i0-r1n2"),
        ("scripted-1", "s1-a1-i0-r1n3"),
    ]
    records = [m for m in mesh.published if isinstance(m, UsageRecorded)]
    failed = [r for r in records if r.error]
    assert [(r.model, r.handed_on) for r in failed] == [("scripted-judge", True), ("scripted-judge", True)]
    assert all("server_error" in r.error for r in failed)
    (ok,) = [r for r in records if not r.error]
    assert (ok.call_id, ok.model, ok.reservation_id) == ("s1-a1-i0", "scripted-1", "r-s1-a1-i0-r1n3")
    assert ok.input_tokens == response.input_tokens and ok.cost_usd == usage.cost_usd > 0
    spans = mesh.spans.get_finished_spans()
    assert [s.name for s in spans] == ["chat scripted-judge", "chat scripted-judge", "chat scripted-1"]
    assert spans[0].attributes["error.type"] == "server_error"
    last = spans[-1].attributes
    assert last["gen_ai.operation.name"] == "chat" and last["gen_ai.provider.name"] == "scripted"
    assert last["gen_ai.request.model"] == last["gen_ai.response.model"] == "scripted-1"
    assert last["gen_ai.usage.input_tokens"] == response.input_tokens
    assert last["gen_ai.usage.output_tokens"] == response.output_tokens
    assert tuple(last["gen_ai.response.finish_reasons"]) == ("stop",)
    assert "gen_ai.input.messages" not in last, "no content on spans unless enabled"


async def test_content_capture_is_opt_in_and_redacted():
    mesh = FakeMesh()
    await call_model(mesh, models(capture=True), REQUEST, step_id="s1", call_id="c1", **T)  # type: ignore[arg-type]
    attrs = mesh.spans.get_finished_spans()[-1].attributes
    assert "[REDACTED:email]" in attrs["gen_ai.input.messages"]
    assert "ops@acme.test" not in attrs["gen_ai.input.messages"] + attrs["gen_ai.output.messages"]


async def test_the_budgets_open_provider_circuit_sends_the_call_to_the_next_model_unmade():
    mesh = FakeMesh(deny={"scripted-judge": "provider_breaker"})
    response, _ = await call_model(mesh, models(), REQUEST, step_id="s1", call_id="c2", **T)  # type: ignore[arg-type]
    assert response.model == "scripted-1"
    assert not [m for m in mesh.published if isinstance(m, UsageRecorded) and m.error], "the refused call was not made"


async def test_any_other_denial_stops_the_call():
    from mesh_agent.metered import BudgetExceeded

    mesh = FakeMesh(deny={"scripted-judge": "tokens"})
    with pytest.raises(BudgetExceeded) as exc:
        await call_model(mesh, models(), REQUEST, step_id="s1", call_id="c3", **T)  # type: ignore[arg-type]
    assert exc.value.code == "tokens"
    assert [r.model for r in mesh.reserved] == ["scripted-judge"], "no fallback around a budget ceiling"


async def test_the_prompt_version_is_on_every_attempts_span_and_usage_record_and_on_a_ledger_replay():
    from mesh_agent import prompts
    from mesh_agent.metered import call_model_once
    from mesh_durable.ledger import Ledger
    from mesh_testing.memkv import MemoryKV

    ref = prompts.load("mesh_worker", "system").ref
    assert ref.startswith("worker.system@1+")
    request = replace(REQUEST, prompt_version=ref)
    mesh = FakeMesh()
    ledger = Ledger(MemoryKV(), "worker")
    await call_model_once(mesh, ledger, models(), request, step_id="s1", call_id="c4", **T)  # type: ignore[arg-type]
    spans = mesh.spans.get_finished_spans()
    assert len(spans) == 3, "two failed attempts on the primary, then the fallback"
    assert [s.attributes["mesh.prompt.version"] for s in spans] == [ref] * 3
    records = [m for m in mesh.published if isinstance(m, UsageRecorded)]
    assert [(r.model, bool(r.error), r.prompt_version) for r in records] == [
        ("scripted-judge", True, ref),
        ("scripted-judge", True, ref),
        ("scripted-1", False, ref),
    ]
    # a redelivery served from the ledger re-publishes the usage record, with the version too
    mesh.published.clear()
    await call_model_once(mesh, ledger, models(), request, step_id="s1", call_id="c4", **T)  # type: ignore[arg-type]
    (replayed,) = [m for m in mesh.published if isinstance(m, UsageRecorded)]
    assert (replayed.call_id, replayed.prompt_version) == ("c4", ref)
    # a request built from no versioned prompt records none, and its span has no such attribute
    mesh = FakeMesh()
    await call_model(mesh, models(), REQUEST, step_id="s1", call_id="c5", **T)  # type: ignore[arg-type]
    assert all("mesh.prompt.version" not in s.attributes for s in mesh.spans.get_finished_spans())
    assert {m.prompt_version for m in mesh.published if isinstance(m, UsageRecorded)} == {""}


class Echoing(ScriptedModel):
    """A provider that answers under another model id than the one asked for (a dated snapshot)."""

    async def complete(self, request: ModelRequest):  # type: ignore[override]
        return replace(await super().complete(request), model=f"{self.model}-2026-11-01")


async def test_a_call_answered_under_another_model_id_is_priced_and_accounted_as_the_configured_model():
    from mesh_agent import prices
    from mesh_agent.metered import call_model_once
    from mesh_durable.ledger import Ledger
    from mesh_testing.memkv import MemoryKV

    mesh, ledger = FakeMesh(), Ledger(MemoryKV(), "worker")
    gateway = Gateway({"default": [Echoing("scripted-1")]}, retry=RetryPolicy(max_attempts=1, base_s=0.0, max_s=0.0))
    response, usage = await call_model_once(mesh, ledger, Models(gateway), REQUEST, step_id="s1", call_id="e1", **T)  # type: ignore[arg-type]
    assert response.model == "scripted-1-2026-11-01", "the echo is unpriced: the old code refused it after paying"
    expected = prices.current().price("scripted", "scripted-1").cost(response.input_tokens, response.output_tokens)
    assert usage.cost_usd == pytest.approx(expected) and usage.cost_usd > 0
    (record,) = [m for m in mesh.published if isinstance(m, UsageRecorded)]
    assert (record.model, record.response_model, record.cost_usd) == ("scripted-1", "scripted-1-2026-11-01",
                                                                        usage.cost_usd)  # fmt: skip
    assert record.cost_usd <= mesh.reserved[0].cost_usd, "never more than reserved: zero overshoot"
    mesh.published.clear()  # replayed from the ledger: the same accounting
    await call_model_once(mesh, ledger, Models(gateway), REQUEST, step_id="s1", call_id="e1", **T)  # type: ignore[arg-type]
    (again,) = [m for m in mesh.published if isinstance(m, UsageRecorded)]
    assert (again.model, again.cost_usd) == ("scripted-1", usage.cost_usd)


async def test_an_unpriced_configured_model_is_refused_before_the_call():
    from mesh_agent.metered import BudgetExceeded

    unpriced = ScriptedModel("no-such-model")
    gateway = Gateway({"default": [unpriced]}, retry=RetryPolicy(max_attempts=1, base_s=0.0, max_s=0.0))
    with pytest.raises(BudgetExceeded) as exc:
        await call_model(FakeMesh(), Models(gateway), REQUEST, step_id="s1", call_id="u1", **T)  # type: ignore[arg-type]
    assert exc.value.code == "unpriced_model" and unpriced.calls == 0, "refused before any money is spent"


def _points(mesh: FakeMesh, name: str) -> list:
    data = mesh.metrics.get_metrics_data()
    return [
        p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == name
        for p in m.data.data_points
    ]


async def test_every_attempt_is_in_the_otel_genai_client_metrics():
    """``gen_ai.client.operation.duration`` for each attempt (a failed one with ``error.type``),
    ``gen_ai.client.token.usage`` per token type for the one that answered, with the standard
    attributes: what GenAI dashboards and alerts read."""
    mesh = FakeMesh()
    response, _ = await call_model(mesh, models(), REQUEST, step_id="s1", call_id="s1-a1-i0", **T)  # type: ignore[arg-type]
    durations = _points(mesh, "gen_ai.client.operation.duration")
    by_error = {p.attributes.get("error.type", ""): p for p in durations}
    assert sum(p.count for p in durations) == 3, "two failed attempts on the first model, one answer"
    assert by_error[""].count == 1 and sum(p.count for e, p in by_error.items() if e) == 2
    ok = by_error[""].attributes
    assert ok["gen_ai.operation.name"] == "chat" and ok["gen_ai.provider.name"] == "scripted"
    assert ok["gen_ai.request.model"] == "scripted-1" and ok["gen_ai.response.model"] == response.model
    tokens = {p.attributes["gen_ai.token.type"]: p for p in _points(mesh, "gen_ai.client.token.usage")}
    assert set(tokens) == {"input", "output"}
    assert tokens["input"].sum == response.input_tokens and tokens["output"].sum == response.output_tokens
    assert all(p.attributes["gen_ai.request.model"] == "scripted-1" for p in tokens.values())


async def test_a_call_made_for_a_task_on_a_release_names_it_on_its_span_metrics_and_usage():
    """What a canary is compared by: each model call of a task says which release made it."""
    from mesh_kit import envelope as env

    mesh, release = FakeMesh(), "3f9a0c2b7d41e685"
    with env.releasing("acme", "t1", release):
        await call_model(mesh, models(), REQUEST, step_id="s1", call_id="s1-a1-i0", **T)  # type: ignore[arg-type]
        await call_model(mesh, models(), REQUEST, step_id="s2", call_id="s2-a1-i0", tenant="acme", task_id="t2")  # type: ignore[arg-type]
    spans = mesh.spans.get_finished_spans()
    assert {s.attributes.get("mesh.release") for s in spans if "t1" == s.attributes["gen_ai.conversation.id"]} == {
        release
    }
    assert {s.attributes.get("mesh.release") for s in spans if "t2" == s.attributes["gen_ai.conversation.id"]} == {None}
    points = _points(mesh, "gen_ai.client.token.usage")
    assert {p.attributes.get("mesh.release") for p in points} == {release, None}
    usage = [m for m in mesh.published if isinstance(m, UsageRecorded)]
    assert {(u.task_id, u.release) for u in usage} == {("t1", release), ("t2", "")}
