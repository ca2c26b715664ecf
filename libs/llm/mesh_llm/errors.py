"""What can go wrong calling a model, as the gateway sees it.

Every provider maps its failures onto ``ProviderError`` with a ``kind`` (the OpenTelemetry
``error.type``), whether a retry can help, and the server's ``Retry-After`` when it sent one.
"""

from __future__ import annotations


class LlmError(Exception):
    """Raised by mesh_llm (a subclass says what)."""


class ProviderError(RuntimeError, LlmError):
    """A provider call failed. ``retryable`` says whether the same call may succeed later."""

    def __init__(
        self,
        message: str,
        *,
        kind: str = "provider_error",
        provider: str = "",
        model: str = "",
        status: int | None = None,
        retry_after: float | None = None,
        retryable: bool = True,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        """``rate_limited`` | ``server_error`` | ``timeout`` | ``stalled`` | ``connection`` |
        ``malformed`` | ``bad_request`` | ``auth`` | ``context_overflow`` | ``circuit_open`` ..."""
        self.provider = provider
        self.model = model
        self.status = status
        self.retry_after = retry_after
        """Seconds the server asked us to wait (``Retry-After``), if it said."""
        self.retryable = retryable


class CircuitOpen(ProviderError):
    """The breaker for this provider/model is open: the call was not made. Try the next model."""

    def __init__(self, message: str, *, provider: str = "", model: str = "", retry_after: float | None = None) -> None:
        super().__init__(
            message, kind="circuit_open", provider=provider, model=model, retry_after=retry_after, retryable=False
        )


class ContextOverflow(ProviderError):
    """The request does not fit the model's context window (and no strategy was declared)."""

    def __init__(self, message: str, *, provider: str = "", model: str = "") -> None:
        super().__init__(message, kind="context_overflow", provider=provider, model=model, retryable=False)


class UnknownRoute(ProviderError):
    """The request names a route (``ModelRequest.route``) this gateway does not have: permanent
    for this service, whatever is retried."""

    def __init__(self, route: str, known: list[str]) -> None:
        super().__init__(
            f"no model route {route!r} here (routes: {', '.join(sorted(known))})", kind="unknown_route", retryable=False
        )
        self.route = route


class AllModelsFailed(ProviderError):
    """Every model in the fallback chain failed; ``attempts`` says how, in order."""

    def __init__(self, message: str, attempts: list[ProviderError]) -> None:
        last = attempts[-1] if attempts else None
        super().__init__(
            message,
            kind=last.kind if last else "provider_error",
            provider=last.provider if last else "",
            model=last.model if last else "",
            retryable=any(a.retryable for a in attempts),
        )
        self.attempts = attempts


class ConfigError(ValueError, LlmError):
    """The model configuration is invalid (an unpinned alias, an unknown provider, ...)."""
