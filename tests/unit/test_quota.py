"""The per-tenant quota rules (``mesh_tenancy.quota``), on a clock passed in: properties over random
sequences of charges, checked against a brute-force count of what a stream would still hold."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_contracts.v1.records import QuotaRecord
from mesh_tenancy.quota import MIB, Limit, Shape, charge, limits_from, refund, slot_width

WINDOW = 3600.0

charges = st.lists(
    st.tuples(st.floats(0, 900, allow_nan=False), st.integers(1, 40_000)),  # (seconds since the last, bytes)
    min_size=1,
    max_size=120,
)


def run(limit: Limit, seq: list[tuple[float, int]], window: float = WINDOW) -> list[tuple[float, int]]:
    rec, now, kept = QuotaRecord(), 1_000_000.0, []
    for gap, size in seq:
        now += gap
        if charge(rec, limit, window, size, now) is None:
            kept.append((now, size))
    return kept


@settings(max_examples=300, deadline=None)
@given(seq=charges, limit_b=st.integers(40_000, 400_000), limit_m=st.integers(0, 30))
def test_what_a_stream_can_still_hold_never_passes_the_quota(seq, limit_b, limit_m):
    """At every accepted charge, what was accepted within the stream's max_age before it (what the
    stream may still hold, whatever its slots) is within the bytes and the messages allowed."""
    kept = run(Limit(bytes=limit_b, msgs=limit_m), seq)
    for t, _ in kept:
        held = [s for at, s in kept if t - WINDOW < at <= t]
        assert sum(held) <= limit_b
        assert not limit_m or len(held) <= limit_m


@settings(max_examples=300, deadline=None)
@given(seq=charges, per_min=st.integers(50_000, 500_000))
def test_bytes_per_minute_are_bounded_by_the_token_bucket(seq, per_min):
    """In any minute, at most two minutes' allowance plus one message (a full bucket, its refill,
    and a message bigger than what was left, which leaves the bucket in debt)."""
    kept = run(Limit(bytes_per_min=per_min), seq)
    biggest = max((s for _, s in kept), default=0)
    for t, _ in kept:
        assert sum(s for at, s in kept if t - 60 < at <= t) <= 2 * per_min + biggest


@settings(max_examples=200, deadline=None)
@given(seq=charges, size=st.integers(1, 40_000))
def test_a_refused_message_fits_once_its_retry_after_has_passed(seq, size):
    limit = Limit(bytes=100_000, msgs=12)
    rec, now = QuotaRecord(), 1_000_000.0
    for gap, s in seq:
        now += gap
        charge(rec, limit, WINDOW, s, now)
    refused = charge(rec, limit, WINDOW, size, now)
    if refused is None:
        return
    assert refused.code == "quota_exceeded" and refused.retry_after_s > 0
    assert charge(rec, limit, WINDOW, size, now + refused.retry_after_s) is None


def test_a_message_larger_than_the_whole_quota_is_refused_for_good():
    refused = charge(QuotaRecord(), Limit(bytes=1000), WINDOW, 1001, 1_000_000.0)
    assert (
        refused is not None and refused.retry_after_s == 0 and "larger than the tenant's whole quota" in refused.reason
    )


def test_a_refund_gives_the_room_back_and_the_record_says_what_is_held():
    rec, now, limit = QuotaRecord(), 1_000_000.0, Limit(bytes=1000, msgs=2)
    assert charge(rec, limit, WINDOW, 600, now) is None
    assert charge(rec, limit, WINDOW, 600, now + 1) is not None
    assert refund(rec, 600, now)
    assert rec.held_now() == (0, 0)
    assert charge(rec, limit, WINDOW, 600, now + 2) is None
    assert (rec.limit_bytes, rec.limit_msgs, rec.window_s) == (1000, 2, WINDOW)


def test_slots_are_forgotten_once_their_charges_have_aged_out_of_the_stream():
    rec, now, limit = QuotaRecord(), 1_000_000.0, Limit(bytes=1000)
    assert charge(rec, limit, WINDOW, 1000, now) is None
    refused = charge(rec, limit, WINDOW, 1, now + WINDOW - 1)
    assert refused is not None  # still possibly held: not a second before max_age has passed
    width = slot_width(WINDOW)
    at = (now // width + 1) * width + WINDOW  # the end of its slot, plus max_age
    assert charge(rec, limit, WINDOW, 1000, at) is None
    assert len(rec.held) == 1


def test_the_rate_bucket_lets_one_big_message_through_when_full_and_then_waits():
    rec, now, limit = QuotaRecord(), 1_000_000.0, Limit(bytes_per_min=60_000)
    assert charge(rec, limit, WINDOW, 100_000, now) is None  # bigger than a minute's allowance: passes once
    refused = charge(rec, limit, WINDOW, 1000, now + 1)
    assert refused is not None and refused.code == "rate_limited"
    assert refused.retry_after_s == 40.0  # the debt (39 KB after a second) and the message (1 KB) at 1 KB/s


def test_limits_are_a_share_of_the_stream_unless_the_tenant_has_its_own():
    shape = Shape(max_bytes=512 * MIB, max_msgs=0, max_age_s=7 * 86400)
    limit = limits_from(0.125, {"TASK": 16.0, "DLQ": 6.0}, {"acme": {"TASK": {"mib": 256, "msgs": 100}}})
    assert limit("globex", "TASK", shape) == Limit(64 * MIB, 0, 16 * MIB)
    assert limit("acme", "TASK", shape) == Limit(256 * MIB, 100, 16 * MIB)
    dlq = limit("globex", "DLQ", shape)  # kept by six services: a sixth each
    assert dlq == Limit(int(64 * MIB / 6), 0, MIB)
    assert not limits_from(0.0, {}, {})("globex", "RAG", shape)


async def test_what_a_service_stores_of_its_own_accord_counts_at_the_tenants_next_charge():
    """The planner's rejections and outcomes in TASK are the tenant's too: never refused, written
    with the tenant's next charge or by the flush, and then its next message is refused."""
    import time

    from mesh_tenancy.quota import Quotas
    from mesh_testing.memkv import MemoryKV

    kv = MemoryKV()
    q = Quotas(lambda: None, kv, "planner", lambda t, s, shape: Limit(bytes=10_000))
    q._shapes["TASK"] = (time.monotonic(), Shape(max_bytes=80_000, max_msgs=0, max_age_s=WINDOW))
    assert (await q.charge("acme", "TASK", 4000))[0] is None
    q.induced("acme", "TASK", 5000)
    assert (await q.charge("acme", "TASK", 1000))[0] is None  # 4000 + 5000 + 1000: the whole quota
    writes = kv.seq
    q.induced("acme", "TASK", 10)
    await q.flush()
    assert kv.seq == writes + 1
    refused, _ = await q.charge("acme", "TASK", 1)
    assert refused is not None and refused.code == "quota_exceeded" and "in 4 messages" in refused.reason
    assert (await q.charge("globex", "TASK", 9000))[0] is None, "another tenant's quota is its own"
