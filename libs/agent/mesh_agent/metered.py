"""Every model call goes through here: guard, context fit, cache, then the gateway, with a
budget reservation, a GenAI span and a usage record for every attempt it makes.

Each attempt (a retry, or a fallback model) reserves its own worst case (prompt +
max_tokens, priced for that model) from the budget service first; a denial means the call is
not made (a denial because the budget's provider circuit is open sends the gateway on to the
next model). The actual usage is then published (``usage.recorded``, keyed by the
deterministic call id so a redelivery is counted once) and settles the reservation; a failed
attempt publishes one too, with its error. The request's ``prompt_version`` (the ref of the
versioned prompt it was built from, ``mesh_agent.prompts``) goes on every attempt's span
(``mesh.prompt.version``) and every usage record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Span, StatusCode

from mesh_agent import genai, prices
from mesh_agent import metrics as agent_metrics
from mesh_agent.errors import AgentError
from mesh_contracts.v1 import BudgetDenied, BudgetGranted, BudgetReserve, Replay, TokenUsage, UsageRecorded
from mesh_durable import guard
from mesh_durable import metrics as durable_metrics
from mesh_durable.ledger import Ledger
from mesh_guardrails.redact import redact
from mesh_host import Mesh
from mesh_kit import Delivery
from mesh_kit import envelope as env
from mesh_kit import telemetry as tel
from mesh_llm import ChatModel, CircuitOpen, ModelRequest, ModelResponse, ProviderError, ToolCall
from mesh_llm.cache import ResponseCache
from mesh_llm.context import fit
from mesh_llm.gateway import Attempt, Gateway, model_key
from mesh_llm.resilience import RetryPolicy, is_provider_fault

if TYPE_CHECKING:
    from mesh_agent.settings import AgentSettings

log = logging.getLogger("mesh.models")


class BudgetExceeded(AgentError):
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


def cost(provider: str, model: str, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0,
         table: prices.PriceTable | None = None) -> float:  # fmt: skip
    """A call's cost from ``table`` (default: the built-in price table)."""
    return (table or prices.current()).price(provider, model).cost(input_tokens, output_tokens, cached_input_tokens)


@dataclasses.dataclass
class Models:
    """How a service reaches models: the gateway and the policies around every call."""

    gateway: Gateway
    cache: ResponseCache | None = None
    context_strategy: str = "error"
    """What to do with a request that overflows the model's window: ``error`` | ``drop_oldest`` |
    ``summarise`` (``MESH_CONTEXT_STRATEGY``)."""
    capture_content: bool = False
    """Put (PII-redacted) prompts and answers on spans
    (``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``)."""
    price_table: prices.PriceTable = dataclasses.field(default_factory=prices.current)
    """What calls are priced with (``MESH_PRICE_TABLE_FILE``; default: the built-in table)."""

    @classmethod
    def of(cls, model: ChatModel | Models) -> Models:
        """A bare model (a test's) as a one-model gateway that makes one attempt per call."""
        if isinstance(model, Models):
            return model
        if isinstance(model, Gateway):
            return cls(model)
        return cls(Gateway({"default": [model]}, retry=RetryPolicy(max_attempts=1)))


def configured(mesh: Mesh, settings: AgentSettings) -> Models:
    """The service's models from its settings: the gateway (``MESH_MODEL_CONFIG`` /
    ``MESH_MODEL``), the response cache, the context strategy, the price table. A model config or
    price table that cannot be used stops the service at start-up with a one-line reason."""
    from mesh_llm.config import gateway_for
    from mesh_llm.errors import ConfigError

    try:
        gateway = gateway_for(settings.model_config_file, settings.model)
    except ConfigError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    try:
        table = prices.current(settings.price_table_file)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"configuration error: MESH_PRICE_TABLE_FILE: {exc}") from None
    cache = None
    if mesh.settings.redis_url and settings.llm_cache:
        import redis.asyncio as aioredis

        cache = ResponseCache(
            aioredis.from_url(mesh.settings.redis_url),
            ttl_s=settings.llm_cache_ttl_s,
            namespace=f"{mesh.service}:llmcache",  # the service's Redis user owns only its own prefix
        )
        cache.on_lookup = lambda hit: mesh.count(
            agent_metrics.M_LLM_CACHE_HITS if hit else agent_metrics.M_LLM_CACHE_MISSES
        )
    return Models(gateway, cache, settings.context_strategy, settings.genai_capture_content, table)


