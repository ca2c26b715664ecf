"""Retry backoff and circuit breakers for model calls.

The breaker is the mesh's one (``mesh_resilience``, also used by the budget service); retry
backoff is here. Both are pure, clock-injected state machines so the gateway (and property
tests) can drive them deterministically. Which failures count against a provider is decided in one place,
``is_provider_fault``: a malformed request from us must neither trip a provider's breaker
nor be retried on the same model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mesh_llm.errors import ProviderError
from mesh_resilience import BreakerPolicy, Breakers, CircuitBreaker, State

__all__ = [
    "BreakerPolicy",
    "Breakers",
    "CircuitBreaker",
    "RetryPolicy",
    "State",
    "is_provider_fault",
]

PROVIDER_FAULTS = frozenset(
    {"server_error", "overloaded", "rate_limited", "timeout", "stalled", "connection", "malformed", "provider_error"}
)
"""Kinds that say the provider misbehaved: they count against its breaker and may be retried."""

CALLER_FAULTS = frozenset({"bad_request", "auth", "context_overflow", "not_found"})
"""Kinds that say the request (or our credentials) is wrong: the same call will fail again."""


def is_provider_fault(error: ProviderError) -> bool:
    """Whether ``error`` counts as a failure of the provider (for breakers and retries).

    Unknown kinds count as provider faults: an adapter that invents a new kind most likely
    saw the provider misbehave, and under-counting would keep a broken provider in rotation.
    ``circuit_open`` is not a call at all, so it never counts.
    """
    return error.kind not in CALLER_FAULTS and error.kind != "circuit_open"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry one model before falling back to the next."""

    max_attempts: int = 3
    """Attempts per model in the chain (the first call included)."""
    base_s: float = 0.25
    max_s: float = 8.0
    max_retry_after_s: float = 30.0
    """A server asking us to wait longer than this is skipped for the fallback instead."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_s < 0 or self.max_s < 0 or self.max_retry_after_s < 0:
            raise ValueError("retry delays must not be negative")

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float | None:
        """Seconds to wait after failed attempt number ``attempt`` (1-based), or None to give up.

        Full jitter (uniform in ``[0, min(max_s, base_s * 2**(attempt-1))]``) spreads the retries
        of many clients that failed together. A server's ``Retry-After`` is a floor: retrying
        earlier is sure to be refused again. One beyond ``max_retry_after_s`` means None: the
        caller is better served by the next model than by waiting.
        """
        if attempt < 1:
            raise ValueError("attempt is 1-based")
        # The exponent is capped so huge attempt numbers cannot overflow a float.
        cap = min(self.max_s, self.base_s * 2.0 ** min(attempt - 1, 64))
        jitter = rng.uniform(0, cap)
        if retry_after is None:
            return jitter
        if retry_after > self.max_retry_after_s:
            return None
        return max(retry_after, jitter)
