"""Retry-afters that do not herd: each refused client is given its own place on the drain.

A refusal tells the client when to come back (``retry_after_s``). Telling every client refused
in a burst the same wait brings them back together, to be refused together again (issue 37: 190
clients, all told 0.1 s). But the refuser knows how fast room comes back, the drain: a tenant's
tasks in flight end about ``in_flight / mean duration`` a second (Little's law), its token bucket
refills at its rate, a door's queue empties as fast as its handlers answer.

So refused clients are put in a virtual line on that drain (``RetryLine``). Each is given the next
free place, one drain interval wide, starting no earlier than the first moment anything could
pass (``earliest_s``: the next token; 0 where a slot may free any moment), and comes back at a
uniformly random point within its place. Clients refused together come back spread over the time
the drain needs to take them all, one per interval on average and (short of the ceiling) never more
than two within one interval, instead of all at once; and their waits differ, so neither do clients refused by
different replicas coincide. A place no longer in the future is free again: the line is only as
long as the clients still away.

Bounds: never sooner than ``floor_s`` (nor than ``earliest_s``); never later than ``earliest_s +
ceiling_s``: a place past that is given a random point in the ceiling's second half instead (still
spread; the line stops growing there).

The line is the refusing process's own (in memory, nothing written per refusal): with several
replicas each keeps one, and a burst shared among them comes back as much denser, still spread.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable

PRUNE_AT = 4096
"""Lines kept before the ones already drained are forgotten."""


class RetryLine:
    """Places in virtual lines, one line per key (a tenant and what it was refused for)."""

    def __init__(self, floor_s: float, ceiling_s: float, rng: random.Random | None = None) -> None:
        if not 0 <= floor_s <= ceiling_s:
            raise ValueError(f"need 0 <= floor_s <= ceiling_s, not {floor_s} and {ceiling_s}")
        self.floor_s, self.ceiling_s = floor_s, ceiling_s
        self.rng = rng or random.Random()
        self._tail: dict[Hashable, float] = {}
        """Per line, when its last place ends (a time like ``now``)."""

    def place(self, key: Hashable, now: float, interval_s: float, earliest_s: float = 0.0) -> float:
        """The ``retry_after_s`` of one more client refused at ``now``: room comes back one
        client every ``interval_s`` (the drain), and none before ``earliest_s`` from now."""
        interval, earliest = max(0.0, interval_s), max(0.0, earliest_s)
        limit = now + earliest + self.ceiling_s
        start = max(now + earliest, self._tail.get(key, 0.0))
        if start + interval <= limit:
            self._tail[key] = start + interval
            wait = start - now + self.rng.random() * interval
        else:  # past the ceiling: somewhere in its second half, and the line grows no further
            self._tail[key] = limit
            wait = earliest + self.ceiling_s * (0.5 + 0.5 * self.rng.random())
        if len(self._tail) > PRUNE_AT:
            for k in [k for k, end in self._tail.items() if end <= now]:
                del self._tail[k]
        return math.ceil(max(self.floor_s, wait) * 1000) / 1000  # in ms, never sooner than computed

    def waiting(self, key: Hashable, now: float) -> float:
        """How far ahead the line's last place ends (0: nobody is away)."""
        return max(0.0, self._tail.get(key, 0.0) - now)
