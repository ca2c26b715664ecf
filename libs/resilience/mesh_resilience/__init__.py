"""The mesh's one circuit breaker, used by the model gateway (per process, in front of each
provider/model) and by the budget service (mesh-wide, folded from the usage stream).

- ``BreakerPolicy``: when a breaker opens (at least ``min_calls`` outcomes in the last
  ``window_s`` seconds, of which ``failure_rate`` failed) and for how long (``cooldown_s``);
- ``FailureWindow``: those outcomes, counted as they enter and leave the window, at times the
  caller gives (a clock reading, or the stored time of a message being folded);
- ``CircuitBreaker``: closed → open → half-open with one probe call at a time, for a caller
  that makes the calls itself (the gateway);
- ``Breakers``: one ``CircuitBreaker`` per key, created on first use.

The budget service cannot run a probe (it grants reservations; the calls happen elsewhere and
their outcome arrives later on the stream), so it uses the policy and the window and reopens
on the next failure after a cooldown instead.

Pure, clock-injected state machines, no dependencies: property tests drive them deterministically.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

__all__ = ["BreakerPolicy", "Breakers", "CircuitBreaker", "FailureWindow", "State"]


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


class FailureWindow:
    """The outcomes of the last ``policy.window_s`` seconds, and whether they call for opening."""

    def __init__(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self._outcomes: deque[tuple[float, bool]] = deque()
        self.failures = 0

    def add(self, now: float, ok: bool) -> None:
        self._outcomes.append((now, ok))
        self.failures += not ok
        self.prune(now)

    def prune(self, now: float) -> None:
        while self._outcomes and self._outcomes[0][0] <= now - self.policy.window_s:
            self.failures -= not self._outcomes.popleft()[1]

    def tripped(self) -> bool:
        """At least ``min_calls`` outcomes in the window and at least ``failure_rate`` of them failed."""
        calls = len(self._outcomes)
        return calls >= self.policy.min_calls and self.failures >= self.policy.failure_rate * calls

    def clear(self) -> None:
        self._outcomes.clear()
        self.failures = 0

    def __len__(self) -> int:
        return len(self._outcomes)


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
        self._window = FailureWindow(self.policy)
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
        self._window.add(now, ok)
        if self._window.tripped():
            self._open(now)

    def retry_in(self) -> float:
        """Seconds until an open breaker admits a probe (0 when it is not open)."""
        if self.state != "open":
            return 0.0
        # Clamped: float rounding must not report more than a whole cooldown.
        return min(self.policy.cooldown_s, max(0.0, self._opened_at + self.policy.cooldown_s - self._clock()))

    def counts(self) -> tuple[int, int]:
        """(calls, failures) in the current rolling window."""
        self._window.prune(self._clock())
        return len(self._window), self._window.failures

    def _open(self, now: float) -> None:
        self._state = "open"
        self._opened_at = now
        self._probing = False
        self._window.clear()


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
