"""Retry backoff and circuit breakers for model calls.

Both are pure, clock-injected state machines so the gateway (and property tests) can drive
them deterministically. Which failures count against a provider is decided in one place,
``is_provider_fault``: a malformed request from us must neither trip a provider's breaker
nor be retried on the same model.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from mesh_llm.errors import ProviderError

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


@dataclass(frozen=True)
class BreakerPolicy:
    """When a breaker opens and how long it stays open."""

    window_s: float = 30.0
    min_calls: int = 5
    failure_rate: float = 0.5
    cooldown_s: float = 15.0

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.cooldown_s < 0 or self.min_calls < 1 or not 0 < self.failure_rate <= 1:
            raise ValueError("invalid breaker policy")


State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Closed → open → half-open breaker for one provider/model, over a rolling window.

    Closed: every call is allowed; outcomes are kept for ``window_s``. Once the window holds at
    least ``min_calls`` outcomes of which ``failure_rate`` failed, it opens. Open: calls are
    refused for ``cooldown_s``. Half-open: one probe call at a time is admitted; its success
    closes the breaker (with a fresh window), its failure re-opens it for another cooldown.
    """

    def __init__(self, name: str, policy: BreakerPolicy | None = None, clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.policy = policy or BreakerPolicy()
        self._clock = clock
        self._window: deque[tuple[float, bool]] = deque()
        self._state: State = "closed"
        self._opened_at = 0.0
        self._probing = False
        self.total_calls = 0
        self.total_failures = 0

    @property
    def state(self) -> State:
        """The current state; an open breaker whose cooldown is over reads as half-open."""
        if self._state == "open" and self._clock() - self._opened_at >= self.policy.cooldown_s:
            self._state = "half_open"
            self._probing = False
        return self._state

    def allow(self) -> bool:
        """Whether a call may go ahead now. In half-open this claims the single probe slot."""
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._probing:
            return False
        self._probing = True
        return True

    def release(self) -> None:
        """Give back a probe slot whose call ended without a verdict (a caller fault, a
        cancellation, a hook refusing it). Without this a lost probe would wedge the breaker."""
        self._probing = False

    def record(self, ok: bool) -> None:
        """Account the outcome of an allowed call."""
        self.total_calls += 1
        self.total_failures += not ok
        now = self._clock()
        state = self.state
        if state == "half_open":
            if not self._probing:
                return  # a straggler admitted before the breaker opened: the probe decides
            self._probing = False
            if ok:
                self._state = "closed"
                self._window.clear()
            else:
                self._open(now)
            return
        if state == "open":
            return  # stragglers finishing during the cooldown change nothing
        self._window.append((now, ok))
        self._prune(now)
        failures = sum(1 for _, good in self._window if not good)
        if len(self._window) >= self.policy.min_calls and failures >= self.policy.failure_rate * len(self._window):
            self._open(now)

    def retry_in(self) -> float:
        """Seconds until an open breaker admits a probe (0 when it is not open)."""
        if self.state != "open":
            return 0.0
        # Clamped: float rounding must not report more than a whole cooldown.
        return min(self.policy.cooldown_s, max(0.0, self._opened_at + self.policy.cooldown_s - self._clock()))

    def counts(self) -> tuple[int, int]:
        """(calls, failures) in the current rolling window."""
        self._prune(self._clock())
        return len(self._window), sum(1 for _, ok in self._window if not ok)

    def _open(self, now: float) -> None:
        self._state = "open"
        self._opened_at = now
        self._probing = False
        self._window.clear()

    def _prune(self, now: float) -> None:
        while self._window and self._window[0][0] <= now - self.policy.window_s:
            self._window.popleft()


class Breakers:
    """One breaker per ``provider/model`` key, created on first use."""

    def __init__(self, policy: BreakerPolicy | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy or BreakerPolicy()
        self._clock = clock
        self._by_key: dict[str, CircuitBreaker] = {}

    def get(self, key: str) -> CircuitBreaker:
        """The breaker for ``key`` (``provider/model``)."""
        if key not in self._by_key:
            self._by_key[key] = CircuitBreaker(key, self.policy, self._clock)
        return self._by_key[key]

    def __iter__(self) -> Iterator[CircuitBreaker]:
        return iter(list(self._by_key.values()))

    def __len__(self) -> int:
        return len(self._by_key)
