"""Every model call goes through here: reserve, call, record usage.

The caller reserves the call's worst-case tokens (prompt + max_tokens) from the budget
service before calling; a denial means the call is not made. The actual usage is then
published (``usage.recorded``, keyed by the deterministic call id so a retry is counted
once) and settles the reservation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid

from mesh_contracts.v1 import BudgetDenied, BudgetGranted, BudgetReserve, TokenUsage, UsageRecorded
from mesh_kit import prices
from mesh_kit import telemetry as tel
from mesh_kit.bus import Delivery, Mesh
from mesh_kit.ledger import Ledger
from mesh_llm import ChatModel, ModelRequest, ModelResponse, ToolCall


class BudgetExceeded(Exception):
    """The budget service denied the reservation (or the guard stopped the task): the model
    was not called. ``code`` is the machine-readable cause (see ``BudgetDenied.code``)."""

    def __init__(self, reason: str, code: str = "", halted: bool = False) -> None:
        super().__init__(reason)
        self.code = code
        self.halted = halted

    def describe(self) -> str:
        """The refusal as a step or task failure reason that names its cause."""
        if self.code in ("stopped", "kill_switch") or self.halted:
            return f"stopped: {self}"
        return f"budget ({self.code}): {self}" if self.code else f"budget: {self}"


def cost(provider: str, model: str, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> float:
    return prices.current().price(provider, model).cost(input_tokens, output_tokens, cached_input_tokens)


async def reserve(mesh: Mesh, model: ChatModel, request: ModelRequest, *, tenant: str, task_id: str, step_id: str,
                  call_id: str) -> BudgetGranted:  # fmt: skip
    """Check the guard, then reserve the call's worst case. Raises ``BudgetExceeded`` if the
    call must not be made."""
    if mesh.guard is not None:
        stop = await mesh.guard.check(tenant, task_id)
        if stop is not None:
            mesh.count(tel.M_CALLS_REFUSED)
            raise BudgetExceeded(stop.reason, stop.code, halted=stop.halted)
    try:
        price = prices.current().price(model.provider, model.model)
    except prices.UnpricedModel as exc:
        raise BudgetExceeded(str(exc), "unpriced_model") from None
    prompt_tokens = model.count(request)
    answer = await mesh.request(
        BudgetReserve(
            tenant=tenant,
            task_id=task_id,
            agent=mesh.service,
            step_id=step_id,
            call_id=call_id,
            tokens=prompt_tokens + request.max_tokens,
            cost_usd=price.worst_case(prompt_tokens, request.max_tokens),
            provider=model.provider,
            model=model.model,
        )
    )
    if isinstance(answer, BudgetDenied):
        mesh.count(tel.M_CALLS_REFUSED)
        raise BudgetExceeded(answer.reason, answer.code)
    assert isinstance(answer, BudgetGranted)
    return answer


def _usage_message(mesh: Mesh, request: ModelRequest, response: ModelResponse, usage: TokenUsage, *, tenant: str,
                   task_id: str, step_id: str, call_id: str, reservation_id: str) -> UsageRecorded:  # fmt: skip
    return UsageRecorded(
        tenant=tenant,
        task_id=task_id,
        agent=mesh.service,
        role=request.agent,
        step_id=step_id,
        call_id=call_id,
        provider=response.provider,
        model=response.model,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        cost_usd=usage.cost_usd,
        price_table=prices.current().version,
        reservation_id=reservation_id,
    )


async def call_model(
    mesh: Mesh, model: ChatModel, request: ModelRequest, *, tenant: str, task_id: str, step_id: str, call_id: str,
    attempt: int = 1,
) -> tuple[ModelResponse, TokenUsage]:  # fmt: skip
    grant = await reserve(mesh, model, request, tenant=tenant, task_id=task_id, step_id=step_id, call_id=call_id)
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
        try:
            response = await model.complete(request)
        except Exception as exc:
            # Every attempt is accounted: the failure settles the reservation and counts toward
            # the provider's error rate (the budget's provider breaker reads these).
            span.set_attribute(tel.ERROR_TYPE, type(exc).__name__)
            failed = UsageRecorded(
                tenant=tenant,
                task_id=task_id,
                agent=mesh.service,
                role=request.agent,
                step_id=step_id,
                call_id=f"{call_id}-x{attempt}-{uuid.uuid4().hex[:6]}"[:64],
                provider=model.provider,
                model=model.model,
                input_tokens=0,
                output_tokens=0,
                price_table=prices.current().version,
                reservation_id=grant.reservation_id,
                error=f"{type(exc).__name__}: {exc}"[:500],
            )
            with contextlib.suppress(Exception):
                await mesh.publish(failed, key=failed.call_id)
            raise
        mesh.count(tel.M_LLM_CALLS)  # calls actually made (the budget counts distinct call ids)
        span.set_attributes(
            {
                tel.GEN_AI_RESPONSE_MODEL: response.model,
                tel.GEN_AI_INPUT_TOKENS: response.input_tokens,
                tel.GEN_AI_OUTPUT_TOKENS: response.output_tokens,
                tel.GEN_AI_FINISH_REASONS: [response.finish_reason],
            }
        )
    cached = getattr(response, "cached_input_tokens", 0)
    usage = TokenUsage(
        input_tokens=response.input_tokens,
        output_tokens=response.output_tokens,
        cached_input_tokens=cached,
        cost_usd=cost(response.provider, response.model, response.input_tokens, response.output_tokens, cached),
        calls=1,
    )
    await mesh.publish(
        _usage_message(
            mesh, request, response, usage, tenant=tenant, task_id=task_id, step_id=step_id, call_id=call_id,
            reservation_id=grant.reservation_id,
        ),
        key=call_id,
    )  # fmt: skip
    return response, usage


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

    performed: list[bool] = []

    async def perform(_key: str) -> dict:
        async with delivery.keepalive() if delivery is not None else contextlib.nullcontext():
            response, usage = await call_model(
                mesh, model, request, tenant=tenant, task_id=task_id, step_id=step_id, call_id=call_id,
                attempt=delivery.deliveries if delivery is not None else 1,
            )  # fmt: skip
            performed.append(True)
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
    usage = TokenUsage(**record["usage"])
    if not performed:
        # Served from the ledger: the process that made the call may have died before its usage
        # reached the stream. Publishing again is free (same id: deduplicated, counted once).
        await mesh.publish(
            _usage_message(
                mesh, request, response, usage, tenant=tenant, task_id=task_id, step_id=step_id, call_id=call_id,
                reservation_id=call_id,
            ),
            key=call_id,
        )  # fmt: skip
    return response, usage


def scripted_or_configured() -> ChatModel:
    """The model a service uses. Only the scripted model exists until the gateway lands."""
    import os

    from mesh_llm import ScriptedModel

    name = os.environ.get("MESH_MODEL", "scripted")
    if name != "scripted":
        raise SystemExit(f"configuration error: MESH_MODEL={name!r} is not available yet (only 'scripted')")
    return ScriptedModel()
