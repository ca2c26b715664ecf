"""Retry-afters of a burst of refusals are spread over the drain (``mesh_tenancy.retry_after``): never
sooner than anything could pass, nor than the floor, nor later than the ceiling; one client per
drain interval on average, never more than two in one; not all equal."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_tenancy.retry_after import RetryLine

pytestmark = pytest.mark.unit

FLOOR, CEILING = 0.1, 60.0
MS = 0.001  # waits are given in whole milliseconds, rounded up
EPS = 1e-6  # float error of times around 2e9 (time.time() now)

bursts = st.fixed_dictionaries(
    {
        "n": st.integers(1, 300),
        "interval": st.floats(0.0, 30.0),
        "earliest": st.floats(0.0, 20.0),
        "now": st.floats(0.0, 2e9),
        "seed": st.integers(0, 2**32),
    }
)


def burst(b: dict, line: RetryLine | None = None) -> list[float]:
    line = line or RetryLine(FLOOR, CEILING, random.Random(b["seed"]))
    return [line.place("acme", b["now"], b["interval"], b["earliest"]) for _ in range(b["n"])]


@given(bursts)
@settings(max_examples=300, deadline=None)
def test_every_wait_is_within_the_floor_the_earliest_moment_and_the_ceiling(b):
    for wait in burst(b):
        assert max(FLOOR, b["earliest"]) - EPS <= wait <= b["earliest"] + CEILING + MS + EPS


@given(bursts)
@settings(max_examples=300, deadline=None)
def test_each_client_short_of_the_ceiling_has_its_own_interval_so_at_most_two_return_in_any(b):
    """The k-th client refused comes back within [earliest + k·interval, earliest + (k+1)·interval]:
    one per interval of the drain. So no interval of the drain's width sees more than two of them
    come back (the ends of two neighbouring places)."""
    waits = burst(b)
    i, e = b["interval"], b["earliest"]
    short = [w for k, w in enumerate(waits) if (k + 1) * i <= CEILING - EPS]
    for k, w in enumerate(short):
        # The line's end is a time like ``now``, moved by one interval per client: each move may
        # round by half a unit in the last place of such a time (a microsecond's fraction near
        # 2e9), so k moves may be k of those off.
        slack = EPS + (k + 1) * math.ulp(b["now"] + e + CEILING)
        assert max(FLOOR, e + k * i) - slack <= w <= max(FLOOR, e + (k + 1) * i) + MS + slack, (k, w)
    if i >= 0.01 and e + i > FLOOR:
        for w in short:
            assert sum(1 for v in short if w <= v < w + i - MS) <= 2


@given(bursts)
@settings(max_examples=300, deadline=None)
def test_a_burst_is_spread_around_half_the_time_the_drain_needs_to_take_it(b):
    """The mean wait of n clients refused together is the earliest moment plus half of n drain
    intervals (they come back spread over all n), give or take half an interval and the floor;
    and, refused together, they are not told the same (unless the floor says so)."""
    waits = burst(b)
    n, i, e = b["n"], b["interval"], b["earliest"]
    if n * i > CEILING - EPS:
        return  # past the ceiling: the test above and the next one
    assert abs(statistics.fmean(waits) - (e + n * i / 2)) <= i / 2 + FLOOR + MS
    if n >= 2 and i >= 0.01 and e + i > FLOOR + MS:
        assert len(set(waits)) > 1, waits


def test_the_mean_of_a_large_burst_is_the_middle_of_its_drain():
    line = RetryLine(FLOOR, CEILING, random.Random(7))
    waits = [line.place("acme", 1000.0, 0.2, 0.0) for _ in range(200)]  # 200 clients, one slot every 0.2 s
    assert statistics.fmean(waits) == pytest.approx(200 * 0.2 / 2, abs=0.2 * 4 / (12 * 200) ** 0.5 + FLOOR / 200)
    assert len(set(waits)) == 200
    assert max(waits) <= 40.0 and sorted(waits) != [waits[0]] * 200


@given(st.integers(1, 500), st.floats(0.5, 30.0), st.integers(0, 2**32))
@settings(max_examples=100, deadline=None)
def test_past_the_ceiling_clients_are_spread_over_its_second_half(n, interval, seed):
    line = RetryLine(FLOOR, CEILING, random.Random(seed))
    waits = [line.place("acme", 0.0, interval) for _ in range(n)]
    beyond = waits[int(CEILING // interval) :]
    assert all(CEILING / 2 <= w <= CEILING + MS for w in beyond), beyond
    if len(beyond) >= 2:
        assert len(set(beyond)) > 1


def test_the_line_is_only_as_long_as_the_clients_still_away_and_each_key_has_its_own():
    line = RetryLine(FLOOR, CEILING, random.Random(1))
    first = [line.place(("acme", "too_many_in_flight"), 100.0, 1.0) for _ in range(10)]
    assert 9.0 <= first[-1] <= 10.0 + MS and line.waiting(("acme", "too_many_in_flight"), 100.0) == 10.0
    assert line.place(("globex", "too_many_in_flight"), 100.0, 1.0) <= 1.0 + MS, "another tenant's line is empty"
    assert line.place(("acme", "rate_limited"), 100.0, 1.0) <= 1.0 + MS, "another refusal's line too"
    assert line.place(("acme", "too_many_in_flight"), 105.0, 1.0) >= 5.0, "half of it is still away"
    assert line.place(("acme", "too_many_in_flight"), 200.0, 1.0) <= 1.0 + MS, "all came back: empty again"


def test_floor_above_ceiling_is_refused():
    with pytest.raises(ValueError):
        RetryLine(2.0, 1.0)