async def _guard(mesh: Mesh, tenant: str, task_id: str) -> None:
    g = guard.of(mesh)
    if g is not None:
        stop = await g.check(tenant, task_id)
        if stop is not None:
            mesh.count(durable_metrics.M_CALLS_REFUSED)
            raise BudgetExceeded(stop.reason, stop.code, halted=stop.halted)


async def reserve(mesh: Mesh, model: ChatModel, request: ModelRequest, *, tenant: str, task_id: str, step_id: str,
                  call_id: str, prompt_tokens: int | None = None,
                  table: prices.PriceTable | None = None) -> BudgetGranted:  # fmt: skip
    """Reserve one attempt's worst case with ``model``, priced from ``table`` (default: the
    built-in one). Raises ``BudgetExceeded`` if the call must not be made, ``CircuitOpen`` if the
    budget's circuit for this provider/model is open."""
    try:
        price = (table or prices.current()).price(model.provider, model.model)
    except prices.UnpricedModel as exc:
        raise BudgetExceeded(str(exc), "unpriced_model") from None
    if prompt_tokens is None:
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
        if answer.code == "provider_breaker":
            raise CircuitOpen(answer.reason, provider=model.provider, model=model.model)
        mesh.count(durable_metrics.M_CALLS_REFUSED)
        raise BudgetExceeded(answer.reason, answer.code)
    assert isinstance(answer, BudgetGranted)
    return answer


def _usage_message(mesh: Mesh, request: ModelRequest, response: ModelResponse, usage: TokenUsage,
                   priced: tuple[str, str], *, tenant: str, task_id: str, step_id: str, call_id: str,
                   reservation_id: str, price_table: str) -> UsageRecorded:  # fmt: skip
    return UsageRecorded(
        tenant=tenant,
        task_id=task_id,
        agent=mesh.service,
        role=request.agent,
        step_id=step_id,
        call_id=call_id,
        provider=priced[0],
        model=priced[1],
        response_model=response.model if response.model != priced[1] else "",
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        cost_usd=usage.cost_usd,
        price_table=price_table,
        reservation_id=reservation_id,
        prompt_version=request.prompt_version,
    )


def _content(messages: Any) -> str:
    return redact(json.dumps(messages, ensure_ascii=False))[:8000]


