"""What one budget replica remembers of a task between its messages: its facts (start, limits,
step shares), its labels, whether it was told of a failing provider.

All of it is a copy of what the task's status record or the streams say, kept so that a task's
next reservation or usage does not read the record again. So it is kept for as long as it saves
reads, not for as long as the replica runs: an entry goes when its task ends (the watch sees the
end), when it was not used for ``idle_s`` (a task whose end this replica does not follow, or one
waiting on a person), and, oldest use first, beyond ``cap``. A task whose entry went is read from
its record again at its next message, which gives the same answer (a record's start, limits and
labels never change once written) or the refusal of a task that ended.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")

CAP = 20_000
"""Entries kept at most, whatever their age (the least recently used go first)."""


class Recent(Generic[V]):
    """A per-task memory that forgets what was not used lately (see the module)."""

    def __init__(self, idle_s: float, *, cap: int = CAP, clock: Callable[[], float] = time.monotonic) -> None:
        if idle_s <= 0 or cap < 1:
            raise ValueError("idle_s must be positive and cap at least 1")
        self.idle_s, self.cap, self._clock = idle_s, cap, clock
        self._kept: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        """key -> (last used, value), least recently used first."""

    def get(self, key: Hashable) -> V | None:
        """The value kept under ``key`` (it counts as used now), or None."""
        hit = self._touch(key)
        return None if hit is None else hit[1]

    def __contains__(self, key: Hashable) -> bool:
        """Whether something is kept under ``key`` (it counts as used now)."""
        return self._touch(key) is not None

    def _touch(self, key: Hashable) -> tuple[float, V] | None:
        now = self._clock()
        self._prune(now)
        hit = self._kept.get(key)
        if hit is not None:
            self._kept[key] = hit = (now, hit[1])
            self._kept.move_to_end(key)
        return hit

    def put(self, key: Hashable, value: V) -> V:
        """Keep ``value`` under ``key`` (used now); returns ``value``."""
        now = self._clock()
        self._kept[key] = (now, value)
        self._kept.move_to_end(key)
        self._prune(now)
        return value

    def forget(self, key: Hashable) -> None:
        """The task ended: nothing kept for it saves a read any more."""
        self._kept.pop(key, None)

    def _prune(self, now: float) -> None:
        kept = self._kept
        while kept and (len(kept) > self.cap or next(iter(kept.values()))[0] < now - self.idle_s):
            kept.popitem(last=False)

    def __len__(self) -> int:
        """Entries kept and not yet idle too long."""
        self._prune(self._clock())
        return len(self._kept)
