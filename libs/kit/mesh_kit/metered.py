"""Every model call goes through here: reserve, call, record usage.

The caller reserves the call's worst-case tokens (prompt + max_tokens) from the budget
service before calling; a denial means the call is not made. The actual usage is then
published (``usage.recorded``, keyed by the deterministic call id so a retry is counted
once) and settles the reservation.
"""

from __future__ import annotations

import contextlib
import dataclasses

from mesh_contracts.v1 import BudgetDenied, BudgetGranted, BudgetReserve, TokenUsage, UsageRecorded
from mesh_kit import telemetry as tel
from mesh_kit.bus import Delivery, Mesh
from mesh_kit.ledger import Ledger
from mesh_llm import ChatModel, ModelRequest, ModelResponse, ToolCall

PRICES_V1 = {"scripted": (0.0, 0.0)}  # provider -> (usd per 1k input, usd per 1k output)


class BudgetExceeded(Exception):
    """The budget service denied the reservation; the model was not called."""


def cost(provider: str, input_tokens: int, output_tokens: int) -> float:
    pin, pout = PRICES_V1.get(provider, (0.0, 0.0))
    return round(input_tokens / 1000 * pin + output_tokens / 1000 * pout, 10)


async def call_model(
    mesh: Mesh, model: ChatModel, request: ModelRequest, *, tenant: str, task_id: str, step_id: str, call_id: str
) -> tuple[ModelResponse, TokenUsage]:
    prompt_tokens = model.count(request)
    worst = prompt_tokens + request.max_tokens
    answer = await mesh.request(
        BudgetReserve(
            tenant=tenant,
            task_id=task_id,
            agent=mesh.service,
            step_id=step_id,
            call_id=call_id,
            tokens=worst,
            cost_usd=cost(model.provider, prompt_tokens, request.max_tokens),
        )
    )
    if isinstance(answer, BudgetDenied):
        raise BudgetExceeded(answer.reason)
    assert isinstance(answer, BudgetGranted)
    with mesh.tracer.start_as_current_span(f"chat {model.model}") as span:
        span.set_attributes(
            {
                tel.GEN_AI_OPERATION: "chat",
                tel.GEN_AI_PROVIDER: model.provider,
                tel.GEN_AI_REQUEST_MODEL: model.model,
                tel.GEN_AI_AGENT_NAME: request.agent,
                tel.GEN_AI_CONVERSATION_ID: task_id,
                tel.A_STEP: step_id,
            }
        )
        response = await model.complete(request)
        mesh.count(tel.M_LLM_CALLS)  # calls actually made (the budget counts distinct call ids)
        span.set_attributes(
            {
                tel.GEN_AI_RESPONSE_MODEL: response.model,
                tel.GEN_AI_INPUT_TOKENS: response.input_tokens,
                tel.GEN_AI_OUTPUT_TOKENS: response.output_tokens,
                tel.GEN_AI_FINISH_REASONS: [response.finish_reason],
            }
        )
    usd = cost(response.provider, response.input_tokens, response.output_tokens)
    await mesh.publish(
        UsageRecorded(
            tenant=tenant,
            task_id=task_id,
            agent=mesh.service,
            role=request.agent,
            step_id=step_id,
            call_id=call_id,
            provider=response.provider,
            model=response.model,
            input_tokens=response.input_tokens,
            output_tokens=response.output_tokens,
            cost_usd=usd,
            reservation_id=answer.reservation_id,
        ),
        key=call_id,
    )
    return response, TokenUsage(
        input_tokens=response.input_tokens, output_tokens=response.output_tokens, cost_usd=usd, calls=1
    )


async def call_model_once(
    mesh: Mesh,
    ledger: Ledger | None,
    model: ChatModel,
    request: ModelRequest,
    *,
    tenant: str,
    task_id: str,
    step_id: str,
    call_id: str,
    delivery: Delivery | None = None,
) -> tuple[ModelResponse, TokenUsage]:
    """``call_model`` under the idempotency ledger: a redelivered step gets the recorded response
    of a call that already completed instead of paying for it again. Heartbeats keep the
    message while the call runs."""

    async def perform(_key: str) -> dict:
        async with delivery.keepalive() if delivery is not None else contextlib.nullcontext():
            response, usage = await call_model(
                mesh, model, request, tenant=tenant, task_id=task_id, step_id=step_id, call_id=call_id
            )
        return {
            "response": {
                **dataclasses.asdict(response),
                "tool_calls": [dataclasses.asdict(c) for c in response.tool_calls],
            },
            "usage": usage.model_dump(mode="json"),
        }

    if ledger is None:
        record = await perform("")
    else:
        owner, attempt = (delivery.owner, delivery.deliveries) if delivery is not None else ("", 1)
        record = await ledger.run(ledger.key(tenant, task_id, "llm", call_id), perform, owner=owner, attempt=attempt)
    r = record["response"]
    response = ModelResponse(**{**r, "tool_calls": tuple(ToolCall(**c) for c in r["tool_calls"])})
    return response, TokenUsage(**record["usage"])


def scripted_or_configured() -> ChatModel:
    """The model a service uses. Only the scripted model exists until the gateway lands."""
    import os

    from mesh_llm import ScriptedModel

    name = os.environ.get("MESH_MODEL", "scripted")
    if name != "scripted":
        raise SystemExit(f"configuration error: MESH_MODEL={name!r} is not available yet (only 'scripted')")
    return ScriptedModel()