class _Metered:
    """The gateway's attempt hooks: reserve before, span around, usage after, every attempt."""

    def __init__(self, mesh: Mesh, models: Models, request: ModelRequest, *, tenant: str, task_id: str, step_id: str,
                 call_id: str, delivery: int, counted: dict[str, int] | None = None) -> None:  # fmt: skip
        self.mesh, self.models, self.request = mesh, models, request
        self.tenant, self.task_id, self.step_id, self.call_id, self.delivery = (
            tenant,
            task_id,
            step_id,
            call_id,
            delivery,
        )
        self.grants: dict[int, BudgetGranted] = {}
        self.spans: dict[int, Span] = {}
        self.winner: BudgetGranted | None = None
        self.answered_by: ChatModel | None = None
        """The configured model of the attempt that answered: what the call is priced as."""
        self.counted = counted or {}
        """Prompt tokens already counted per ``provider/model`` (the context fit counted the first)."""

    def _reservation_call_id(self, a: Attempt) -> str:
        return self.call_id if a.number == 1 else f"{self.call_id}-r{self.delivery}n{a.number}"[:64]

    async def before(self, a: Attempt) -> None:
        grant = await reserve(
            self.mesh, a.model, a.request, tenant=self.tenant, task_id=self.task_id, step_id=self.step_id,
            call_id=self._reservation_call_id(a), prompt_tokens=self.counted.get(a.key), table=self.models.price_table,
        )  # fmt: skip
        self.grants[a.number] = grant
        span = self.mesh.tracer.start_span(
            f"chat {a.model.model}",
            attributes={
                genai.GEN_AI_OPERATION: "chat",
                genai.GEN_AI_PROVIDER: a.model.provider,
                genai.GEN_AI_REQUEST_MODEL: a.model.model,
                genai.GEN_AI_AGENT_NAME: a.request.agent,
                genai.GEN_AI_CONVERSATION_ID: self.task_id,
                genai.GEN_AI_REQUEST_MAX_TOKENS: a.request.max_tokens,
                tel.A_STEP: self.step_id,
                genai.A_ATTEMPT: a.number,
                genai.A_ROUTE: a.route,
            },
        )
        if a.request.prompt_version:
            span.set_attribute(genai.A_PROMPT_VERSION, a.request.prompt_version)
        if release := _release(self.tenant, self.task_id):
            span.set_attribute(tel.A_RELEASE, release)
        if self.models.capture_content:
            span.set_attribute(genai.GEN_AI_INPUT_MESSAGES, _content([m.to_dict() for m in a.request.messages]))
        self.spans[a.number] = span

    def _handed_on(self, a: Attempt, error: BaseException | None) -> bool:
        """Will the gateway make another attempt for this call (a retry, or the next model)?"""
        _, chain = self.models.gateway.route_for(self.request)
        retryable = isinstance(error, ProviderError) and error.retryable and is_provider_fault(error)
        return (retryable and a.retry < self.models.gateway.retry.max_attempts) or a.position < len(chain) - 1

    async def after(self, a: Attempt, response: ModelResponse | None, error: BaseException | None,
                    elapsed_s: float) -> None:  # fmt: skip
        span = self.spans.pop(a.number, None)
        grant = self.grants.get(a.number)
        genai.of(self.mesh).record(
            provider=a.model.provider, request_model=a.model.model, elapsed_s=elapsed_s,
            response_model=response.model if response is not None else "",
            input_tokens=response.input_tokens if response is not None else 0,
            output_tokens=response.output_tokens if response is not None else 0,
            error_type="" if response is not None else str(getattr(error, "kind", type(error).__name__)),
            release=_release(self.tenant, self.task_id),
        )  # fmt: skip
        if response is not None:
            self.winner, self.answered_by = grant, a.model
            self.mesh.count(agent_metrics.M_LLM_CALLS)  # calls actually made (the budget counts distinct call ids)
            if span is not None:
                span.set_attributes(
                    {
                        genai.GEN_AI_RESPONSE_MODEL: response.model,
                        genai.GEN_AI_INPUT_TOKENS: response.input_tokens,
                        genai.GEN_AI_OUTPUT_TOKENS: response.output_tokens,
                        genai.GEN_AI_FINISH_REASONS: [response.finish_reason],
                    }
                )
                if self.models.capture_content:
                    out = {"role": "assistant", "content": response.content,
                           "tool_calls": [dataclasses.asdict(c) for c in response.tool_calls]}  # fmt: skip
                    span.set_attribute(genai.GEN_AI_OUTPUT_MESSAGES, _content([out]))
                span.end()
            return
        kind = getattr(error, "kind", type(error).__name__)
        if span is not None:
            span.set_attribute(tel.ERROR_TYPE, kind)
            span.set_status(StatusCode.ERROR, redact(str(error))[:300])
            span.end()
        if grant is None:
            return
        # Every attempt is accounted: the failure settles its reservation and counts toward the
        # provider's error rate (the budget's provider circuit reads these).
        failed = UsageRecorded(
            tenant=self.tenant,
            task_id=self.task_id,
            agent=self.mesh.service,
            role=self.request.agent,
            step_id=self.step_id,
            call_id=f"{self.call_id}-x{self.delivery}n{a.number}"[:64],
            provider=a.model.provider,
            model=a.model.model,
            input_tokens=0,
            output_tokens=0,
            price_table=self.models.price_table.version,
            reservation_id=grant.reservation_id,
            error=f"{kind}: {redact(str(error))}"[:500],
            handed_on=self._handed_on(a, error),
            prompt_version=self.request.prompt_version,
        )
        with contextlib.suppress(Exception):
            await self.mesh.publish(failed, key=failed.call_id)


