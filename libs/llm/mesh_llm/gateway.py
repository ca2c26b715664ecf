"""The model gateway: one ``ChatModel`` in front of routed fallback chains of real ones.

A request is routed to a chain (tiering by agent role and step difficulty), then each model
of the chain is tried in order: skipped while its breaker is open, retried with jittered
backoff on retryable provider faults, left for the next model on anything else. The caller
sees every attempt through ``AttemptHooks`` (that is where budgets are reserved and spent).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mesh_llm.errors import AllModelsFailed, CircuitOpen, ConfigError, LlmError, ProviderError, UnknownRoute
from mesh_llm.model import ChatModel, ModelRequest, ModelResponse, StreamEvent, Timeouts, TokenSink
from mesh_llm.resilience import BreakerPolicy, Breakers, RetryPolicy, is_provider_fault

ResetSink = Callable[[str], Awaitable[None]]
"""Told (with a reason) that text already forwarded belongs to a failed attempt: discard it."""


def model_key(model: ChatModel) -> str:
    """``provider/model``: the name breakers, snapshots and error reports use."""
    return f"{model.provider}/{model.model}"


@dataclass(frozen=True)
class Attempt:
    """One call (about to be) made to one model of a chain."""

    model: ChatModel
    request: ModelRequest
    number: int
    """1-based over the whole gateway call (unique per ``before``)."""
    route: str
    position: int
    """Index of ``model`` in the chain."""
    retry: int
    """1-based attempt number on this model."""

    @property
    def key(self) -> str:
        return model_key(self.model)


class AttemptHooks(Protocol):
    """The caller's view of each attempt (budget reservation and accounting)."""

    async def before(self, attempt: Attempt) -> None:
        """Called before each call. Raise ``CircuitOpen`` to skip this model for the next one;
        any other exception aborts the whole gateway call and reaches the caller unchanged."""
        ...

    async def after(
        self, attempt: Attempt, response: ModelResponse | None, error: BaseException | None, elapsed_s: float
    ) -> None:
        """Called after each call that ``before`` let through, failed or not."""
        ...


