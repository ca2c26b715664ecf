"""What a budget replica keeps of a task between its messages (``mesh_budget.recent``): kept
while it is used, forgotten when idle, when its task ends, or beyond the cap."""

from __future__ import annotations

import pytest

from mesh_budget.recent import Recent


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_entry_used_within_idle_s_stays_however_long_its_task_runs() -> None:
    clock = Clock()
    kept: Recent[str] = Recent(10.0, clock=clock)
    kept.put(("acme", "t1"), "facts")
    for _ in range(100):  # 100 uses 9 s apart: 900 s in all, never 10 s idle
        clock.now += 9.0
        assert kept.get(("acme", "t1")) == "facts"
    assert len(kept) == 1


def test_an_entry_idle_longer_than_idle_s_is_forgotten_oldest_use_first() -> None:
    clock = Clock()
    kept: Recent[int] = Recent(10.0, clock=clock)
    for i in range(5):
        kept.put(("acme", f"t{i}"), i)
        clock.now += 1.0
    assert kept.get(("acme", "t0")) == 0  # t0 used again: now the most recent
    clock.now += 9.5  # t1..t4 last used 13.5 .. 10.5 s ago; t0 9.5 s ago
    assert len(kept) == 1
    assert kept.get(("acme", "t0")) == 0
    assert kept.get(("acme", "t1")) is None


def test_membership_counts_as_use_and_works_for_falsy_values() -> None:
    clock = Clock()
    kept: Recent[bool] = Recent(10.0, clock=clock)
    kept.put(("acme", "t1"), False)
    clock.now += 8.0
    assert ("acme", "t1") in kept  # a use: its idle time starts again
    clock.now += 8.0
    assert ("acme", "t1") in kept
    assert ("acme", "t2") not in kept


def test_a_task_that_ended_is_forgotten_at_once() -> None:
    kept: Recent[str] = Recent(300.0, clock=Clock())
    kept.put(("acme", "t1"), "a")
    kept.put(("acme", "t2"), "b")
    kept.forget(("acme", "t1"))
    kept.forget(("acme", "never-kept"))  # an end seen for a task this replica never reserved for
    assert kept.get(("acme", "t1")) is None and kept.get(("acme", "t2")) == "b"


def test_beyond_the_cap_the_least_recently_used_go_first() -> None:
    kept: Recent[int] = Recent(300.0, cap=3, clock=Clock())
    for i in range(3):
        kept.put(i, i)
    kept.get(0)  # 1 is now the least recently used
    kept.put(3, 3)
    assert len(kept) == 3 and kept.get(1) is None and kept.get(0) == 0


@pytest.mark.parametrize(("idle_s", "cap"), [(0.0, 10), (-1.0, 10), (1.0, 0)])
def test_a_memory_that_could_keep_nothing_is_refused(idle_s: float, cap: int) -> None:
    with pytest.raises(ValueError, match="idle_s must be positive"):
        Recent(idle_s, cap=cap)