async def call_model(
    mesh: Mesh, model: ChatModel | Models, request: ModelRequest, *, tenant: str, task_id: str, step_id: str,
    call_id: str, attempt: int = 1, on_token: Any = None, on_reset: Any = None,
) -> tuple[ModelResponse, TokenUsage]:  # fmt: skip
    """One logical model call: guard, context fit, cache, then the gateway's attempts."""
    response, usage, _ = await _call_model(mesh, model, request, tenant=tenant, task_id=task_id, step_id=step_id,
                                           call_id=call_id, attempt=attempt, on_token=on_token, on_reset=on_reset)  # fmt: skip
    return response, usage


async def _call_model(
    mesh: Mesh, model: ChatModel | Models, request: ModelRequest, *, tenant: str, task_id: str, step_id: str,
    call_id: str, attempt: int = 1, on_token: Any = None, on_reset: Any = None,
) -> tuple[ModelResponse, TokenUsage, tuple[str, str]]:  # fmt: skip
    """``call_model``, and the configured (provider, model) the call was priced as."""
    models = Models.of(model)
    await _guard(mesh, tenant, task_id)
    route, chain = models.gateway.route_for(request)
    window = min(m.context_window for m in chain)
    fitted = await fit(request, window=window, count=chain[0].count, strategy=models.context_strategy)
    if fitted.dropped:
        request = fitted.request
        await mesh.progress(tenant, task_id, "context.trimmed", fitted.describe(), step_id=step_id, key=call_id,
                            detail={"dropped": len(fitted.dropped), "summarised": bool(fitted.summary)})  # fmt: skip
    cache_key = "+".join(f"{m.provider}/{m.model}" for m in chain)
    if models.cache is not None and request.cache:
        hit = await models.cache.get(tenant, route, cache_key, request)
        if hit is not None:
            if on_token is not None and hit.content:
                await on_token(hit.content)
            return hit, TokenUsage(), (chain[0].provider, chain[0].model)
    hooks = _Metered(mesh, models, request, tenant=tenant, task_id=task_id, step_id=step_id, call_id=call_id,
                     delivery=attempt, counted={model_key(chain[0]): fitted.prompt_tokens})  # fmt: skip
    response = await models.gateway.complete(request, hooks=hooks, on_token=on_token, on_reset=on_reset)
    cached = getattr(response, "cached_input_tokens", 0)
    # Priced as the configured model it was reserved for, whatever id the provider echoes back
    # (a dated snapshot of a pinned alias, say): the price was checked before the call was made,
    # so a call that was paid for is always accounted.
    priced = hooks.answered_by or chain[0]
    usage = TokenUsage(
        input_tokens=response.input_tokens,
        output_tokens=response.output_tokens,
        cached_input_tokens=cached,
        cost_usd=cost(
            priced.provider, priced.model, response.input_tokens, response.output_tokens, cached, models.price_table
        ),
        calls=1,
    )
    grant = hooks.winner
    await mesh.publish(
        _usage_message(
            mesh, request, response, usage, (priced.provider, priced.model), tenant=tenant, task_id=task_id,
            step_id=step_id, call_id=call_id, reservation_id=grant.reservation_id if grant is not None else call_id,
            price_table=models.price_table.version,
        ),
        key=call_id,
    )  # fmt: skip
    if models.cache is not None and request.cache:
        await models.cache.put(tenant, route, cache_key, request, response)
    return response, usage, (priced.provider, priced.model)


def _response(r: dict[str, Any]) -> ModelResponse:
    """A response as the ledger records it (``call_model_once``), back as a ``ModelResponse``."""
    return ModelResponse(**{**r, "tool_calls": tuple(ToolCall(**c) for c in r["tool_calls"])})


