"""``Resubmit``: which refusals a client resubmits after, how long it waits, and its bounds."""

from __future__ import annotations

import pytest

from mesh_contracts.v1 import TaskRejected
from meshctl.submission import RETRYABLE, Resubmit

pytestmark = pytest.mark.unit


def refused(code: str, after: float | None) -> TaskRejected:
    return TaskRejected(tenant="acme", task_id="t1", reason="no", code=code, retry_after_s=after)


@pytest.mark.parametrize("code", sorted(RETRYABLE))
def test_a_curable_refusal_is_waited_out_never_sooner_than_it_says(code):
    pause = Resubmit(attempts=3, max_wait_s=60).pause(refused(code, 2.0), resubmitted=0, waited_s=0.0)
    assert pause is not None and 2.0 <= pause <= 2.4


@pytest.mark.parametrize(
    ("code", "after"),
    [("invalid", None), ("invalid", 1.0), ("forbidden", 1.0), ("quota_exceeded", 0.0),
     ("quota_exceeded", None), ("too_many_in_flight", None)],
)  # fmt: skip
def test_a_refusal_waiting_cannot_cure_is_not_resubmitted(code, after):
    assert Resubmit(attempts=3, max_wait_s=60).pause(refused(code, after), resubmitted=0, waited_s=0.0) is None


def test_the_bounds_attempts_and_total_wait():
    policy = Resubmit(attempts=2, max_wait_s=10)
    assert policy.pause(refused("rate_limited", 1.0), resubmitted=1, waited_s=0.0) is not None
    assert policy.pause(refused("rate_limited", 1.0), resubmitted=2, waited_s=0.0) is None, "two resubmissions at most"
    assert policy.pause(refused("rate_limited", 4.0), resubmitted=0, waited_s=5.0) is not None
    assert policy.pause(refused("rate_limited", 9.0), resubmitted=0, waited_s=5.0) is None, "it would wait 14 s in all"
    assert Resubmit(attempts=0).pause(refused("busy", 0.1), resubmitted=0, waited_s=0.0) is None
    with pytest.raises(ValueError):
        Resubmit(attempts=-1)