class _CallerError(LlmError):
    """Carries an exception raised by a caller's callback out of the model-error handling."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class Gateway:
    """A ``ChatModel`` that routes, retries, breaks circuits and falls back across models."""

    provider = "gateway"

    def __init__(
        self,
        routes: Mapping[str, Sequence[ChatModel]],
        *,
        retry: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
        timeouts: Timeouts | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if "default" not in routes:
            raise ConfigError("routes: a 'default' route is required")
        for name, chain in routes.items():
            if not chain:
                raise ConfigError(f"routes.{name}: a route needs at least one model")
        self.routes = {name: list(chain) for name, chain in routes.items()}
        self.retry = retry or RetryPolicy()
        self.timeouts = timeouts or Timeouts()
        self.breakers = Breakers(breaker or BreakerPolicy(), clock)
        self.model = "default"
        self.context_window = min(m.context_window for m in self.routes["default"])
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()

    def route_for(self, request: ModelRequest) -> tuple[str, list[ChatModel]]:
        """The route the request names (``route``), else the most specific one: ``agent:difficulty``,
        ``agent``, ``difficulty``, ``default``."""
        if request.route:
            if request.route not in self.routes:
                raise UnknownRoute(request.route, list(self.routes))
            return request.route, self.routes[request.route]
        for name in (f"{request.agent}:{request.difficulty}", request.agent, request.difficulty):
            if name and name != ":" and name in self.routes:
                return name, self.routes[name]
        return "default", self.routes["default"]

    def count(self, request: ModelRequest) -> int:
        """Prompt tokens as the first model of the default route would bill them."""
        return self.routes["default"][0].count(request)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per model of every route: breaker state and window counts (for /status pages)."""
        out: dict[str, dict[str, Any]] = {}
        for chain in self.routes.values():
            for model in chain:
                breaker = self.breakers.get(model_key(model))
                calls, failures = breaker.counts()
                out[breaker.name] = {
                    "state": breaker.state,
                    "calls": calls,
                    "failures": failures,
                    "retry_in_s": round(breaker.retry_in(), 3),
                    "total_calls": breaker.total_calls,
                    "total_failures": breaker.total_failures,
                }
        return out

    async def complete(
        self,
        request: ModelRequest,
        *,
        hooks: AttemptHooks | None = None,
        on_token: TokenSink | None = None,
        on_reset: ResetSink | None = None,
    ) -> ModelResponse:
        """Answer ``request`` from the first model of its route that can; see the module doc.

        With ``on_token`` the models are streamed and every delta is forwarded as it arrives;
        when an attempt fails after forwarding some, ``on_reset`` is awaited before anything
        else happens, so the client can drop the partial text. Raises ``AllModelsFailed``.
        """
        route, chain = self.route_for(request)
        errors: list[ProviderError] = []
        summary: list[str] = []
        number = 0
        for position, model in enumerate(chain):
            breaker = self.breakers.get(model_key(model))
            made = 0
            last: ProviderError | None = None
            while made < self.retry.max_attempts:
                probe = breaker.state == "half_open"  # no await until allow(): nobody else claims it
                if not breaker.allow():
                    last = CircuitOpen(
                        f"circuit open (retry in {breaker.retry_in():.1f}s)",
                        provider=model.provider,
                        model=model.model,
                        retry_after=breaker.retry_in(),
                    )
                    errors.append(last)
                    break
                number += 1
                attempt = Attempt(model, request, number, route, position, made + 1)
                try:
                    if hooks is not None:
                        try:
                            await hooks.before(attempt)
                        except CircuitOpen as refused:  # the mesh-wide breaker said no
                            last = refused
                            errors.append(refused)
                            break
                    made += 1
                    response, error, forwarded, elapsed = await self._attempt(model, request, on_token)
                    # In half-open only the probe's verdict counts; a straggler's does not.
                    if (error is None or is_provider_fault(error)) and (probe or breaker.state != "half_open"):
                        breaker.record(error is None)
                    if hooks is not None:
                        await hooks.after(attempt, response, error, elapsed)
                finally:
                    if probe:
                        breaker.release()  # a probe that got no verdict must not wedge the breaker
                if response is not None:
                    return response
                assert error is not None
                last = error
                errors.append(error)
                if forwarded and on_reset is not None:
                    await on_reset(f"{model_key(model)} failed mid-stream: {error}")
                if not (error.retryable and is_provider_fault(error)) or made >= self.retry.max_attempts:
                    break
                delay = self.retry.delay(made, error.retry_after, self._rng)
                if delay is None:
                    break  # the server wants a longer pause than we accept: next model
                await self._sleep(delay)
            if last is not None:
                tries = f" ({made} attempt{'s' if made != 1 else ''})" if made else ""
                key = model_key(model)  # adapters often prefix their messages with it already
                summary.append(f"{key}: {str(last).removeprefix(f'{key}: ')}{tries}")
        raise AllModelsFailed(f"all {len(chain)} models failed: " + "; ".join(summary), errors)

    async def _attempt(
        self, model: ChatModel, request: ModelRequest, on_token: TokenSink | None
    ) -> tuple[ModelResponse | None, ProviderError | None, bool, float]:
        """One call under the total timeout: (response, error, text forwarded?, elapsed)."""
        forwarded = False

        async def call() -> ModelResponse:
            nonlocal forwarded
            if on_token is None:
                return await model.complete(request)
            response = None
            stream = model.stream(request)
            try:
                async for event in stream:
                    if event.response is not None:
                        response = event.response
                    elif event.text:
                        forwarded = True
                        try:
                            await on_token(event.text)
                        except Exception as exc:
                            raise _CallerError(exc) from exc
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()  # frees the provider connection when we stop early
            if response is None:
                raise ProviderError("stream ended without a final response", kind="malformed")
            return response

        started = self._clock()
        caller_error: Exception | None = None
        try:
            async with asyncio.timeout(self.timeouts.total_s):
                response = await call()
            return response, None, forwarded, self._clock() - started
        except _CallerError as caller:
            caller_error = caller.error
        except TimeoutError:
            error = ProviderError(f"no answer within {self.timeouts.total_s:g}s", kind="timeout")
        except ProviderError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - any adapter bug is the provider's fault, kept as the cause
            error = ProviderError(f"{type(exc).__name__}: {exc}", kind="provider_error")
            error.__cause__ = exc
        if caller_error is not None:
            raise caller_error  # outside the except block: the caller's exception, unchained
        # Fill in who failed so AllModelsFailed.attempts is self-describing.
        error.provider = error.provider or model.provider
        error.model = error.model or model.model
        return None, error, forwarded, self._clock() - started

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamEvent]:
        """Deltas as they arrive, then the response. This interface cannot retract text: after a
        mid-stream fallback the final response is authoritative (use ``complete(on_reset=...)``)."""
        queue: asyncio.Queue[StreamEvent | Exception] = asyncio.Queue(maxsize=1)

        async def sink(text: str) -> None:
            await queue.put(StreamEvent(text=text))

        async def run() -> None:
            try:
                await queue.put(StreamEvent(response=await self.complete(request, on_token=sink)))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
                await queue.put(exc)

        task = asyncio.create_task(run())
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.response is not None:
                    return
        finally:
            if not task.done():
                task.cancel()