async def call_model_once(
    mesh: Mesh,
    ledger: Ledger | None,
    model: ChatModel | Models,
    request: ModelRequest,
    *,
    tenant: str,
    task_id: str,
    step_id: str,
    call_id: str,
    delivery: Delivery | None = None,
    on_token: Any = None,
    on_reset: Any = None,
    replay: Replay | None = None,
    claim: bool = True,
) -> tuple[ModelResponse, TokenUsage]:
    """``call_model`` under the idempotency ledger: a redelivered step gets the recorded response
    of a call that already completed instead of paying for it again. Heartbeats keep the
    message while the call runs.

    ``claim``: while the call runs, a *different* message making the same call waits for its
    record instead of calling too (the planner: copies of one submission under other message
    ids). ``claim=False`` records the call in one write, without the claim (the worker: a step's
    only duplicates are its own redeliveries, which take a claim over anyway).

    In a replayed task (``replay``) a call of a step the replay answers from recordings returns
    the replayed task's recorded response of the same call id: no reservation, no provider call,
    no usage (it cost nothing), like a cache hit. A call with no recording, and every call of
    the other steps, is made live, on ``replay.route`` when one is named."""

    if replay is not None:
        replayed = await _replayed(mesh, ledger, replay, tenant=tenant, task_id=task_id, step_id=step_id,
                                   call_id=call_id, on_token=on_token)  # fmt: skip
        if replayed is not None:
            return replayed, TokenUsage()
        if replay.route:
            request = dataclasses.replace(request, route=replay.route)

    performed: list[bool] = []

    async def perform(_key: str) -> dict[str, Any]:
        async with delivery.keepalive() if delivery is not None else contextlib.nullcontext():
            response, usage, priced = await _call_model(
                mesh, model, request, tenant=tenant, task_id=task_id, step_id=step_id, call_id=call_id,
                attempt=delivery.deliveries if delivery is not None else 1, on_token=on_token, on_reset=on_reset,
            )  # fmt: skip
            performed.append(True)
        return {
            "response": {
                **dataclasses.asdict(response),
                "tool_calls": [dataclasses.asdict(c) for c in response.tool_calls],
            },
            "usage": usage.model_dump(mode="json"),
            "priced": list(priced),
        }

    if ledger is None:
        record = await perform("")
    else:
        owner, attempt = (delivery.owner, delivery.deliveries) if delivery is not None else ("", 1)
        record = await ledger.run(ledger.key(tenant, task_id, "llm", call_id), perform, owner=owner,
                                  attempt=attempt, claim=claim)  # fmt: skip
    response = _response(record["response"])
    usage = TokenUsage(**record["usage"])
    if not performed:
        # Served from the ledger: the process that made the call may have died before its usage
        # reached the stream. Publishing again is free (same id: deduplicated, counted once).
        await mesh.publish(
            _usage_message(
                mesh, request, response, usage, tuple(record.get("priced") or (response.provider, response.model)),
                tenant=tenant, task_id=task_id, step_id=step_id, call_id=call_id, reservation_id=call_id,
                price_table=(model.price_table if isinstance(model, Models) else prices.current()).version,
            ),
            key=call_id,
        )  # fmt: skip
    return response, usage


async def _replayed(
    mesh: Mesh,
    ledger: Ledger | None,
    replay: Replay,
    *,
    tenant: str,
    task_id: str,
    step_id: str,
    call_id: str,
    on_token: Any,
) -> ModelResponse | None:
    """The replayed task's recorded response of this call (streamed to ``on_token`` as one piece),
    or None: the step is not answered from recordings, or this call has no recording (then a
    progress event says it was made live)."""
    if not replay.answers(step_id) or ledger is None:
        return None
    was = await ledger.recorded(ledger.key(tenant, replay.of, "llm", call_id))
    if was is None:
        await mesh.progress(
            tenant, task_id, "replay.live", f"{call_id}: no recorded response in {replay.of}; called the model",
            step_id=step_id, key=call_id, detail={"call_id": call_id, "of": replay.of},
        )  # fmt: skip
        return None
    await _guard(mesh, tenant, task_id)  # a halted or cancelled replay stops here too
    response = _response(was["response"])
    mesh.count(agent_metrics.M_LLM_REPLAYED)
    if on_token is not None and response.content:
        await on_token(response.content)
    return response


def _release(tenant: str, task_id: str) -> str:
    """The release the task's calls are made under (the message being handled says), or ''."""
    current = env.RELEASE.get()
    return current[2] if current is not None and current[:2] == (tenant, task_id) else ""
