"""Consumer-less reads (``mesh_durable.tail``) against a real nats-server: in order, no gaps, no
duplicates, while the stream is being written; by time, by subject, and a bucket's current values."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.js import api

from mesh_durable.tail import DirectGetError, Reader, Stored, Tail

pytestmark = pytest.mark.integration


@pytest.fixture
async def nc(integration_infra) -> AsyncIterator[nats.NATS]:
    conn = await nats.connect(integration_infra.nats_url, **integration_infra.ids.connect_options("admin"))
    yield conn
    await conn.close()


async def scratch(nc: nats.NATS, name: str) -> None:
    js = nc.jetstream()
    try:
        await js.delete_stream(name)
    except nats.js.errors.NotFoundError:
        pass
    await js.add_stream(api.StreamConfig(name=name, subjects=[f"{name.lower()}.>"], allow_direct=True))


async def test_a_tail_reads_every_message_once_in_order_while_the_stream_is_written(nc):
    await scratch(nc, "TAILA")
    js = nc.jetstream()
    for i in range(500):  # a backlog before the tail starts
        await js.publish(f"taila.{i % 7}", str(i).encode())
    seen: list[int] = []

    async def cb(m: Stored) -> None:
        seen.append(m.seq)
        assert m.data == str(m.seq - 1).encode() and m.subject == f"taila.{(m.seq - 1) % 7}"

    tail = Tail(nc, "TAILA", cb, start_seq=1, batch=100)
    tail.start()
    try:
        await asyncio.wait_for(tail.caught_up.wait(), 10)
        acks = [js.publish(f"taila.{i % 7}", str(i).encode()) for i in range(500, 3000)]
        for chunk in range(0, len(acks), 250):
            await asyncio.gather(*acks[chunk : chunk + 250])
        deadline = time.monotonic() + 20
        while len(seen) < 3000 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await tail.stop()
    assert seen == list(range(1, 3001)), "every stored message once, in stream order"


async def test_a_tail_starts_at_a_time_and_follows_one_subject(nc):
    await scratch(nc, "TAILB")
    js = nc.jetstream()
    for i in range(20):
        await js.publish("tailb.old", str(i).encode())
    await asyncio.sleep(0.05)
    start = time.time()
    await asyncio.sleep(0.05)
    for i in range(30):
        await js.publish("tailb.new" if i % 3 else "tailb.other", str(i).encode())
    seen: list[Stored] = []

    async def cb(m: Stored) -> None:
        seen.append(m)

    tail = Tail(nc, "TAILB", cb, start_time=start, subject="tailb.new")
    tail.start()
    try:
        await asyncio.wait_for(tail.caught_up.wait(), 10)
        await js.publish("tailb.new", b"late")
        deadline = time.monotonic() + 30  # returns as soon as it holds
        while len(seen) < 21 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        await tail.stop()
    assert [m.data for m in seen] == [str(i).encode() for i in range(30) if i % 3] + [b"late"]
    assert all(m.subject == "tailb.new" and m.time >= start - 0.01 for m in seen)


async def test_a_tail_of_an_empty_stream_is_caught_up_and_sees_the_first_message(nc):
    await scratch(nc, "TAILC")
    seen: list[bytes] = []

    async def cb(m: Stored) -> None:
        seen.append(m.data)

    tail = Tail(nc, "TAILC", cb, start_time=time.time() - 60)
    tail.start()
    try:
        await asyncio.wait_for(tail.caught_up.wait(), 5)
        await nc.jetstream().publish("tailc.x", b"first")
        deadline = time.monotonic() + 30  # returns as soon as it holds
        while not seen and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await tail.stop()
    assert seen == [b"first"]


@pytest.mark.parametrize("keys", [50, 1500])
async def test_current_values_of_a_bucket_leave_out_deletions_and_other_prefixes(nc, keys):
    """1,500 keys is past the server's cap on one multi-last answer: the fold takes over."""
    js = nc.jetstream()
    bucket = f"tailkv{keys}"
    try:
        await js.delete_key_value(bucket)
    except nats.js.errors.NotFoundError:
        pass
    kv = await js.create_key_value(api.KeyValueConfig(bucket=bucket, history=3, direct=True))
    for i in range(keys):
        await kv.put(f"acme.k{i}", b"v1")
        await kv.put(f"globex.k{i}", b"g")
    for i in range(0, keys, 10):
        await kv.put(f"acme.k{i}", b"v2")
    for i in range(0, keys, 7):
        await kv.delete(f"acme.k{i}")
    reader = Reader(nc, f"KV_{bucket}")
    try:
        if keys > 1024:  # the server's limit on one multi-last answer, which the fold works around
            with pytest.raises(DirectGetError, match="413"):
                await reader.read(last_of=[f"$KV.{bucket}.acme.>"])
        current = await reader.current(bucket, "acme.>")
    finally:
        await reader.close()
    expected = {f"acme.k{i}": (b"v2" if i % 10 == 0 else b"v1") for i in range(keys) if i % 7}
    assert {k: e.data for k, e in current.items()} == expected


async def test_last_and_a_missing_stream(nc):
    await scratch(nc, "TAILD")
    js = nc.jetstream()
    for i in range(5):
        await js.publish(f"taild.{i}", str(i).encode())
    reader = Reader(nc, "TAILD")
    try:
        last = await reader.last("taild.>")
        assert last is not None and (last.seq, last.data) == (5, b"4")
        assert await reader.last("taild.nothing") is None
    finally:
        await reader.close()
    missing = Reader(nc, "NO_SUCH_STREAM", timeout=1.0)
    with pytest.raises(DirectGetError):
        await missing.read(seq=1)
    await missing.close()


@pytest.mark.parametrize("fed", ["every message", "only some (gaps)"])
async def test_a_fed_tail_takes_messages_from_the_feed_and_reads_the_stream_only_for_gaps(nc, fed):
    """The stream republishes what it stores; a tail on that feed reads nothing while the feed is
    complete, and fills every gap (here: messages the feed never carries) from the stream."""
    js = nc.jetstream()
    name = "TAILE" if fed == "every message" else "TAILF"
    try:
        await js.delete_stream(name)
    except nats.js.errors.NotFoundError:
        pass
    src = f"{name.lower()}.>" if fed == "every message" else f"{name.lower()}.a.>"
    await js.add_stream(
        api.StreamConfig(
            name=name,
            subjects=[f"{name.lower()}.>"],
            allow_direct=True,
            republish=api.RePublish(src=src, dest=f"feed.{name}.>"),
        )
    )
    for i in range(100):
        await js.publish(f"{name.lower()}.{'a' if i % 3 else 'b'}.x", str(i).encode())
    seen: list[int] = []

    async def cb(m: Stored) -> None:
        seen.append(m.seq)

    tail = Tail(nc, name, cb, start_seq=1, feed=f"feed.{name}.>", poll_s=5.0)
    tail.start()
    try:
        await asyncio.wait_for(tail.caught_up.wait(), 10)
        startup = tail.requests
        acks = [js.publish(f"{name.lower()}.{'a' if i % 3 else 'b'}.x", str(i).encode()) for i in range(100, 2100)]
        for chunk in range(0, len(acks), 200):
            await asyncio.gather(*acks[chunk : chunk + 200])
        deadline = time.monotonic() + 20
        while len(seen) < 2100 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        await tail.stop()
    assert seen == list(range(1, 2101)), "every stored message once, in stream order"
    reads = tail.requests - startup
    if fed == "every message":
        assert reads <= 5, f"{reads} reads for 2,000 fed messages: the feed should carry them"
    else:
        assert reads >= 1, "the messages the feed never carried came from the stream"
