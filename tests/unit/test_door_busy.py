"""A door's ``busy`` answer: its retry-after is the client's own place on the drain of its
tenant's queue, so clients turned away together do not come back together."""

from __future__ import annotations

import random
from collections import deque

import pytest

from mesh_tenancy.door import BUSY_CEILING_S, BUSY_FLOOR_S, QUEUE_PER_TENANT, Door
from mesh_tenancy.retry_after import RetryLine

pytestmark = pytest.mark.unit


def door(workers: int, tenants: int) -> Door:
    d = Door(mesh=None, doors=[], quotas=None)  # type: ignore[arg-type]  # busy_for needs neither
    d._workers = [None] * workers  # type: ignore[list-item]
    for i in range(tenants):
        d._queues[f"t{i}"] = deque()
    d.handle_s = 0.01
    d.line = RetryLine(BUSY_FLOOR_S, BUSY_CEILING_S, random.Random(3))
    return d


def test_clients_turned_away_together_are_spread_after_their_queue_has_drained():
    d = door(workers=4, tenants=2)  # one of t0's requests taken every 0.01 * 2 / 4 = 5 ms
    waits = [d.busy_for("t0", QUEUE_PER_TENANT, now=100.0) for _ in range(200)]
    drained = QUEUE_PER_TENANT * 0.005  # 0.32 s
    assert all(drained <= w <= drained + BUSY_CEILING_S + 0.001 for w in waits), (min(waits), max(waits))
    assert len(set(waits)) == 200, "no two told the same"
    assert waits == sorted(waits), "one after another, a request's time apart"
    assert max(waits) == pytest.approx(drained + 200 * 0.005, abs=0.005)


def test_a_busy_retry_after_is_never_below_the_floor_nor_past_the_ceiling():
    d = door(workers=64, tenants=1)
    d.handle_s = 0.0001
    assert d.busy_for("t0", 1, now=0.0) >= BUSY_FLOOR_S
    d = door(workers=1, tenants=50)
    d.handle_s = 2.0
    waits = [d.busy_for("t0", QUEUE_PER_TENANT, now=0.0) for _ in range(20)]  # a drain of 6400 s estimated
    assert all(BUSY_CEILING_S * 1.5 <= w <= 2 * BUSY_CEILING_S + 0.001 for w in waits), waits
    assert len(set(waits)) > 1
